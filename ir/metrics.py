"""How close one model's outputs are to another's: one set of metrics and conventions for the project.

Every output of a model is compared (tensors nested in tuples, lists and dicts, each named by its
place: `output`, `output[1]`, `output['logits']`). Per output, accumulated over batches:

- max_abs_diff, max_rel_diff (max |diff| / max |reference|), cosine similarity,
- sqnr_db = 10 log10(sum ref^2 / sum diff^2); identical outputs give +inf (JSON: null, with exact=true),
- top1_agreement: fraction of rows with the same argmax, for float outputs shaped [batch, classes] or
  [batch, tokens, classes] (SHAPE_RULE); None for other shapes, unless the caller says where an output's
  classes are (`Comparison(class_dims=...)`, from the graph: ir.analysis.output_class_dims): dim 1 of a
  channels-first dense prediction (each pixel's class), or None (no classes: a mask, a waveform),
- nonfinite: elements where exactly one side is NaN/Inf or both are but differ. Any such element fails
  every check that reads these numbers (`Comparison.trustworthy`): NaN never scores as perfect.

The worst output decides: the smallest agreement and SQNR and the largest differences.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["OutputStats", "Comparison", "named_leaves", "sqnr_db", "tensor_sqnr_db", "compare", "check_close",
           "sqnr_ceiling_db", "ACCURACY_DROP_LIMIT", "accuracy_drop_problem", "SHAPE_RULE"]

# an output's classes are on its last dim when it is shaped [batch, classes] / [batch, tokens, classes]
SHAPE_RULE = "shape"

# The most SQNR two float computations of one model in this dtype can be expected to share: rounding in
# another order already costs about this much (fp16 cleanup measured 68-79 dB on random nets).
SQNR_CEILING_DB = {torch.float16: 60.0, torch.bfloat16: 40.0}


#: `max_accuracy_drop` is a fraction of accuracy everywhere ([validate], [tune], quantize's option): 0.003 is 0.3
#: points. A value this large or larger (10 points) is refused, as what writing points instead would give
#: (0.3 meant as 0.3 points would silently allow losing 30 points).
ACCURACY_DROP_LIMIT = 0.1


def accuracy_drop_problem(value: float) -> str | None:
    """What is wrong with a `max_accuracy_drop` value (already a number in [0, 1]), or None: the one rule for
    every place the key exists."""
    if value < ACCURACY_DROP_LIMIT:
        return None
    return (f"is {value:g}, a fraction of accuracy: {value:g} allows losing {100 * value:g} points. It is not in "
            f"points: for {value:g} points write {value / 100:g}. A value of {ACCURACY_DROP_LIMIT:g} "
            f"({100 * ACCURACY_DROP_LIMIT:g} points) or more is refused: it is most likely points written where "
            "a fraction belongs")


def sqnr_ceiling_db(dtype: torch.dtype) -> float:
    """A numeric gate's SQNR threshold is capped at this for a model computing in `dtype` (inf for fp32)."""
    return SQNR_CEILING_DB.get(dtype, math.inf)


def named_leaves(value: Any, prefix: str = "output") -> Iterator[tuple[str, Any]]:
    """(name, leaf) for every leaf of a nested tuple/list/dict output, in order."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from named_leaves(v, f"{prefix}[{k!r}]")
    elif isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        for i, v in enumerate(value):
            yield from named_leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, value


def sqnr_db(signal_energy: float, noise_energy: float) -> float:
    """Signal-to-quantization-noise ratio in dB; +inf when there is no noise."""
    if noise_energy == 0:
        return math.inf
    return 10 * math.log10(max(signal_energy, 1e-300) / noise_energy)


def tensor_sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """SQNR of one tensor against a reference (in float64); +inf when they are equal."""
    r, c = reference.detach().double(), candidate.detach().double()
    return sqnr_db(float((r * r).sum()), float(((r - c) ** 2).sum()))


@dataclass
class OutputStats:
    """Accumulated comparison of one output (see the module docstring)."""

    name: str
    numel: int = 0
    max_abs_diff: float = 0.0
    max_abs_reference: float = 0.0
    nonfinite: int = 0
    signal: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    cand_energy: float = 0.0
    top1_same: int = 0
    top1_rows: int = 0
    shape_mismatch: str | None = None
    shape: tuple[int, ...] | None = None  # the last batch's
    float_numel: int = 0  # floating-point elements seen
    compared: int = 0  # of those, finite on both sides (what the numbers above are about)

    @property
    def max_rel_diff(self) -> float:
        return self.max_abs_diff / self.max_abs_reference if self.max_abs_reference > 0 else \
            (0.0 if self.max_abs_diff == 0 else math.inf)

    @property
    def sqnr_db(self) -> float:
        return -math.inf if self.shape_mismatch else sqnr_db(self.signal, self.noise)

    @property
    def cosine(self) -> float:
        if self.shape_mismatch:
            return 0.0
        denom = math.sqrt(self.signal * self.cand_energy)
        return self.dot / denom if denom > 0 else float(self.signal == self.cand_energy)

    @property
    def top1_agreement(self) -> float | None:
        return self.top1_same / self.top1_rows if self.top1_rows else None

    def update(self, ref: torch.Tensor, cand: torch.Tensor, class_dim: int | str | None = SHAPE_RULE) -> None:
        self.shape = tuple(ref.shape)
        if tuple(ref.shape) != tuple(cand.shape):
            self.shape_mismatch = f"shape {list(cand.shape)} instead of {list(ref.shape)}"
            return
        r, c = ref.detach().double().reshape(-1), cand.detach().double().reshape(-1)
        self.numel += r.numel()
        if not r.is_floating_point() or r.numel() == 0:
            return
        fr, fc = torch.isfinite(r), torch.isfinite(c)
        both_nonfinite_same = ~fr & ~fc & ((r == c) | (torch.isnan(r) & torch.isnan(c)))
        self.nonfinite += int((~(fr & fc) & ~both_nonfinite_same).sum())
        ok = fr & fc
        self.float_numel, self.compared = self.float_numel + r.numel(), self.compared + int(ok.sum())
        r, c = r[ok], c[ok]
        if r.numel():
            d = r - c
            self.max_abs_diff = max(self.max_abs_diff, float(d.abs().max()))
            self.max_abs_reference = max(self.max_abs_reference, float(r.abs().max()))
            self.signal += float(r @ r)
            self.noise += float(d @ d)
            self.dot += float(r @ c)
            self.cand_energy += float(c @ c)
        scored = ref.dim() in (2, 3) and ref.shape[-1] > 1 if class_dim == SHAPE_RULE else \
            class_dim is not None and ref.dim() > class_dim and ref.shape[class_dim] > 1
        if scored and ref.is_floating_point():
            dim = -1 if class_dim == SHAPE_RULE else class_dim
            same = ref.detach().argmax(dim) == cand.detach().argmax(dim)
            self.top1_same += int(same.sum())
            self.top1_rows += same.numel()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: an infinite SQNR (identical outputs) is null with exact=true."""
        sq = self.sqnr_db
        return {"name": self.name, "max_abs_diff": self.max_abs_diff, "max_rel_diff": _finite_or_none(self.max_rel_diff),
                "cosine": self.cosine, "sqnr_db": _finite_or_none(sq), "exact": self.noise == 0 and
                not self.nonfinite and not self.shape_mismatch, "top1_agreement": self.top1_agreement,
                "nonfinite": self.nonfinite, **({"shape_mismatch": self.shape_mismatch} if self.shape_mismatch
                                                 else {})}


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


@dataclass
class Comparison:
    """Compare every output of a candidate with a reference, batch by batch (`update`)."""

    outputs: dict[str, OutputStats] = field(default_factory=dict)
    samples: int = 0
    structure_error: str | None = None
    class_dims: dict[str, int | str | None] = field(default_factory=dict)  # per output name; else SHAPE_RULE

    def update(self, reference: Any, candidate: Any) -> None:
        """Compare one batch. Leaves are matched by position (the candidate may be a flat list, as
        onnxruntime returns); names come from the reference's structure."""
        refs, cands = list(named_leaves(reference)), list(named_leaves(candidate))
        if len(refs) != len(cands):
            self.structure_error = (f"the compiled model returns {len(cands)} outputs, the original "
                                    f"{len(refs)} ({', '.join(n for n, _ in refs)})")
            return
        for (name, r), (_, c) in zip(refs, cands):
            stats = self.outputs.setdefault(name, OutputStats(name))
            if isinstance(r, torch.Tensor) and isinstance(c, torch.Tensor):
                stats.update(r, c, self.class_dims.get(name, SHAPE_RULE))
            elif isinstance(r, torch.Tensor) != isinstance(c, torch.Tensor) or r != c:
                stats.shape_mismatch = f"{c!r} instead of {r!r}"
        first = next((r for _, r in refs if isinstance(r, torch.Tensor) and r.dim() > 0), None)
        self.samples += int(first.shape[0]) if first is not None else 1

    # -- the worst output decides ----------------------------------------------------------------------
    @property
    def trustworthy(self) -> str | None:
        """None when the numbers mean something; else why not (NaN/Inf, shapes, structure)."""
        if self.structure_error:
            return self.structure_error
        if not self.outputs:
            return "nothing was compared"
        for s in self.outputs.values():
            if s.shape_mismatch:
                return f"{s.name} has {s.shape_mismatch}"
            if s.nonfinite:
                return f"{s.name} has {s.nonfinite} NaN/Inf values where the original has finite ones (or differs)"
            if s.float_numel and not s.compared:
                return (f"{s.name} is NaN/Inf in every position in the original model, so nothing of it could be "
                        "compared; check that the model (and the data) give finite outputs")
        return None

    @property
    def max_abs_diff(self) -> float:
        return max((s.max_abs_diff for s in self.outputs.values()), default=0.0)

    @property
    def sqnr_db(self) -> float:
        return min((s.sqnr_db for s in self.outputs.values()), default=math.inf)

    @property
    def top1_agreement(self) -> float | None:
        vals = [s.top1_agreement for s in self.outputs.values() if s.top1_agreement is not None]
        return min(vals) if vals else None

    @property
    def worst_output(self) -> str:
        return min(self.outputs.values(), key=lambda s: s.sqnr_db).name if self.outputs else ""

    def to_dict(self) -> dict[str, Any]:
        problem = self.trustworthy
        return {"max_abs_diff": self.max_abs_diff, "top1_agreement": self.top1_agreement,
                "sqnr_db": _finite_or_none(self.sqnr_db),
                "exact": problem is None and all(s.noise == 0 for s in self.outputs.values()),
                "samples": self.samples, "worst_output": self.worst_output, "problem": problem,
                "outputs": [s.to_dict() for s in self.outputs.values()]}


def compare(reference: Any, candidate: Any) -> Comparison:
    """One-shot comparison of two (nested) outputs."""
    c = Comparison()
    c.update(reference, candidate)
    return c


def check_close(reference: Any, candidate: Any, tol: float) -> str | None:
    """None when every output of `candidate` matches `reference` within `tol`, else what differs (the first).

    Float outputs: max |a - b| must be at most tol x max(max |reference|, 1e-6), relative to the output's
    magnitude (so the check means the same for logits of size 1 and of size 1000); NaN and Inf must stay
    where they are. Other outputs (integers, Python values) and every dtype and shape must be equal.
    """
    refs, cands = list(named_leaves(reference)), list(named_leaves(candidate))
    if len(refs) != len(cands):
        return f"the graph now returns {len(cands)} values instead of {len(refs)}"
    for (name, a), (_, b) in zip(refs, cands):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.shape != b.shape or a.dtype != b.dtype:
                return f"{name} is now {b.dtype}{list(b.shape)}, was {a.dtype}{list(a.shape)}"
            if not a.is_floating_point():
                if not torch.equal(a, b):
                    return f"{name} (integer) changed in {int((a != b).sum())} elements"
                continue
            s = OutputStats(name)
            s.update(a, b)
            if s.nonfinite:
                return f"{name} has NaN/Inf in {s.nonfinite} positions where it had none (or other ones)"
            scale = max(s.max_abs_reference, 1e-6)
            if s.max_abs_diff > tol * scale:
                return (f"{name} max abs diff {s.max_abs_diff:.3g} exceeds {tol:g} x output magnitude {scale:.3g} "
                        f"(relative error {s.max_abs_diff / scale:.3g})")
        elif isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor) or a != b:
            return f"{name} changed from {a!r} to {b!r}"
    return None
