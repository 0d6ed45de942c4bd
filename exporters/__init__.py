"""Exporters: ONNX (emitted from the IR), TorchScript, torch.export (.pt2) and the slimfx model file
(.slimfx), each validated against the IR's lowering."""

from slimfx.exporters._common import ExportResult, example_inputs, with_batch
from slimfx.exporters.bench import (
    LatencyStats,
    LatencySummary,
    best_median_ms,
    graph_latency_ms,
    interleaved_latency,
    latency_side_by_side,
    measure_latency,
    ort_session,
    unmeasured_inputs,
)
from slimfx.exporters.onnx import export_onnx, register_emitter, to_onnx_model
from slimfx.exporters.pt2 import export_pt2, load_pt2
from slimfx.exporters.slimfx_file import export_slimfx
from slimfx.exporters.torchscript import export_torchscript
from slimfx.exporters.validate import ValidationReport, validate_onnx, validate_pt2, validate_torchscript

__all__ = ["ExportResult", "export_onnx", "to_onnx_model", "register_emitter", "validate_onnx",
           "ValidationReport", "validate_torchscript", "measure_latency", "interleaved_latency",
           "latency_side_by_side", "unmeasured_inputs", "graph_latency_ms", "LatencySummary", "best_median_ms",
           "LatencyStats", "ort_session",
           "export_torchscript", "example_inputs", "with_batch", "export_pt2", "load_pt2", "validate_pt2",
           "export_slimfx"]
