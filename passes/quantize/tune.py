"""Accuracy-budget tuning: which layers stay float, under a budget, in a bounded number of full evaluations.

The budget is an accuracy drop on the user's validation data (`max_accuracy_drop`, a fraction: 0.003 is 0.3
points; needs `ctx.eval_fn`) and/or an output SQNR floor against the float model on the calibration data
(`min_sqnr_db`). A "full evaluation" is one call of `ctx.eval_fn` (or, for an SQNR-only budget, one
whole-model SQNR measurement); the tuner makes at most `tune_evaluations` of them, the float baseline included.

1. Quantize everything (plain int8) and evaluate it. Within budget: done.
2. Rank the layers, cheaply (no evaluation): the output noise each adds when it alone is quantized
   (`layer_sensitivity`: noise-to-signal 10^(-SQNR/10) on calibration data), per unit of what keeping it float
   costs for the `tune_target`: weight bytes (size) or MACs (latency). Keeping float a prefix of that order
   removes, to first order, the sum of their noise.
3. Search the prefix length: the all-float end is within budget without evaluating it. Each evaluation
   fixes how far over budget a given remaining noise is (`excess`, 1 = at the budget), which predicts the
   shortest prefix expected to land at `SAFETY` of the budget; a prediction outside the open interval
   between the longest failing and the shortest passing prefix falls back to bisection. The search ends when
   the evaluations are spent or the two prefixes are adjacent.
4. Among the evaluated configurations within budget, keep the one best for the target: the smallest weights
   (size), or the fastest when timed side by side on the deployment runtime (latency; `ctx.measure_ms`, else
   the fewest float MACs). Nothing within budget after the last evaluation: the whole model stays float, and
   the stats say so.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from slimfx.ir import Graph, lower, node_macs
from slimfx.ir.errors import PassError
from slimfx.passes.base import PassContext, PassResult
from slimfx.passes.quantize.calibrate import calibration_batches
from slimfx.passes.quantize.qdq import expand_for_integer_kernels, make_plan
from slimfx.passes.quantize.sensitivity import graph_outputs, layer_sensitivity, sqnr_db

if TYPE_CHECKING:
    from slimfx.passes.quantize.ptq import Quantize

#: a prefix is predicted good when its remaining noise is this fraction of what the budget allows
SAFETY = 0.7


@dataclass
class Trial:
    """One evaluated configuration: the layers kept float and what they gave."""

    float_layers: list[str]
    accuracy: float | None
    accuracy_drop: float | None
    sqnr_db: float
    size_bytes: int
    excess: float  # how far over budget: <= 1 is within it
    latency_ms: dict[str, float] | None = None
    graph: Graph | None = field(default=None, repr=False)

    @property
    def within_budget(self) -> bool:
        return self.excess <= 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"float_layers": list(self.float_layers), "accuracy": self.accuracy,
                "accuracy_drop": self.accuracy_drop, "sqnr_db": round(self.sqnr_db, 2),
                "size_bytes": self.size_bytes, "latency_ms": self.latency_ms, "within_budget": self.within_budget}


def weight_bytes(graph: Graph) -> int:
    """Bytes of every parameter of the graph (what the file's weights cost)."""
    return sum(t.numel() * t.element_size() for t in graph.params.values())


def _cost(graph: Graph, name: str, target: str) -> float:
    """What keeping layer `name` float costs: weight bytes saved by int8 (size) or its MACs (latency); an
    activation-only op (add, pooling) costs its output size."""
    n = graph.node(name)
    if target == "size":
        return float(sum(graph.params[p.name].numel() for p in n.params())) * 3.0
    macs = node_macs(n) if n.params() else 0
    return float(macs or math.prod(n.meta.shape) if hasattr(n.meta, "shape") else 1.0)


def rank(rows: list[dict[str, Any]], graph: Graph, target: str) -> list[tuple[str, float, float]]:
    """(layer, noise-to-signal ratio, cost) in the order to keep layers float: most noise per unit of cost."""
    items = []
    for r in rows:
        s = r["sqnr_db"]
        nsr = 0.0 if s is None or s == math.inf else 10 ** (-s / 10) if math.isfinite(s) else 1.0
        items.append((r["name"], nsr, _cost(graph, r["name"], target)))
    floor = max(1.0, 0.01 * sum(c for _, _, c in items) / max(len(items), 1))
    return sorted(items, key=lambda t: -t[1] / max(t[2], floor))


class _Tuner:
    def __init__(self, q: Quantize, graph: Graph, ctx: PassContext):
        self.q = dataclasses.replace(q, max_accuracy_drop=None, min_sqnr_db=None)
        self.graph, self.ctx = graph, ctx
        self.max_drop, self.min_sqnr = q.max_accuracy_drop, q.min_sqnr_db
        self.limit = q.tune_evaluations
        self.evaluations = 0
        self.batches = calibration_batches(ctx, required=q.scheme != "int8-dynamic")
        if q.scheme != "int8-dynamic":
            # as apply does first (silu as x * sigmoid(x), exact): the ranges calibrated once below must be of the
            # tensors every trial's apply quantizes, or a trial looks up a range never calibrated
            expand_for_integer_kernels(graph)
        self.ref = graph_outputs(graph, self.batches)
        plan = make_plan(graph, skip=q.skip, weight_only=q.scheme == "int8-dynamic")
        self.ranges = None if q.scheme == "int8-dynamic" else self.q.calibrate(graph, plan, ctx)
        self.base: float | None = None
        if self.max_drop is not None:
            if ctx.eval_fn is None:
                raise PassError("quantize: max_accuracy_drop needs an evaluation function; give the PassContext "
                                "eval_fn (module -> accuracy in [0, 1] on validation data), or validation data "
                                "with labels to slimfx.compile (--data), or drop max_accuracy_drop")
            self.base = self._eval(graph)

    def _eval(self, graph: Graph) -> float:
        self.evaluations += 1
        return float(self.ctx.eval_fn(lower(graph)))  # type: ignore[misc]

    def left(self) -> int:
        return self.limit - self.evaluations

    def trial(self, float_layers: list[str]) -> Trial:
        g = self.graph.copy()
        self.q.apply(g, self.ctx, ranges=self.ranges, extra_skip=float_layers)
        s = sqnr_db(self.ref, graph_outputs(g, self.batches))
        excess = 0.0
        acc = drop = None
        if self.max_drop is not None:
            acc = self._eval(g)
            drop = self.base - acc  # type: ignore[operator]
            excess = max(excess, drop / self.max_drop if self.max_drop > 0 else (math.inf if drop > 0 else 0.0))
        else:
            self.evaluations += 1  # the SQNR measurement is this budget's full evaluation
        if self.min_sqnr is not None:
            excess = max(excess, 10 ** ((self.min_sqnr - s) / 10) if math.isfinite(s) else 0.0)
        return Trial(list(float_layers), acc, drop, s, weight_bytes(g), excess, graph=g)


def _next_prefix(lo: int, hi: int, remaining: list[float], scale: float | None) -> int:
    """The prefix length to evaluate next, strictly between lo (over budget) and hi (within it)."""
    if scale is not None and scale > 0:
        want = SAFETY / scale
        k = next((k for k in range(lo + 1, hi) if remaining[k] <= want), None)
        if k is not None:
            return k
        return hi - 1 if remaining[hi - 1] > 0 and scale * remaining[hi - 1] > 1 else (lo + hi) // 2
    return (lo + hi) // 2


def tune(q: Quantize, graph: Graph, ctx: PassContext) -> PassResult:
    """Quantize `graph` in place keeping float the fewest/cheapest layers that meet the budget (module
    docstring); stats["tune"] lists every evaluation and the decision."""
    t = _Tuner(q, graph, ctx)
    target = q.tune_target
    trials = [t.trial([])]
    order: list[tuple[str, float, float]] = []
    if not trials[0].within_budget and t.left() > 0:
        rows = layer_sensitivity(t.q, graph, ctx, ranges=t.ranges, with_accuracy=False)
        order = rank(rows, graph, target)
        names = [n for n, _, _ in order]
        remaining = [sum(nsr for _, nsr, _ in order[k:]) for k in range(len(order) + 1)]
        lo, hi = 0, len(order)  # lo: evaluated and over budget; hi: within it (all float: without evaluating)
        scale = trials[0].excess / remaining[0] if remaining[0] > 0 else None
        while t.left() > 0 and hi - lo > 1:
            k = _next_prefix(lo, hi, remaining, scale)
            tr = t.trial(names[:k])
            trials.append(tr)
            if tr.within_budget:
                hi = k
            else:
                lo = k
                if remaining[k] > 0:
                    scale = tr.excess / remaining[k]
    good = [tr for tr in trials if tr.within_budget]
    # latency: the configurations within budget, and plain int8 to compare with, timed side by side
    timing = _time_trials(t, [trials[0], *(tr for tr in good if tr is not trials[0])], q) \
        if target == "latency" and good and (len(good) > 1 or good[0] is not trials[0]) else None
    if good:
        if target == "size":
            chosen = min(good, key=lambda tr: (tr.size_bytes, len(tr.float_layers)))
        elif timing is not None:
            chosen = min(good, key=lambda tr: (timing[id(tr)], len(tr.float_layers)))
        else:
            chosen = min(good, key=lambda tr: len(tr.float_layers))
        why = (f"within budget after {t.evaluations} full evaluation(s); of the {len(good)} configuration(s) "
               f"within it, the {'smallest' if target == 'size' else 'fastest' if timing else 'fewest float layers'}")
        float_layers = chosen.float_layers
    else:
        chosen = None
        float_layers = [n for n, _, _ in order] if order else []
        why = (f"no configuration tried within {t.evaluations} full evaluation(s) met the budget: the whole model "
               "stays float (raise tune max_evaluations, or relax the budget)")
    res = t.q.apply(graph, ctx, ranges=t.ranges, extra_skip=float_layers) if chosen is not None or not order \
        else PassResult(False, {"quantized_ops": 0, "skipped": float_layers})
    budget = {k: v for k, v in (("max_accuracy_drop", t.max_drop), ("min_sqnr_db", t.min_sqnr)) if v is not None}
    section = {
        "budget": budget, "target": target, "evaluations": t.evaluations, "max_evaluations": t.limit,
        "float_accuracy": t.base, "ranking": [{"name": n, "nsr": nsr, "cost": c} for n, nsr, c in order[:20]],
        "trials": [tr.to_dict() for tr in trials], "chosen": trials.index(chosen) if chosen is not None else None,
        "float_layers": float_layers, "why": why,
        "plain_int8": {"accuracy": trials[0].accuracy, "size_bytes": trials[0].size_bytes,
                       "latency_ms": trials[0].latency_ms},
    }
    if target == "latency" and chosen is not None and chosen is not trials[0]:
        section["latency_vs_plain_int8"] = _latency_note(chosen, trials[0], timing)
    final = chosen or trials[-1]
    res.stats.update({"float_accuracy": t.base, "accuracy": final.accuracy if chosen else t.base,
                      "accuracy_drop": final.accuracy_drop if chosen else 0.0,
                      "within_budget": True, "fallback_layers": float_layers, "tune": section,
                      "trials": [{"float_layers": tr.float_layers, "accuracy": tr.accuracy} for tr in trials]})
    res.stats.setdefault("notes", []).append(
        f"tuned to {', '.join(f'{k} {v:g}' for k, v in budget.items())} ({target}): "
        + (f"kept {len(float_layers)} layer(s) float" if chosen is not None else "kept the whole model float")
        + f", {t.evaluations} full evaluation(s); {why}")
    if chosen is None:
        ctx.logger.warning("quantize: %s", why)
    return res


def _time_trials(t: _Tuner, trials: list[Trial], q: Quantize) -> dict[int, float] | None:
    """Each of `trials` (plain int8 first) timed side by side: its time relative to plain int8's (geometric mean
    over the guard's batch sizes, best of 3 interleaved rounds); None without a runtime. Fills latency_ms."""
    if t.ctx.measure_ms is None:
        return None
    from slimfx.passes.quantize.speed import interleaved_times

    batches = list(dict.fromkeys(q.speed_guard_batches))
    graphs = {str(i): tr.graph for i, tr in enumerate(trials) if tr.graph is not None}
    times = interleaved_times(t.ctx.measure_ms, graphs, batches, q.speed_guard_seconds, 3)
    best = {k: [min(r[j] for r in rows) for j in range(len(batches))] for k, rows in times.items()}
    out = {}
    for i, tr in enumerate(trials):
        tr.latency_ms = {f"b{b}": round(m, 4) for b, m in zip(batches, best[str(i)])}
        out[id(tr)] = math.exp(sum(math.log(a / b) for a, b in zip(best[str(i)], best["0"])) / len(batches))
    return out


def _latency_note(chosen: Trial, plain: Trial, timing: dict[int, float] | None) -> str:
    if timing is None or chosen.latency_ms is None:
        return ("not timed (no runtime to time on): the float layers may make it slower than plain int8, which "
                "did not meet the budget")
    r = timing[id(chosen)]
    return (f"{r:.2f}x of plain int8's time (side by side); plain int8 did not meet the budget"
            + ("" if r <= 1.05 else ": the float layers the budget needs cost time (int8 kernels are faster "
                                    "than float ones there)"))
