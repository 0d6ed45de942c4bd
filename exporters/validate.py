"""Numeric gate: run an exported model and the IR's lowering (or a module) on the same inputs and compare."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from slimfx.exporters._common import as_tuple, flatten_outputs
from slimfx.exporters.bench import ort_feed, ort_session
from slimfx.ir.graph import Graph
from slimfx.ir.lower import lower


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


def _to_numpy(out: Any) -> list[np.ndarray]:
    return [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in flatten_outputs(out)]


def reference_fn(graph_or_module: Graph | torch.nn.Module) -> Callable[[tuple], list[np.ndarray]]:
    """A function computing eval-mode outputs (flattened, numpy) of an IR graph (through its lowering)
    or a module (its train/eval mode is restored after each call)."""
    module = lower(graph_or_module).eval() if isinstance(graph_or_module, Graph) else graph_or_module

    def run(inputs: tuple) -> list[np.ndarray]:
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                return _to_numpy(module(*inputs))
        finally:
            module.train(was_training)
    return run


def input_sets(inputs: Any) -> list[tuple]:
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


def validate_outputs(run: Callable[[tuple], Sequence[np.ndarray]], graph_or_module: Graph | torch.nn.Module,
                     inputs: Any, *, atol: float = 1e-5, rtol: float = 1e-4,
                     names: Sequence[str] | None = None) -> ValidationReport:
    """Compare `run(inputs)` (an exported model's flattened outputs) with the reference on each input set."""
    ref = reference_fn(graph_or_module)
    acc = None
    batches = []
    n_out = 0
    for ins in input_sets(inputs):
        ours = [np.asarray(o) for o in run(ins)]
        refs = ref(ins)
        n_out = len(ours)
        out_names = list(names) if names is not None else (
            ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)])
        acc = merge_stats(acc, compare_outputs(ours, refs, out_names, atol=atol, rtol=rtol))
        if ins and isinstance(ins[0], torch.Tensor) and ins[0].dim() >= 1:
            batches.append(int(ins[0].shape[0]))
    if acc is None:
        raise ValueError("no inputs to validate with")
    return ValidationReport(atol=atol, rtol=rtol, batches=batches, n_outputs=n_out, **acc)


def validate_onnx(model: str | os.PathLike | bytes | Any, graph_or_module: Graph | torch.nn.Module, inputs: Any, *,
                  atol: float = 1e-5, rtol: float = 1e-4, threads: int = 1) -> ValidationReport:
    """Run the ONNX model (file, bytes or ModelProto) with onnxruntime (CPU, all optimizations) and the
    reference on the same inputs (a tuple, or a list of tuples for several batch sizes); report the
    differences and whether every element is within `atol + rtol * |reference|`."""
    sess = ort_session(model, threads=threads)
    names = [o.name for o in sess.get_outputs()]
    return validate_outputs(lambda ins: sess.run(None, ort_feed(sess, ins)), graph_or_module, inputs,
                            atol=atol, rtol=rtol, names=names)


def validate_torchscript(path: str | os.PathLike, graph_or_module: Graph | torch.nn.Module, inputs: Any, *,
                         atol: float = 1e-5, rtol: float = 1e-4) -> ValidationReport:
    """Load a saved TorchScript module and compare it with the reference like `validate_onnx`."""
    loaded = torch.jit.load(str(path), map_location="cpu").eval()

    def run(ins: tuple) -> list[np.ndarray]:
        with torch.no_grad():
            return _to_numpy(loaded(*ins))
    return validate_outputs(run, graph_or_module, inputs, atol=atol, rtol=rtol)
