"""Numeric gate: run an exported model and the IR's lowering (or a module) on the same inputs and compare."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from exporters._common import as_tuple, flatten_outputs
from exporters.bench import ort_feed, ort_session
from ir.graph import Graph
from ir.lower import lower


@dataclass
class ValidationReport:
    """How closely an exported model matches its reference, worst case over outputs and input sets."""

    passed: bool
    max_abs_diff: float
    max_rel_diff: float  # max |diff| / max |reference|, per output
    cosine: float  # smallest cosine similarity between flattened outputs
    sqnr_db: float  # smallest signal-to-quantization-noise ratio; inf when outputs are identical
    top1_agreement: float | None  # fraction of rows with the same argmax, for 2-D float outputs
    atol: float
    rtol: float
    batches: list[int] = field(default_factory=list)
    n_outputs: int = 0
    worst_output: str = ""

    def summary(self) -> str:
        top1 = f", top-1 agreement {self.top1_agreement:.4f}" if self.top1_agreement is not None else ""
        verdict = "pass" if self.passed else "FAIL"
        return (f"{verdict}: max abs diff {self.max_abs_diff:.3g} (atol {self.atol:g}, rtol {self.rtol:g}; "
                f"worst output {self.worst_output!r}), max rel diff {self.max_rel_diff:.3g}, "
                f"cosine {self.cosine:.6f}, SQNR {self.sqnr_db:.1f} dB{top1}, batches {self.batches}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; an infinite SQNR (identical outputs) is written as null with exact=true."""
        d = {k: getattr(self, k) for k in ("passed", "max_abs_diff", "max_rel_diff", "cosine", "sqnr_db",
                                            "top1_agreement", "atol", "rtol", "batches", "n_outputs",
                                            "worst_output")}
        d["exact"] = self.max_abs_diff == 0.0
        if not math.isfinite(d["sqnr_db"]):
            d["sqnr_db"] = None
        return d


def compare_outputs(ours: Sequence[np.ndarray], refs: Sequence[np.ndarray], names: Sequence[str], *,
                    atol: float, rtol: float) -> dict[str, Any]:
    """Error statistics of `ours` against `refs` (lists of arrays, matched by position)."""
    if len(ours) != len(refs):
        raise ValueError(f"{len(ours)} outputs vs {len(refs)} reference outputs")
    stats = dict(passed=True, max_abs_diff=0.0, max_rel_diff=0.0, cosine=1.0, sqnr_db=math.inf,
                 top1_agreement=None, worst_output="")
    worst = -1.0
    for name, o, r in zip(names, ours, refs):
        o, r = np.asarray(o), np.asarray(r)
        if o.shape != r.shape:
            stats.update(passed=False, max_abs_diff=math.inf, worst_output=name, cosine=0.0, sqnr_db=-math.inf)
            return stats
        o64, r64 = o.astype(np.float64).ravel(), r.astype(np.float64).ravel()
        if o64.size == 0:
            continue
        if not (np.isfinite(o64).all() and np.isfinite(r64).all()):
            same = np.array_equal(np.isnan(o64), np.isnan(r64)) and np.array_equal(o64[~np.isnan(o64)],
                                                                                   r64[~np.isnan(r64)])
            finite = np.isfinite(o64) & np.isfinite(r64)
            if not same and not np.allclose(o64[finite], r64[finite], atol=atol, rtol=rtol):
                stats["passed"] = False
            o64, r64 = o64[finite], r64[finite]
            if o64.size == 0:
                continue
        diff = np.abs(o64 - r64)
        mad = float(diff.max())
        if mad > worst:
            worst, stats["worst_output"] = mad, name
        stats["max_abs_diff"] = max(stats["max_abs_diff"], mad)
        stats["max_rel_diff"] = max(stats["max_rel_diff"], mad / max(float(np.abs(r64).max()), 1e-30))
        if not np.all(diff <= atol + rtol * np.abs(r64)):
            stats["passed"] = False
        no, nr = np.linalg.norm(o64), np.linalg.norm(r64)
        cos = float(o64 @ r64 / (no * nr)) if no > 0 and nr > 0 else float(no == nr)
        stats["cosine"] = min(stats["cosine"], cos)
        noise = float(diff @ diff)
        sqnr = math.inf if noise == 0 else 10 * math.log10(max(float(r64 @ r64), 1e-300) / noise)
        stats["sqnr_db"] = min(stats["sqnr_db"], sqnr)
        if stats["top1_agreement"] is None and r.ndim == 2 and np.issubdtype(r.dtype, np.floating) \
                and r.shape[1] > 1:
            stats["top1_agreement"] = float((o.argmax(1) == r.argmax(1)).mean())
    return stats


def reference_outputs(graph_or_module: Graph | torch.nn.Module, inputs: tuple) -> list[np.ndarray]:
    """Eval-mode outputs of an IR graph (through its lowering) or a module, flattened, as numpy."""
    module = lower(graph_or_module).eval() if isinstance(graph_or_module, Graph) else graph_or_module
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(*inputs)
    finally:
        module.train(was_training)
    return [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in flatten_outputs(out)]


def _input_sets(inputs: Any) -> list[tuple]:
    """One input tuple, or a list of them (several batch sizes)."""
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], (tuple, list)):
        return [as_tuple(s) for s in inputs]
    return [as_tuple(inputs)]


def merge_stats(acc: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    if acc is None:
        return dict(new)
    out = dict(acc)
    out["passed"] = acc["passed"] and new["passed"]
    if new["max_abs_diff"] > acc["max_abs_diff"]:
        out["worst_output"] = new["worst_output"]
    for k in ("max_abs_diff", "max_rel_diff"):
        out[k] = max(acc[k], new[k])
    for k in ("cosine", "sqnr_db"):
        out[k] = min(acc[k], new[k])
    if new["top1_agreement"] is not None:
        out["top1_agreement"] = new["top1_agreement"] if acc["top1_agreement"] is None else \
            min(acc["top1_agreement"], new["top1_agreement"])
    return out


def validate_onnx(model: str | os.PathLike | bytes | Any, graph_or_module: Graph | torch.nn.Module, inputs: Any, *,
                  atol: float = 1e-5, rtol: float = 1e-4, threads: int = 1) -> ValidationReport:
    """Run the ONNX model (file, bytes or ModelProto) with onnxruntime (CPU, all optimizations) and the
    reference on the same inputs (a tuple, or a list of tuples for several batch sizes); report the
    differences and whether every element is within `atol + rtol * |reference|`."""
    sess = ort_session(model, threads=threads)
    names = [o.name for o in sess.get_outputs()]
    acc = None
    batches = []
    for ins in _input_sets(inputs):
        ours = sess.run(None, ort_feed(sess, ins))
        refs = reference_outputs(graph_or_module, ins)
        acc = merge_stats(acc, compare_outputs(ours, refs, names, atol=atol, rtol=rtol))
        if ins and isinstance(ins[0], torch.Tensor) and ins[0].dim() >= 1:
            batches.append(int(ins[0].shape[0]))
    assert acc is not None
    return ValidationReport(atol=atol, rtol=rtol, batches=batches, n_outputs=len(names), **acc)
