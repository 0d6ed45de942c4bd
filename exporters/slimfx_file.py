"""The slimfx model file as an export format: `ir.Graph.save` (IR text, safetensors weights, JSON
metadata; see ir/serialize.py), validated like the other formats by reading it back and comparing the
reloaded graph's lowering with the graph's: they must agree bit for bit."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from slimfx.exporters._common import (
    ExportResult,
    as_tuple,
    atomic_path,
    example_inputs,
    raise_if_invalid,
    validation_sets,
)
from slimfx.ir.graph import Graph
from slimfx.ir.lower import lower
from slimfx.ir.serialize import load_graph, save_graph


def export_slimfx(graph: Graph, path: str | os.PathLike, *, inputs: Any = None, validate: bool = True,
                  keep_invalid: bool = False, metadata: dict[str, Any] | None = None, **_tolerances: Any
                  ) -> ExportResult:
    """Write `graph` as a .slimfx file and check that reading it back gives a graph whose outputs are
    identical (atol = rtol = 0) on the inputs at two batch sizes. Tolerances are accepted and ignored: a
    saved model must be exact."""
    from slimfx.exporters.validate import validate_outputs

    t0 = time.perf_counter()
    inputs = as_tuple(inputs) if inputs is not None else example_inputs(graph)
    path = Path(path)
    report = None
    with atomic_path(path, keep_on_error=keep_invalid) as tmp:
        save_graph(graph, tmp, metadata=metadata)
        if validate:
            reloaded = lower(load_graph(tmp)).eval()
            report = validate_outputs(lambda ins: _run(reloaded, ins), graph, validation_sets(inputs),
                                      atol=0.0, rtol=0.0)
            raise_if_invalid(report, f"the slimfx model file of {graph.name}", keep_invalid)
        size = tmp.stat().st_size
    return ExportResult(path=path, validation=report, seconds=time.perf_counter() - t0, format="slimfx",
                        size_bytes=size, details={"params": len(graph.params), "nodes": len(graph)})


def _run(module: Any, ins: tuple) -> list:
    import torch

    from slimfx.exporters.validate import _to_numpy

    with torch.no_grad():
        return _to_numpy(module(*ins))


__all__ = ["export_slimfx"]
