"""The IR's quantize/dequantize/dynamic_quantize agree bit for bit with onnxruntime's kernels."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import slimfx.passes.quantize  # noqa: F401
from slimfx.ir.ops import get_op

_NP = {torch.int8: np.int8, torch.uint8: np.uint8}
_TP = {torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8}


def _run(nodes, inits, x, outputs):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.numpy()})


def _inputs(scale: torch.Tensor) -> torch.Tensor:
    """Random values plus exact ties (k + 0.5) * scale, where round-half-even and x*(1/s) vs x/s matter."""
    x = torch.randn(4, 3, 80, generator=torch.Generator().manual_seed(0)) * 3
    s = scale.reshape(-1, 1) if scale.dim() else scale
    x[0] = (torch.arange(-40, 40, dtype=torch.float32) + 0.5) * s
    x[1] = torch.arange(-40, 40, dtype=torch.float32) * s * 1.37
    return x


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_dequantize_match_onnxruntime(dtype, per_channel):
    scale = torch.tensor([0.0137, 0.1, 0.0071]) if per_channel else torch.tensor(0.0213)
    zp = (torch.tensor([3, -7, 0]) if dtype == torch.int8 else torch.tensor([128, 120, 3])) if per_channel \
        else torch.tensor(5 if dtype == torch.int8 else 130)
    zp = zp.to(dtype)
    axis = 1 if per_channel else None
    x = _inputs(scale)
    inits = [numpy_helper.from_array(scale.numpy(), "s"), numpy_helper.from_array(zp.numpy().astype(_NP[dtype]), "z")]
    kw = {"axis": 1} if per_channel else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **kw),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **kw)]
    outs = [helper.make_tensor_value_info("q", _TP[dtype], list(x.shape)),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))]
    q_ort, y_ort = _run(nodes, inits, x, outs)
    q = get_op("quantize").impl(x, scale, zp, dtype=dtype, axis=axis)
    y = get_op("dequantize").impl(q, scale, zp, axis=axis)
    assert q.dtype == dtype
    np.testing.assert_array_equal(q.numpy(), q_ort)
    np.testing.assert_array_equal(y.numpy(), y_ort)


def test_dynamic_quantize_matches_onnxruntime():
    x = torch.randn(8, 33, generator=torch.Generator().manual_seed(1)) * 2 + 0.3
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])]
    outs = [helper.make_tensor_value_info("q", TensorProto.UINT8, list(x.shape)),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("z", TensorProto.UINT8, [])]
    q_ort, s_ort, z_ort = _run(nodes, [], x, outs)
    q, s, z = get_op("dynamic_quantize").impl(x)
    assert float(s) == pytest.approx(float(s_ort), rel=1e-6)
    assert int(z) == int(z_ort)
    np.testing.assert_array_equal(q.numpy(), q_ort)
