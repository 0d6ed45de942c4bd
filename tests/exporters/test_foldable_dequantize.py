"""Weights whose reader computes in float (weight-only layers) are dequantized in a form onnxruntime folds when
it loads the model (Cast + Mul on initializers): onnxruntime never constant-folds a DequantizeLinear while its
QDQ optimizations are on, so a DequantizeLinear there would run at every inference (issue #17). Structural
checks on onnxruntime's optimized graph, no timing."""

from __future__ import annotations

from collections import Counter

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from slimfx import ir
from slimfx.exporters import export_onnx
from slimfx.passes import PassContext, create_pass
from slimfx.passes.quantize.qdq import weight_only


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y))
        return self.fc(y.mean(dim=(2, 3)))


def _quantized(options: dict) -> tuple[ir.Graph, ir.Graph, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    g = ir.capture(Net().eval(), (x,))
    fp32 = g.copy()
    ctx = PassContext((x,), calibration_data=[(torch.randn(8, 3, 8, 8),)], quiet=True)
    create_pass("quantize", {"speed_guard": False, **options}).run(g, ctx)
    return g, fp32, x


def _optimized_ops(path, tmp_path) -> Counter:
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / f"{path.stem}.opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("options, stored", [
    ({"scheme": "fixed-point"}, onnx.TensorProto.INT8),
    ({"scheme": "sign", "keep_first_last": False}, onnx.TensorProto.INT8),
    ({"bits": 4, "keep_first_last": False}, onnx.TensorProto.INT4),
])
def test_weight_only_weights_are_folded_at_load_and_run_as_fp32(options, stored, tmp_path):
    g, fp32, x = _quantized(options)
    int8_path = export_onnx(g, tmp_path / "int8.onnx", inputs=(x,)).path
    assert weight_only(g) > 0 and not g.find("quantize")
    path = export_onnx(g, tmp_path / "wo.onnx", inputs=(x,)).path  # validated against the IR, as every export
    model = onnx.load(path)
    ops = Counter(n.op_type for n in model.graph.node)
    # the emitted form: integers stored, Cast to float and Mul by the scale; no DequantizeLinear
    assert ops["DequantizeLinear"] == 0 and ops["Cast"] >= 3 and ops["Mul"] >= 3
    inits = {t.name: t for t in model.graph.initializer}
    casts = [n for n in model.graph.node if n.op_type == "Cast" and n.input[0] in inits]
    assert sum(inits[c.input[0]].data_type == stored for c in casts) == 3  # the three weights
    # onnxruntime folds them at load: its graph is the fp32 model's (no dequantize, cast or mul left)
    fp32_path = export_onnx(fp32, tmp_path / "fp32.onnx", inputs=(x,)).path
    assert _optimized_ops(path, tmp_path) == _optimized_ops(fp32_path, tmp_path)
    # the same file with quantized activations keeps DequantizeLinear: onnxruntime fuses integer kernels
    int8_ops = _optimized_ops(int8_path, tmp_path)
    assert int8_ops["QLinearConv"] == 2
    assert path.stat().st_size < int8_path.stat().st_size < fp32_path.stat().st_size / 2


def test_int32_biases_in_the_foldable_form_are_stored_as_int16(tmp_path):
    g, _, x = _quantized({"scheme": "fixed-point"})
    weight_only(g)
    model = onnx.load(export_onnx(g, tmp_path / "wo.onnx", inputs=(x,)).path)
    biases = [t for t in model.graph.initializer if "bias_q" in t.name]
    assert len(biases) == 3 and all(t.data_type == onnx.TensorProto.INT16 for t in biases)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(80, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("block_size", [32, 128])  # 80 inputs: 3 blocks (the last padded), or one block
@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_nbits_folded_form_is_folded_at_load_and_no_bigger(block_size, symmetric, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 80)
    g = ir.capture(MLP().eval(), (x,))
    fp32_path = export_onnx(g, tmp_path / "fp32.onnx", inputs=(x,)).path
    create_pass("quantize-weights", {"block_size": block_size, "symmetric": symmetric}).run(
        g, PassContext((x,), quiet=True))
    nbits = export_onnx(g, tmp_path / "nbits.onnx", inputs=(x,)).path
    assert Counter(n.op_type for n in onnx.load(nbits).graph.node)["MatMulNBits"] == 2
    for n in g.find("matmul_nbits"):
        n.attrs = {**n.attrs, "form": "folded"}
    folded = export_onnx(g, tmp_path / "folded.onnx", inputs=(x,)).path  # validated against the IR
    ops = Counter(n.op_type for n in onnx.load(folded).graph.node)
    assert ops["MatMulNBits"] == 0 and ops["DequantizeLinear"] == 0 and ops["MatMul"] == 2
    stored = {t.data_type for t in onnx.load(folded).graph.initializer if t.name.startswith(("fc1", "fc2"))}
    assert (onnx.TensorProto.INT4 if symmetric else onnx.TensorProto.UINT4) in stored
    assert _optimized_ops(folded, tmp_path) == _optimized_ops(fp32_path, tmp_path)
    # the same stored bytes; a few more nodes a layer (Cast, Mul, Reshape/Slice of the blocks; on the zoo's mlp and
    # tiny_bert the folded file is smaller: one block leaves out MatMulNBits' padding codes)
    assert folded.stat().st_size <= nbits.stat().st_size + 2 * 150
