"""Where quantize/dequantize go so onnxruntime runs integer kernels in nets with SiLU, GELU and LayerNorm
(issue #17): every quantized conv ends in a quantize, SiLU and squeeze-excite gates become QLinearSigmoid /
QLinearMul, and the IR still matches onnxruntime."""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimfx import ir
from slimfx.passes import PassContext, create_pass


class SiLUNet(nn.Module):
    """conv -> SiLU -> depthwise conv -> SiLU -> squeeze-excite gate -> conv (+ residual) -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.se_r, self.se_e = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.c2 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = F.silu(self.c1(x))
        z = F.silu(self.dw(y))
        s = torch.sigmoid(self.se_e(F.silu(self.se_r(F.adaptive_avg_pool2d(z, 1)))))
        y = y + self.c2(z * s)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class LayerNormNet(nn.Module):
    """conv -> LayerNorm (channels last) -> linear -> GELU -> linear -> conv: ops with no integer kernel."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.l1, self.l2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.norm(self.c1(x).permute(0, 2, 3, 1))
        y = self.l2(F.gelu(self.l1(y))).permute(0, 3, 1, 2)
        return self.fc(F.gelu(self.c2(y)).mean(dim=(2, 3)))


def _quantized(m: nn.Module):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    g = ir.capture(m.eval(), (x,))
    cal = [(torch.randn(8, 3, 12, 12),) for _ in range(2)]
    res = create_pass("quantize", {}).run(g, PassContext((x,), calibration_data=cal, quiet=True))
    return g, res, x


def _optimized_ops(g: ir.Graph, x: torch.Tensor, tmp_path) -> Counter:
    import onnx
    import onnxruntime as ort

    from slimfx.exporters.onnx import to_onnx_model

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(to_onnx_model(g, inputs=(x,)).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)


def test_every_conv_of_a_silu_net_runs_as_qlinearconv_with_integer_silu_and_gate(tmp_path):
    torch.manual_seed(0)
    g, res, x = _quantized(SiLUNet())
    # silu(x) became x * sigmoid(x) (onnxruntime's integer kernels), the conv outputs are quantized
    assert not g.find("silu") and len(g.find("sigmoid")) == 4
    for name in ("c1", "dw", "se_r", "se_e", "c2"):
        assert [u.op for u in g.node(name).users] == ["quantize"], name
    ops = _optimized_ops(g, x, tmp_path)
    assert ops["QLinearConv"] == 5 and "Conv" not in ops and "FusedConv" not in ops
    assert ops["QLinearSigmoid"] == 4 and ops["QLinearMul"] == 4 and "Sigmoid" not in ops and "Mul" not in ops
    assert ops["QLinearAdd"] == 1 and ops["QGemm"] == 1


def test_convs_before_layernorm_and_gelu_are_fused_and_linears_keep_float_output(tmp_path):
    torch.manual_seed(0)
    g, res, x = _quantized(LayerNormNet())
    for name in ("c1", "c2"):
        assert [u.op for u in g.node(name).users] == ["quantize"], name
    # QGemm / MatMulIntegerToFloat write float: no quantize after a linear that a float op reads
    assert all(u.op != "quantize" for u in g.node("l1").users)
    ops = _optimized_ops(g, x, tmp_path)
    assert ops["QLinearConv"] == 2 and "Conv" not in ops
    assert ops["MatMulIntegerToFloat"] == 2 and "MatMul" not in ops


def test_onnxruntime_agrees_with_the_ir_on_the_new_placement():
    from slimfx.exporters.onnx import to_onnx_model
    from slimfx.exporters.validate import validate_onnx

    for m in (SiLUNet(), LayerNormNet()):
        torch.manual_seed(0)
        g, res, x = _quantized(m)
        report = validate_onnx(to_onnx_model(g, inputs=(x,)), g, (x,), atol=0.05, rtol=0.05)
        assert report.top1_agreement == 1.0 and report.max_abs_diff < 0.05, type(m).__name__


class InvertedResidualNet(nn.Module):
    """MobileNetV2's first layers: stem conv -> ReLU6 -> depthwise -> ReLU6 -> project, then an int8 block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.project = nn.Conv2d(16, 16, 1)
        self.expand = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        y = self.project(F.relu6(self.dw(F.relu6(self.stem(x)))))
        y = y + self.project(y)  # a residual add on the int8 side
        return self.fc(F.adaptive_avg_pool2d(F.relu6(self.expand(y)), 1).flatten(1))


def test_a_float_prefix_reads_the_float_input_and_quantizes_once_where_it_ends(tmp_path):
    """What the speed guard's float-prefix candidate exports: the first layers float (onnxruntime fuses their
    ReLU6 into the float conv), no quantize on the model input, one QuantizeLinear where the prefix ends, every
    later conv a QLinearConv; onnxruntime and the IR agree."""
    from slimfx.exporters.onnx import to_onnx_model
    from slimfx.exporters.validate import validate_onnx

    torch.manual_seed(0)
    m = InvertedResidualNet().eval()
    x = torch.randn(2, 3, 16, 16)
    g = ir.capture(m, (x,))
    cal = [(torch.randn(8, 3, 16, 16),) for _ in range(2)]
    create_pass("quantize", {"skip": ["stem", "dw"], "speed_guard": False}).run(
        g, PassContext((x,), calibration_data=cal, quiet=True))
    assert not [u for u in g.inputs[0].users if u.op == "quantize"]
    first_q = next(n for n in g if n.op == "quantize")
    assert first_q.inputs[0].op == "relu6" and first_q.inputs[0].inputs[0] is g.node("dw")
    ops = _optimized_ops(g, x, tmp_path)
    assert ops["QuantizeLinear"] == 1 and ops["QLinearConv"] == 3 and ops["QLinearAdd"] == 1
    assert ops["Conv"] + ops["FusedConv"] == 2 and "DequantizeLinear" not in ops and "Clip" not in ops
    report = validate_onnx(to_onnx_model(g, inputs=(x,)), g, (x,), atol=0.05, rtol=0.05)
    assert report.top1_agreement == 1.0 and report.max_abs_diff < 0.05


def test_a_three_channel_stem_is_padded_to_four_for_the_symmetric_int8_conv_with_the_same_output(tmp_path):
    """onnxruntime's symmetric int8 conv (x86) takes only input channels in multiples of 4; a 3-channel image
    stem ran as im2col + GEMM at about twice its float time. quantize pads the quantized input with one channel
    of the zero point and the int8 weights with a zero input channel: the same output, IR and onnxruntime."""
    from slimfx.exporters.onnx import to_onnx_model
    from slimfx.exporters.validate import validate_onnx

    torch.manual_seed(0)
    m = InvertedResidualNet().eval()
    x = torch.randn(2, 3, 16, 16)
    cal = [(torch.randn(8, 3, 16, 16),) for _ in range(2)]
    graphs, stats = {}, {}
    for align in (False, True):
        g = ir.capture(m, (x,))
        res = create_pass("quantize", {"speed_guard": False, "align_channels": align}).run(
            g, PassContext((x,), calibration_data=cal, quiet=True))
        ir.verify(g)
        graphs[align], stats[align] = g, res.stats
    g = graphs[True]
    assert stats[True]["aligned_channels"] == {"stem": "3 -> 4 input channels"} and "aligned_channels" not in stats[False]
    pad = g.node("stem").inputs[0].inputs[0]  # dequantize(pad(quantize(x)))
    zp = g.params[pad.inputs[0].inputs[2].name]
    assert pad.op == "pad" and pad.inputs[0].inputs[0] is g.inputs[0] and pad.meta.shape == (2, 4, 16, 16)
    assert (pad.attrs["value"] or 0) == float(zp)  # the extra channel dequantizes to exactly 0
    w = g.params[g.node("stem").inputs[1].inputs[0].name]
    assert w.shape == (16, 4, 3, 3) and not w[:, 3].any()
    assert torch.equal(w[:, :3], graphs[False].params[graphs[False].node("stem").inputs[1].inputs[0].name])
    # only the model input's conv: the 16-channel convs after it are aligned already
    assert [n.op for n in g if n.op == "pad"] == ["pad"]
    assert torch.equal(ir.lower(g)(x), ir.lower(graphs[False])(x))
    ops = _optimized_ops(g, x, tmp_path)
    assert ops["QLinearConv"] == 5 and "Conv" not in ops and "DequantizeLinear" not in ops
    # onnxruntime on the padded file against the unpadded graph: the same integers (float rounding of the
    # final dequantize and linear aside)
    report = validate_onnx(to_onnx_model(g, inputs=(x,)), graphs[False], (x,), atol=1e-6, rtol=0)
    assert report.max_abs_diff < 1e-6
    # computed in float again (a storage scheme's weight-only form), the padding goes: a float conv gains nothing
    from slimfx.passes.quantize.qdq import weight_only

    for aligned in (g, graphs[False]):
        weight_only(aligned)
        ir.verify(aligned)
    assert not g.find("pad") and not g.find("quantize")
    assert g.params[g.node("stem").inputs[1].inputs[0].name].shape == (16, 3, 3, 3)
    assert torch.equal(ir.lower(g)(x), ir.lower(graphs[False])(x))


def test_only_stems_that_padding_grows_by_at_most_a_third_or_that_the_kernel_takes_are_padded():
    """1 -> 4 channels quadruples the input (digits_cnn's 8x8 stem was slower at batch 1 padded); 8 output
    channels are below what onnxruntime's symmetric conv takes, so padding would buy nothing."""
    torch.manual_seed(0)
    for cin, cout, aligned in [(1, 16, False), (3, 8, False), (6, 16, True), (3, 24, True)]:
        m = nn.Sequential(nn.Conv2d(cin, cout, 3), nn.ReLU(), nn.Conv2d(cout, 16, 3)).eval()
        x = torch.randn(2, cin, 12, 12)
        g = ir.capture(m, (x,))
        res = create_pass("quantize", {"speed_guard": False}).run(
            g, PassContext((x,), calibration_data=[(torch.randn(8, cin, 12, 12),)], quiet=True))
        assert bool(res.stats.get("aligned_channels")) is aligned, (cin, cout)
        assert len(g.find("pad")) == int(aligned)
