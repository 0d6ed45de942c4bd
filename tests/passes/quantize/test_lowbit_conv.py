"""Low-bit conv/linear weights under `quantize` (issue #17, items 2 and 3): 4-bit weights stored as ONNX INT4
(per output channel and blocked), validated with onnxruntime against the IR; AdaRound's learned rounding;
option values a user can get wrong."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from slimfx import ir
from slimfx.cli import main
from slimfx.errors import ExportError, PassError
from slimfx.exporters.onnx import to_onnx_model
from slimfx.passes import PassContext, create_pass
from slimfx.passes.quantize.adaround import adaround, layer_fn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        return self.fc(x.mean(dim=(2, 3)))


def _setup(n=64):
    torch.manual_seed(0)
    m = Net().eval()
    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    g = ir.capture(m, (x[:2],))
    ctx = PassContext((x[:2],), calibration_data=[(x[i:i + 32],) for i in range(0, n, 32)], quiet=True)
    return m, g, ctx, x


def _ort(model: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _int4_initializers(model: onnx.ModelProto) -> list[str]:
    return [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4]


@pytest.mark.parametrize("block", [0, 16])
def test_int4_weights_export_as_onnx_int4_and_onnxruntime_matches_the_ir(block):
    m, g, ctx, x = _setup()
    int8 = g.copy()
    int8_bytes = create_pass("quantize", {"speed_guard": False}).run(int8, ctx).stats["weight_bytes"]["after"]
    res = create_pass("quantize", {"bits": 4, "keep_first_last": False, "weight_block_size": block,
                                   "speed_guard": False}).run(g, ctx)
    ir.verify(g)
    dqs = {n.name: n for n in g if n.op == "dequantize" and n.attrs.get("bits") == 4}
    assert len(dqs) == 4  # c1, c2, c3, fc
    for n in dqs.values():
        values = g.params[n.inputs[0].name]
        assert values.dtype == torch.int8 and int(values.abs().max()) == 7  # symmetric 4-bit range used
    if block:  # c2 (16 input channels), c3 and fc: blocks of 16 input channels; c1 (3) keeps one per channel
        assert g.node("c2_weight_dq").attrs["block_size"] == 16
        assert tuple(g.params[g.node("c3_weight_dq").inputs[1].name].shape) == (32, 2, 1, 1)
        assert "block_size" not in g.node("c1_weight_dq").attrs
    # half the bytes of int8 for the weights; scales and int32 biases stay
    assert res.stats["weight_bytes"]["after"] < (0.95 if block else 0.7) * int8_bytes
    model = to_onnx_model(g, inputs=(x[:2],))  # opset chosen: 21 (INT4)
    assert model.opset_import[0].version == 21
    assert len(_int4_initializers(model)) >= 4
    y, ref = _ort(model, x), ir.lower(g)(x).detach().numpy()
    np.testing.assert_allclose(y, ref, atol=1e-4 * np.abs(ref).max() + 1e-5, rtol=1e-3)
    assert (y.argmax(1) == ref.argmax(1)).all()
    if not block:  # INT4 in the file, int8 kernels at run time: onnxruntime folds the Cast and fuses QLinearConv
        assert len(model.SerializeToString()) < 0.75 * len(to_onnx_model(int8, inputs=(x[:2],)).SerializeToString())
    with pytest.raises(ExportError, match="opset 21"):
        to_onnx_model(g, inputs=(x[:2],), opset=17)


def test_below_eight_bits_the_first_and_last_layer_stay_8_bit():
    _, g, ctx, _ = _setup()
    res = create_pass("quantize", {"bits": 4, "speed_guard": False}).run(g, ctx)
    assert res.stats["lowbit"] == {"c2": "low-bit", "c3": "low-bit"}
    assert [n.inputs[1].attrs.get("bits") for n in (g.node(k) for k in ("c1", "c2", "c3", "fc"))] == [None, 4, 4, None]


def test_adaround_reconstructs_a_seeded_conv_better_than_nearest():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=gen) * 0.2
    b = torch.randn(16, generator=gen) * 0.1
    # correlated input channels and neighbouring pixels (as in real activations), where rounding each weight to
    # nearest is not what keeps the output closest
    x = torch.einsum("nchw,cd->ndhw", torch.randn(128, 8, 6, 6, generator=gen), torch.randn(8, 8, generator=gen))
    x = x + 0.5 * torch.roll(x, 1, dims=3)
    f = layer_fn("conv2d", {"stride": 1, "padding": 1, "dilation": 1, "groups": 1}, b, torch.relu)
    target = f(x, w)
    scale = (w.abs().amax(dim=(1, 2, 3), keepdim=True) / 7)
    values, e_near, e_ada = adaround(f, w, scale, -7, 7, x, target, iters=150, channel_dim=1)
    assert values.shape == w.shape and int(values.abs().max()) <= 7
    assert torch.equal(values.float(), torch.clamp(values.float(), -7, 7))
    floor = torch.floor(w / scale)
    assert bool(((values == floor) | (values == floor + 1)).all())  # only the rounding direction is learned
    nearest = torch.round(w / scale)
    assert not torch.equal(values.float(), nearest)
    # the reported errors are the layer's output errors of the two roundings
    err = ((f(x, values.float() * scale) - target) ** 2).sum(dim=1).mean()
    assert float(err) == pytest.approx(e_ada, rel=1e-4)
    assert e_ada < 0.85 * e_near, (e_near, e_ada)


def test_adaround_in_the_pass_lowers_every_layers_error_and_the_output_error():
    m, g, ctx, x = _setup()
    near = g.copy()
    create_pass("quantize", {"bits": 4, "speed_guard": False}).run(near, ctx)
    res = create_pass("quantize", {"bits": 4, "rounding": "adaround", "adaround_iters": 60,
                                   "speed_guard": False}).run(g, ctx)
    ir.verify(g)
    layers = res.stats["adaround"]["layers"]
    assert set(layers) == {"c1", "c2", "c3", "fc"} and res.stats["adaround"]["iters"] == 60
    assert all(v["adaround"] <= v["nearest"] for v in layers.values())
    assert any(v["adaround"] < 0.9 * v["nearest"] for v in layers.values())
    ref = m(x)

    def err(graph):
        with torch.no_grad():
            return float(((ir.lower(graph)(x) - ref) ** 2).mean())
    assert err(g) < err(near)
    y = _ort(to_onnx_model(g, inputs=(x[:2],)), x)
    assert (y.argmax(1) == ir.lower(g)(x).argmax(1).numpy()).mean() >= 0.95


@pytest.mark.parametrize("opts, match", [
    ({"rounding": "adaround", "scheme": "sign"}, "rounding = 'adaround' learns the rounding of int8-scheme"),
    ({"weight_block_size": 24}, "'weight_block_size' = 24 is not a power of two"),
    ({"weight_block_size": 16, "per_channel": False}, "per_channel = false"),
    ({"weight_block_size": 16, "scheme": "fixed-point"}, "needs scheme int8-static or int8-dynamic"),
])
def test_conflicting_low_bit_options_are_refused(opts, match):
    with pytest.raises(PassError, match=match):
        create_pass("quantize", opts)


def test_adaround_without_calibration_data_says_what_to_give():
    q = create_pass("quantize", {"scheme": "int8-dynamic", "rounding": "adaround"})
    assert q.needs_calibration
    assert "rounding = 'nearest'" in q.check_context(PassContext((torch.randn(1, 3, 8, 8),), calibration_data=[]))


USER = """
import torch, torch.nn as nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval(), \\
        (torch.randn(2, 3, 8, 8),)
"""


@pytest.mark.parametrize("option, fragment", [
    ('rounding = "adarond"', "rounding"),
    ("adaround_iters = 0", "adaround_iters"),
    ("adaround_iters = -5", "adaround_iters"),
    ('adaround_iters = "many"', "adaround_iters"),
    ("weight_block_size = 3", "weight_block_size"),
    ("weight_block_size = -16", "weight_block_size"),
    ("bits = 1", "bits"),
    ('bits = 4\nscheme = "sign"\nrounding = "adaround"', "rounding = 'adaround'"),
])
def test_hostile_low_bit_options_exit_2_before_any_work(tmp_path, monkeypatch, capsys, option, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user.py").write_text(USER)
    (tmp_path / "bad.toml").write_text(f'[[passes]]\nname = "quantize"\n{option}\n')
    assert main(["compile", "user.py:build", "--recipe", "./bad.toml", "--out", "out", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
