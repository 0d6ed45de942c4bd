"""Shared checks for the pruning tests: exact removal of dead units, and ONNX round trips."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from slimfx import ir
from slimfx.passes.prune.groups import Dependencies


def kill_units(graph: ir.Graph, deps: Dependencies, units: set[int]) -> None:
    """Zero what *produces* the given units (source weight rows, biases, norm scales), in place.

    Afterwards those channels carry exact zeros everywhere, so removing them must not change
    the graph's output: the strongest check that the analysis found every dependent tensor.
    """
    space_nodes = {s.node for s in deps.spaces}
    for (name, axis), m in deps.members.items():
        idx = [i for i, lab in enumerate(m.labels.tolist()) if int(deps.roots[lab]) in units]
        if not idx:
            continue
        node = graph.node(m.node)
        producer = m.node in space_nodes and ((node.op == "embedding" and axis == 1) or
                                              (node.op != "embedding" and axis == 0))
        if (m.role in ("weight", "other") and producer) or m.role in ("bias", "norm"):
            t = graph.params[name]
            t.index_fill_(axis, torch.tensor(idx), 0.0)


def export_and_validate(graph: ir.Graph, inputs: tuple, atol: float = 1e-4) -> float:
    """Export to ONNX (the project's exporter when present) and compare onnxruntime with ir.lower."""
    import onnxruntime as ort

    with torch.no_grad():
        ref = ir.lower(graph).eval()(*inputs)
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        try:
            from slimfx.exporters import export_onnx
        except ImportError:
            export_onnx = None
        if export_onnx is not None:
            export_onnx(graph, path, inputs=inputs)
        else:
            torch.onnx.export(ir.lower(graph).eval(), inputs, str(path), dynamo=False,
                              input_names=[f"in{i}" for i in range(len(inputs))])
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs, strict=False)}
        out = sess.run(None, feed)[0]
    diff = float(np.abs(out - ref.numpy()).max())
    assert diff <= atol * max(1.0, float(ref.abs().max())), f"onnxruntime differs from the graph by {diff}"
    return diff
