"""Exporters: ONNX (emitted from the IR) and TorchScript, each validated against the IR's lowering."""

from slimfx.exporters._common import ExportResult, example_inputs, with_batch
from slimfx.exporters.bench import (
           LatencyStats,
           best_median_ms,
           interleaved_latency,
           measure_latency,
           ort_session,
)
from slimfx.exporters.onnx import export_onnx, register_emitter, to_onnx_model
from slimfx.exporters.torchscript import export_torchscript
from slimfx.exporters.validate import ValidationReport, validate_onnx, validate_torchscript

__all__ = ["ExportResult", "export_onnx", "to_onnx_model", "register_emitter", "validate_onnx",
           "ValidationReport", "validate_torchscript", "measure_latency", "interleaved_latency", "best_median_ms", "LatencyStats", "ort_session", "export_torchscript",
           "example_inputs", "with_batch"]
