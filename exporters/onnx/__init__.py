"""ONNX emitter: walks the IR and writes ONNX with onnx.helper, one emitter function per canonical op."""

from slimfx.exporters.onnx.context import EMITTERS, EmitContext, register_emitter
from slimfx.exporters.onnx.export import DEFAULT_OPSET, export_onnx, needed_opset, to_onnx_model

__all__ = ["EMITTERS", "EmitContext", "register_emitter", "to_onnx_model", "export_onnx", "DEFAULT_OPSET",
           "needed_opset"]
