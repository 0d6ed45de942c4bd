"""Degenerate quantization ranges: int32 biases that would saturate, tiny activations, all-zero and
non-finite calibration ranges. Each must give a model that onnxruntime runs like the IR, and the pass
must say what it did in its stats."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from slimfx import ir
from slimfx.ir.errors import PassError
from slimfx.passes import PassContext, create_pass
from slimfx.passes.quantize.calibrate import run_with_outputs
from slimfx.passes.quantize.observers import SCALE_FLOOR, QParams
from slimfx.passes.quantize.qdq import bias_limit, bias_scale, fit_bias, scale_value


def _sqnr(ref, y) -> float:
    ref, y = torch.as_tensor(ref).double(), torch.as_tensor(y).double()
    noise = float((ref - y).pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float(ref.pow(2).sum()) / noise)


class ZeroRow(nn.Module):
    """c2's output channel 3 and fc's output 2 have all-zero weights and a bias of 3.0."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 10)
        with torch.no_grad():
            self.c2.weight[3].zero_()
            self.c2.bias[3] = 3.0
            self.fc.weight[2].zero_()
            self.fc.bias[2] = 3.0

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(nn.functional.max_pool2d(y, 2).flatten(1))


class ZeroInput(ZeroRow):
    """c2 reads a tensor that is constantly 0 (c1's bias is far below anything its weights add)."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.c1.bias.fill_(-100.0)
            self.c2.bias.copy_(torch.linspace(-1.0, 3.0, 8))


def _quantized(cls, options=None, seed=0):
    torch.manual_seed(seed)
    m = cls().eval()
    x = torch.randn(2, 3, 8, 8)
    cal = [(torch.randn(16, 3, 8, 8),) for _ in range(4)]
    g = ir.capture(m, (x,))
    res = create_pass("quantize", options or {}).run(g, PassContext((x,), calibration_data=cal, quiet=True))
    return m, g, res


def _ort_ops(model, tmp_path) -> set[str]:
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}


def _ort_outputs(model, x):
    from slimfx.exporters.bench import ort_feed, ort_session

    sess = ort_session(model)
    return torch.from_numpy(sess.run(None, ort_feed(sess, (x,)))[0])


@pytest.mark.parametrize("options", [{}, {"per_channel": False}, {"scheme": "sign"}],
                         ids=["per-channel", "per-tensor", "sign"])
@pytest.mark.parametrize("cls", [ZeroRow, ZeroInput])
def test_a_bias_that_would_saturate_int32_is_kept_exact_and_onnxruntime_still_fuses(cls, options, tmp_path):
    from slimfx.exporters.onnx import to_onnx_model
    from slimfx.exporters.validate import validate_onnx

    m, g, res = _quantized(cls, options)
    raised = res.stats["bias_scale_raised"]
    per_channel = options.get("per_channel", True)  # a per-tensor scale is not tiny for one zero row
    if cls is ZeroInput:  # every channel of c2 has a bias; its input scale is the smallest scale
        assert raised == {"c2": list(range(8)), **({"fc": [2]} if per_channel else {})}
        assert res.stats["degenerate_ranges"].keys() == {"relu"}
    else:
        assert raised == ({"c2": [3], "fc": [2]} if per_channel else {})
    for name in ("c2", "fc"):
        b_dq = g.node(name).inputs[2]
        q, s = g.params[b_dq.inputs[0].name].double(), scale_value(g, b_dq.inputs[1]).double()
        assert g.params[b_dq.inputs[0].name].dtype == torch.int32
        fan_in = g.params[g.node(name).inputs[1].inputs[0].name][0].numel()
        assert int(q.abs().max()) <= bias_limit(fan_in)  # room left for the accumulator
        if name in raised:  # the bias is exact to float32 precision, not the 4.4e-5 it saturated to
            ch = raised[name]
            assert torch.allclose((q * s)[ch], getattr(m, name).bias.double()[ch], rtol=1e-7, atol=0)
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, y = m(x), ir.lower(g)(x)
        _, (c2_int,) = run_with_outputs(g, ["c2"])(x)
    # the bias effect on c2's output: a zero row (or a zero input) leaves the bias, exact up to the bound
    # fit_bias documents (2^-21 x fan-in x |bias|: sign stores a zero row as +-alpha), or for a bias that
    # was not raised, up to half its quantization step
    ch = [3] if cls is ZeroRow else list(range(8))
    want = m.c2.bias.detach()[ch].reshape(1, -1, 1, 1)
    step = scale_value(g, g.node("c2").inputs[2].inputs[1]).expand(8)[ch].reshape(1, -1, 1, 1)
    tol = 2 ** -21 * 72 * want.abs() if "c2" in raised else step / 2
    assert bool(((c2_int[:, ch] - want).abs() <= tol + 1e-7 * want.abs()).all())
    assert _sqnr(ref, y) > (20 if options.get("scheme") == "sign" else 40)  # was about 0 dB
    model = to_onnx_model(g, inputs=(x[:2],))
    report = validate_onnx(model, g, (x,), atol=1e-4, rtol=1e-4)
    assert report.max_abs_diff < 1e-4 and report.top1_agreement == 1.0
    assert _sqnr(ref, _ort_outputs(model, x)) > _sqnr(ref, y) - 0.1
    ops = _ort_ops(model, tmp_path)  # the raised weight scale keeps the integer kernels
    assert {"QLinearConv", "QGemm"} <= ops and not ops & {"Conv", "Gemm", "Add"}, ops


def test_a_bias_that_cannot_fit_int32_is_a_pass_error_never_a_saturated_value():
    from slimfx.passes.quantize.qdq import fold_bias

    torch.manual_seed(0)
    g = ir.capture(nn.Linear(4, 2).eval(), (torch.randn(1, 4),))
    node = g.node("linear") if g.has_node("linear") else next(n for n in g if n.op == "linear")
    with pytest.raises(PassError, match="does not fit int32.*skip"):
        fold_bias(g, node, torch.tensor(1e-12), torch.tensor([1e-12, 1e-12]), 0)


def test_bias_correction_leaves_a_channel_uncorrected_rather_than_saturate_its_bias():
    from slimfx.passes.quantize.equalize import _corrected_bias

    m, g, _ = _quantized(ZeroRow)
    n = g.node("c2")
    q = g.params[n.inputs[2].inputs[0].name]
    s = scale_value(g, n.inputs[2].inputs[1])
    delta = torch.zeros(8)
    delta[3] = 1e3 * float(m.c2.bias[3])  # far beyond what int32 holds at channel 3's scale
    delta[0] = 0.5
    name, new = _corrected_bias(g, n, delta)
    assert name == n.inputs[2].inputs[0].name and new[3] == q[3]
    assert new[0] == torch.round(q[0].double() + 0.5 / s[0].double()).to(torch.int32)


@settings(max_examples=60, deadline=None)
@given(log_sx=st.floats(-37.5, 2), log_sw=st.floats(-37.5, 1), log_b=st.floats(-30, 6),
       zero_rows=st.integers(0, 3), per_tensor=st.booleans(), pow2=st.booleans(), fan_in=st.integers(1, 10 ** 5))
def test_fit_bias_always_gives_an_exact_int32_bias_and_leaves_fine_channels_alone(log_sx, log_sw, log_b, zero_rows,
                                                                                  per_tensor, pow2, fan_in):
    gen = torch.Generator().manual_seed(0)
    s_x = torch.tensor(10.0 ** log_sx, dtype=torch.float32)
    s_w = (10.0 ** log_sw * (0.5 + torch.rand(4, generator=gen))).float()
    s_w[:zero_rows] = SCALE_FLOOR  # all-zero weight rows
    if per_tensor:
        s_w = s_w.max()
    if pow2:
        s_w = 2.0 ** torch.ceil(torch.log2(s_w))
    bias = (10.0 ** log_b * torch.randn(4, generator=gen)).float()
    qp = QParams(s_w, torch.zeros_like(s_w, dtype=torch.int8), torch.int8, None if per_tensor else 0)
    try:
        new, raised = fit_bias(qp, s_x, bias, fan_in, pow2=pow2)
    except PassError as e:  # only when no float32 weight scale can hold such a bias
        assert "beyond float32" in str(e) and float(bias.abs().max()) / float(s_x) > 1e28
        return
    scale = bias_scale(s_x, new.scale).double().expand(4)
    assert bool((scale >= SCALE_FLOOR).all()) and bool(torch.isfinite(new.scale * 128).all())
    q = torch.round(bias.double() / scale)
    assert float(q.abs().max()) <= bias_limit(fan_in)  # fits, with the accumulator's room left
    if raised:  # a raised scale stores the bias to ~2^-29 (float32 itself keeps 2^-24)
        ch = raised if not per_tensor else list(range(4))
        big = [c for c in ch if c in raised]
        assert torch.allclose((q * scale)[big], bias.double()[big], rtol=2 ** -22, atol=0)
    if pow2:
        assert torch.equal(new.scale, 2.0 ** torch.round(torch.log2(new.scale)))
    if not per_tensor:  # per channel: only the channels reported were touched, and only upwards
        fine = [c for c in range(4) if c not in raised]
        assert torch.equal(new.scale[fine], s_w[fine]) and bool((new.scale >= s_w).all())


class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3 if i == 0 else 16, 16, 3, padding=1) for i in range(4)])
        self.fc = nn.Linear(16 * 16, 10)

    def forward(self, x):
        for c in self.convs:
            x = torch.relu(c(x))
        return self.fc(nn.functional.max_pool2d(x, 2).flatten(1))


def _deep(c: float) -> nn.Module:
    """Weights scaled by c per layer, biases by c^k at layer k: the net computes c^5 x the unscaled one."""
    torch.manual_seed(0)
    m = Deep().eval()
    with torch.no_grad():
        for k, layer in enumerate([*m.convs, m.fc], start=1):
            layer.weight.mul_(c)
            layer.bias.mul_(c ** k)
    return m


@pytest.mark.parametrize("scheme", ["int8-static", "sign"])
def test_tiny_activations_quantize_like_normal_ones(scheme):
    """Activations down to ~1e-24 (weights x 1e-6 per layer): the scales follow them; the int8 model is as
    good as the unscaled one's (it was exactly 0 with the old 1e-12 floor), and onnxruntime agrees."""
    from slimfx.exporters.onnx import to_onnx_model

    x = torch.randn(2, 3, 8, 8)
    cal = [(torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    xt = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    sqnr = {}
    for c in (1.0, 1e-6):
        m = _deep(c)
        g = ir.capture(m, (x,))
        res = create_pass("quantize", {"scheme": scheme}).run(g, PassContext((x,), calibration_data=cal, quiet=True))
        assert res.stats["degenerate_ranges"] == {} and res.stats["bias_scale_raised"] == {}
        with torch.no_grad():
            ref, y = m(xt), ir.lower(g)(xt)
        assert float(ref.abs().mean()) < 1e-29 if c < 1 else True
        sqnr[c] = _sqnr(ref, y)
        assert _sqnr(y, _ort_outputs(to_onnx_model(g, inputs=(x,)), xt)) > 60  # onnxruntime computes the IR
    assert sqnr[1.0] > (30 if scheme == "int8-static" else 10)
    assert abs(sqnr[1e-6] - sqnr[1.0]) < 0.5, sqnr


@pytest.mark.parametrize("calibration", ["minmax", "percentile", "entropy", "mse"])
def test_every_observer_sees_tiny_ranges_and_reports_all_zero_as_zero(calibration):
    from slimfx.passes.quantize.observers import make_observer

    tiny = 5e-13 * torch.rand(10000, generator=torch.Generator().manual_seed(0))
    obs = make_observer(calibration)
    obs.update(torch.zeros(100))  # a first batch of zeros does not fix the bins
    obs.update(tiny)
    lo, hi = obs.range()
    assert float(lo) == 0.0 and 2e-13 < float(hi) <= 5.01e-13
    zeros = make_observer(calibration)
    for _ in range(3):
        zeros.update(torch.zeros(64))
    assert [float(v) for v in zeros.range()] == [0.0, 0.0]


def test_an_activation_with_nan_or_inf_keeps_its_readers_float_and_is_reported():
    class Recip(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(1, 1, 1), nn.Conv2d(1, 4, 1)
            self.fc = nn.Linear(4 * 16, 3)

        def forward(self, x):
            r = 1.0 / torch.relu(self.c1(x))  # +inf wherever c1 <= 0
            return self.fc(self.c2(r).clamp(-5.0, 5.0).flatten(1))

    torch.manual_seed(0)
    m = Recip().eval()
    with torch.no_grad():
        m.c1.weight.fill_(1.0)
        m.c1.bias.zero_()  # relu is 0 (and 1/relu inf) for about half of the values
    x = torch.randn(2, 1, 4, 4)
    g = ir.capture(m, (x,))
    res = create_pass("quantize", {}).run(g, PassContext((x,), calibration_data=[(torch.randn(8, 1, 4, 4),)],
                                                        quiet=True))
    ir.verify(g)
    # c2's input (1/relu) and its output (quantized after a conv) hold Inf: both keep c2 float
    reasons = res.stats["degenerate_ranges"]
    assert sorted(reasons) == sorted(["c2", g.node("c2").inputs[0].name])
    assert all("NaN or Inf" in why and why.endswith("kept float c2") for why in reasons.values())
    assert "c2" in res.stats["skipped"] and isinstance(g.node("c2").inputs[1], ir.Param)  # float weight
    assert g.node("c1").inputs[1].op == "dequantize" and g.node("fc").inputs[1].op == "dequantize"
    xt = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, y = m(xt), ir.lower(g)(xt)
    assert torch.isfinite(y).all() and _sqnr(ref, y) > 20


def test_pow2_fake_quantize_and_weights_are_finite_at_tiny_scales():
    from slimfx.ir import get_op

    fq = get_op("fake_quantize").impl
    for w in (torch.zeros(4, 3), torch.full((4, 3), 1e-39), 1e-30 * torch.randn(4, 3)):
        for mode in ("absmax", "pow2"):
            out = fq(w, qmin=-64, qmax=64, axis=0 if mode == "absmax" else None, mode=mode)
            assert torch.isfinite(out).all()
    assert np.isfinite(1.0 / np.float32(SCALE_FLOOR))
