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
from slimfx.ir.errors import ValidationError
from slimfx.ir.graph import Graph
from slimfx.ir.lower import lower
from slimfx.ir.metrics import OutputStats


@dataclass
class ValidationReport:
    """How closely an exported model matches its reference, worst case over outputs and input sets.

    An element passes when |ours - reference| <= atol' * max(1, scale) + rtol' * |reference|, where
    scale is the output's largest finite |reference| (so atol is absolute for outputs up to 1 and
    relative to the output's magnitude beyond: float32 rounding grows with it) and atol', rtol' are
    atol, rtol raised to the output dtype's precision (float16 and bfloat16 outputs are compared at their
    precision). Integer and bool outputs must be equal; NaN or Inf where the reference has none (or
    the other way round) fails; a report that compared no value fails.
    """

    passed: bool
    max_abs_diff: float
    max_rel_diff: float  # max |diff| / max |reference|, per output
    cosine: float  # smallest cosine similarity between flattened outputs
    sqnr_db: float  # smallest signal-to-quantization-noise ratio; inf when outputs are identical
    top1_agreement: float | None  # smallest fraction of rows with the same argmax, over 2-D float outputs
    atol: float
    rtol: float
    batches: list[int] = field(default_factory=list)
    n_outputs: int = 0
    worst_output: str = ""
    failure: str = ""  # the first check that failed, naming the output ("" when passed)
    integer_failure: bool = False  # that check compared integer values, exactly: atol/rtol do not apply
    compared: int = 0  # values compared, over all outputs and input sets

    def summary(self) -> str:
        top1 = f", top-1 agreement {self.top1_agreement:.4f}" if self.top1_agreement is not None else ""
        verdict = "pass" if self.passed else f"FAIL ({self.failure})" if self.failure else "FAIL"
        return (f"{verdict}: max abs diff {self.max_abs_diff:.3g} (atol {self.atol:g}, rtol {self.rtol:g}; "
                f"worst output {self.worst_output!r}), max rel diff {self.max_rel_diff:.3g}, "
                f"cosine {self.cosine:.6f}, SQNR {self.sqnr_db:.1f} dB{top1}, batches {self.batches}")

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON dict: non-finite numbers are written as null (an infinite SQNR, identical outputs,
        with exact=true)."""
        d = {k: getattr(self, k) for k in ("passed", "max_abs_diff", "max_rel_diff", "cosine", "sqnr_db",
                                            "top1_agreement", "atol", "rtol", "batches", "n_outputs",
                                            "worst_output", "failure", "compared")}
        d["exact"] = self.passed and self.max_abs_diff == 0.0
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None
        return d


# numpy has no bfloat16; ml_dtypes (an onnx dependency) gives it one, so bfloat16 outputs keep their dtype
try:
    from ml_dtypes import bfloat16 as _bfloat16

    BFLOAT16: np.dtype | None = np.dtype(_bfloat16)
except ImportError:  # pragma: no cover - onnx requires ml_dtypes
    BFLOAT16 = None

# Precision (machine epsilon) of the low-precision float dtypes; their outputs are compared at a multiple
# of it (torch and onnxruntime round each op's float16 result, and those roundings add up).
LOW_PRECISION = {np.dtype(np.float16): 2.0 ** -10, **({BFLOAT16: 2.0 ** -7} if BFLOAT16 is not None else {})}
LOW_PRECISION_ULPS = 4


def is_float(dtype: np.dtype) -> bool:
    """A float dtype, bfloat16 included (numpy does not count ml_dtypes' bfloat16 as np.floating)."""
    return np.issubdtype(dtype, np.floating) or dtype == BFLOAT16


def tolerances(dtype: np.dtype, atol: float, rtol: float) -> tuple[float, float]:
    """(atol, rtol) for outputs of `dtype`: the given ones, raised to the dtype's precision."""
    eps = LOW_PRECISION.get(np.dtype(dtype))
    if eps is None:
        return atol, rtol
    return max(atol, LOW_PRECISION_ULPS * eps), max(rtol, LOW_PRECISION_ULPS * eps)


def _nonfinite_problem(o: np.ndarray, r: np.ndarray) -> str:
    """What differs in the NaN/Inf positions of `o` and reference `r` ("" when they agree)."""
    nan_o, nan_r = np.isnan(o), np.isnan(r)
    if not np.array_equal(nan_o, nan_r):
        extra, missing = int((nan_o & ~nan_r).sum()), int((nan_r & ~nan_o).sum())
        return (f"NaN in {extra} value(s) where the reference has none" if extra else
                f"no NaN in {missing} value(s) where the reference has NaN")
    inf_o, inf_r = np.isinf(o), np.isinf(r)
    if not np.array_equal(inf_o, inf_r) or not np.array_equal(o[inf_o], r[inf_r]):
        return f"Inf in {int((inf_o != inf_r).sum() or (o[inf_o] != r[inf_r]).sum())} value(s) that differ"
    return ""


def compare_outputs(ours: Sequence[np.ndarray], refs: Sequence[np.ndarray], names: Sequence[str], *,
                    atol: float, rtol: float) -> dict[str, Any]:
    """Error statistics of `ours` against `refs` (lists of arrays, matched by position); see
    ValidationReport for the pass rule."""
    stats: dict[str, Any] = dict(passed=True, max_abs_diff=0.0, max_rel_diff=0.0, cosine=1.0, sqnr_db=math.inf,
                                 top1_agreement=None, worst_output="", failure="", compared=0,
                                 integer_failure=False)

    def fail(name: str, why: str) -> None:
        if stats["passed"]:
            stats.update(passed=False, failure=f"{name}: {why}")

    if len(ours) != len(refs):
        stats.update(passed=False, max_abs_diff=math.inf, cosine=0.0, sqnr_db=-math.inf,
                     failure=f"the export returns {len(ours)} outputs, the model {len(refs)}")
        return stats
    worst = -1.0
    for name, o, r in zip(names, ours, refs):
        o, r = np.asarray(o), np.asarray(r)
        if o.shape != r.shape:
            stats.update(max_abs_diff=math.inf, worst_output=name, cosine=0.0, sqnr_db=-math.inf)
            fail(name, f"shape {list(o.shape)} where the reference is {list(r.shape)}")
            continue
        exact = not (is_float(r.dtype) and is_float(o.dtype))
        o64, r64 = o.astype(np.float64).ravel(), r.astype(np.float64).ravel()
        stats["compared"] += o64.size
        if o64.size == 0:
            continue
        problem = _nonfinite_problem(o64, r64)
        if problem:
            stats.update(max_abs_diff=math.inf, worst_output=name, cosine=0.0, sqnr_db=-math.inf)
            fail(name, problem)
            continue
        finite = np.isfinite(r64)
        o64, r64 = o64[finite], r64[finite]
        if o64.size == 0:
            continue
        diff = np.abs(o64 - r64)
        scale = float(np.abs(r64).max())
        if exact:
            if diff.max() > 0:
                stats["integer_failure"] = stats["integer_failure"] or stats["passed"]
                fail(name, f"{int((diff > 0).sum())} of {diff.size} {o.dtype} values differ (integer outputs are "
                           "compared exactly)")
        else:
            a, rt = tolerances(min(o.dtype, r.dtype, key=lambda d: d.itemsize), atol, rtol)
            bound = a * max(scale, 1.0) + rt * np.abs(r64)
            over = diff > bound
            if over.any():
                i = int(np.argmax(diff - bound))
                fail(name, f"{int(over.sum())} of {diff.size} values off by more than atol {a:g} x "
                           f"max(1, scale {scale:.3g}) + rtol {rt:g} x |value| (e.g. {o64[i]:.6g} where the "
                           f"reference is {r64[i]:.6g})")
        out = OutputStats(name)  # the numbers, by the project's one convention (slimfx.ir.metrics)
        out.update(torch.from_numpy(r.astype(np.float64)), torch.from_numpy(o.astype(np.float64)))
        if out.max_abs_diff > worst:
            worst, stats["worst_output"] = out.max_abs_diff, name
        stats["max_abs_diff"] = max(stats["max_abs_diff"], out.max_abs_diff)
        stats["max_rel_diff"] = max(stats["max_rel_diff"], out.max_rel_diff)
        stats["cosine"] = min(stats["cosine"], out.cosine)
        stats["sqnr_db"] = min(stats["sqnr_db"], out.sqnr_db)
        if out.top1_agreement is not None and is_float(r.dtype):
            prev = stats["top1_agreement"]
            stats["top1_agreement"] = out.top1_agreement if prev is None else min(prev, out.top1_agreement)
    return stats


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array of its own dtype (bfloat16 as ml_dtypes' bfloat16: the same bits)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BFLOAT16) if BFLOAT16 is not None else t.float().numpy()
    return t.numpy()


def _to_numpy(out: Any) -> list[np.ndarray]:
    """Flattened outputs as numpy arrays."""
    return [tensor_to_numpy(t) if isinstance(t, torch.Tensor) else np.asarray(t) for t in flatten_outputs(out)]


def reference_fn(graph_or_module: Graph | torch.nn.Module) -> Callable[[tuple], list[np.ndarray]]:
    """A function computing eval-mode outputs (flattened, numpy) of an IR graph (through its lowering)
    or a module (its train/eval mode is restored after each call)."""
    run = _reference(graph_or_module)
    return lambda inputs: [a for _, a in run(inputs)]


def _reference(graph_or_module: Graph | torch.nn.Module) -> Callable[[tuple], list[tuple[str, np.ndarray]]]:
    """reference_fn's outputs with their places in the output structure (`output[1]['score']`)."""
    from slimfx.ir.metrics import named_leaves

    module = lower(graph_or_module).eval() if isinstance(graph_or_module, Graph) else graph_or_module

    def run(inputs: tuple) -> list[tuple[str, np.ndarray]]:
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                return [(name, tensor_to_numpy(t) if isinstance(t, torch.Tensor) else np.asarray(t))
                        for name, t in named_leaves(module(*inputs))]
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
    out["failure"] = acc["failure"] or new["failure"]
    out["integer_failure"] = acc["integer_failure"] if acc["failure"] else new["integer_failure"]
    out["compared"] = acc["compared"] + new["compared"]
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


def _names(ours: list[str], given: Sequence[str] | None) -> list[str]:
    """Names of the flattened outputs for messages: the reference's own (output, output[1], output['logits']),
    with the exported file's name where that differs."""
    if given is None or len(given) != len(ours):
        return ours
    return [a if a == b else f"{a} ('{b}' in the file)" for a, b in zip(ours, given)]


def validate_outputs(run: Callable[[tuple], Sequence[np.ndarray]], graph_or_module: Graph | torch.nn.Module,
                     inputs: Any, *, atol: float = 1e-5, rtol: float = 1e-4,
                     names: Sequence[str] | None = None) -> ValidationReport:
    """Compare `run(inputs)` (an exported model's flattened outputs) with the reference on each input set."""
    ref = _reference(graph_or_module)
    acc = None
    batches = []
    n_out = 0
    for ins in input_sets(inputs):
        ours = [np.asarray(o) for o in run(ins)]
        named = ref(ins)
        refs = [a for _, a in named]
        n_out = len(refs)
        acc = merge_stats(acc, compare_outputs(ours, refs, _names([k for k, _ in named], names),
                                               atol=atol, rtol=rtol))
        if ins and isinstance(ins[0], torch.Tensor) and ins[0].dim() >= 1:
            batches.append(int(ins[0].shape[0]))
    if acc is None:
        raise ValidationError("validation was given no inputs to run the model on")
    if acc["passed"] and acc["compared"] == 0:
        acc.update(passed=False, failure="no values were compared (every output is empty)")
    return ValidationReport(atol=atol, rtol=rtol, batches=batches, n_outputs=n_out, **acc)


def validate_onnx(model: str | os.PathLike | bytes | Any, graph_or_module: Graph | torch.nn.Module, inputs: Any, *,
                  atol: float = 1e-5, rtol: float = 1e-4, threads: int = 1) -> ValidationReport:
    """Run the ONNX model (file, bytes or ModelProto) with onnxruntime (CPU, all optimizations) and the
    reference on the same inputs (a tuple, or a list of tuples for several batch sizes); report the
    differences and whether every element is within `atol + rtol * |reference|`."""
    sess = ort_session(model, threads=threads)
    names = [o.name for o in sess.get_outputs()]

    def run(ins: tuple) -> list:
        try:
            return sess.run(None, ort_feed(sess, ins))
        except Exception as e:  # noqa: BLE001 - onnxruntime's exception types (Fail, InvalidArgument, ...)
            if not type(e).__module__.startswith("onnxruntime"):
                raise
            what = graph_or_module.name if isinstance(graph_or_module, Graph) else type(graph_or_module).__name__
            sizes = ", ".join(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" if isinstance(t, torch.Tensor)
                              else repr(t) for t in ins)
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise ValidationError(
                f"onnxruntime cannot run the ONNX file of {what} on inputs ({sizes}): "
                f"{first}. A file slimfx wrote that fails so is a bug in its ONNX exporter (please report it with "
                "the model); meanwhile keep those sizes fixed (`--fixed-batch` or `--dynamic-dims none` of "
                "`slimfx export` and `slimfx compile`, dynamic_batch=False / dynamic_dims= in Python) or export "
                "TorchScript (`--format torchscript`)") from e
    return validate_outputs(run, graph_or_module, inputs, atol=atol, rtol=rtol, names=names)


def validate_torchscript(path: str | os.PathLike, graph_or_module: Graph | torch.nn.Module, inputs: Any, *,
                         atol: float = 1e-5, rtol: float = 1e-4) -> ValidationReport:
    """Load a saved TorchScript module and compare it with the reference like `validate_onnx`."""
    loaded = torch.jit.load(str(path), map_location="cpu").eval()

    def run(ins: tuple) -> list[np.ndarray]:
        with torch.no_grad():
            return _to_numpy(loaded(*ins))
    return validate_outputs(run, graph_or_module, inputs, atol=atol, rtol=rtol)


def validate_pt2(path: str | os.PathLike, graph_or_module: Graph | torch.nn.Module, inputs: Any, *,
                 atol: float = 1e-5, rtol: float = 1e-4) -> ValidationReport:
    """Load a saved torch.export program (torch.export.load) and compare it with the reference like
    `validate_onnx`."""
    from slimfx.exporters.pt2 import load_pt2

    loaded = load_pt2(path)

    def run(ins: tuple) -> list[np.ndarray]:
        with torch.no_grad():
            return _to_numpy(loaded(*ins))
    return validate_outputs(run, graph_or_module, inputs, atol=atol, rtol=rtol)
