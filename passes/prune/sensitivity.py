"""`prune-sensitivity`: how much each group (or layer) can be pruned, measured, without changing the graph.

For every channel group (mode `channels`) or conv/linear layer (mode `weights`) and every sparsity
in `sparsities`, a copy of the graph has only that target pruned and is scored: accuracy from
`ctx.eval_fn` when given, else the output SQNR in dB against the unpruned graph on the calibration
batches. The table goes to the stats; `plot` writes a PNG (one curve per target).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from slimfx.ir import Graph, lower
from slimfx.ir.errors import PassError
from slimfx.ir.metrics import Comparison
from slimfx.passes.base import Pass, PassContext, PassResult, option, register_pass
from slimfx.passes.prune.channels import importance, plan
from slimfx.passes.prune.groups import analyze, apply
from slimfx.passes.prune.masks import PRUNABLE_OPS, weight_of


@register_pass("prune-sensitivity")
@dataclass
class PruneSensitivity(Pass):
    """Accuracy (or output SQNR) vs sparsity for each channel group or layer; table in stats, optional PNG."""

    is_analysis = True

    mode: Literal["channels", "weights"] = option("channels", help=(
        "channels: prune each channel group alone (as prune-channels would); weights: zero each conv/linear "
        "layer's weights alone (as prune-weights would)"))
    sparsities: list[float] = option([0.25, 0.5, 0.75], ge=0, lt=1, help=(
        "the sparsities each group or layer is tried at (at least one)"))
    criterion: Literal["l1", "l2", "bn-scale", "magnitude", "random"] = option("l2", help=(
        "channels: l1 | l2 | bn-scale (magnitude means l2); weights: magnitude or random (others mean magnitude)"))
    plot: str | None = option(None, help="write a PNG of the curves to this path (needs matplotlib); "
                                         "unset: no plot")
    max_batches: int = option(4, ge=1, help="calibration batches scored per trial (without an eval function "
                                            "the score is the output SQNR on them)")

    def validate(self) -> None:
        if not self.sparsities:
            raise PassError("pass 'prune-sensitivity': option 'sparsities' is empty; give at least one, "
                            "e.g. [0.25, 0.5, 0.75]")
        if self.mode == "channels" and self.criterion == "random":
            raise PassError("pass 'prune-sensitivity': criterion 'random' applies to mode 'weights' only; use "
                            "mode = 'weights' or another criterion")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        batches = ctx.calibration_batches()[: self.max_batches]
        if not batches or not batches[0]:
            raise PassError("pass 'prune-sensitivity' needs example inputs or calibration data to score outputs")
        ref_gm = lower(graph, copy_params=True).eval()
        with torch.no_grad():
            refs = [ref_gm(*b) for b in batches]

        def score(g: Graph) -> float:
            """Accuracy (with ctx.eval_fn), else the output SQNR of the worst of every output (+inf: exact)."""
            gm = lower(g, copy_params=True).eval()
            if ctx.eval_fn is not None:
                return float(ctx.eval_fn(gm))
            comparison = Comparison()
            with torch.no_grad():
                for r, b in zip(refs, batches, strict=True):
                    comparison.update(r, gm(*b))
            return comparison.sqnr_db

        metric = "accuracy" if ctx.eval_fn is not None else "sqnr_db"
        baseline = score(graph)
        rows: list[dict] = []
        if self.mode == "channels":
            deps = analyze(graph)
            crit = "l2" if self.criterion == "magnitude" else self.criterion
            scores, _ = importance(graph, deps, crit, ctx)
            for grp in deps.groups:
                for s in self.sparsities:
                    work = graph.copy()
                    removed = plan(deps, scores, {grp.id: s})
                    apply(work, deps, removed)
                    rows.append({"target": grp.name, "kind": grp.kind, "sparsity": s, metric: score(work)})
        else:
            gen = torch.Generator().manual_seed(ctx.seed)
            for n in graph:
                wm = weight_of(n) if n.op in PRUNABLE_OPS else None
                if wm is None:
                    continue
                for s in self.sparsities:
                    work = graph.copy()
                    w = work.params[wm[0].name]
                    eff = w * work.params[wm[1].name] if wm[1] is not None else w
                    k = int(round(s * eff.numel()))
                    sc = eff.abs().flatten() if self.criterion != "random" else torch.rand(eff.numel(), generator=gen)
                    keep = torch.ones(eff.numel(), dtype=eff.dtype)
                    if k:
                        keep[torch.argsort(sc, stable=True)[:k]] = 0
                    work.params[wm[0].name] = w * keep.view_as(w)
                    rows.append({"target": n.module_path or n.name, "kind": "layer", "sparsity": s,
                                 metric: score(work)})
        stats = {"metric": metric, "baseline": baseline, "mode": self.mode, "table": rows}
        if self.plot:
            stats["plot"] = self._plot(rows, metric, baseline)
        return PassResult(changed=False, stats=stats)

    def _plot(self, rows: list[dict], metric: str, baseline: float) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        by: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            by.setdefault(r["target"], []).append((r["sparsity"], r[metric]))
        finite = [v for pts in by.values() for _, v in pts if math.isfinite(v)] + \
            ([baseline] if math.isfinite(baseline) else [])
        cap = max(finite, default=0.0) + 10.0  # exact (infinite SQNR) points drawn at the top
        for name, pts in by.items():
            xs, ys = zip(*([(0.0, baseline)] + sorted(pts)), strict=True)
            ys = tuple(y if math.isfinite(y) else cap for y in ys)
            ax.plot(xs, ys, marker="o", linewidth=1, markersize=3, label=name)
        ax.set_xlabel("sparsity (fraction removed)")
        ax.set_ylabel("accuracy" if metric == "accuracy" else "output SQNR (dB)")
        ax.set_title(f"pruning sensitivity ({self.mode})")
        ax.grid(alpha=0.3)
        if len(by) <= 20:
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(self.plot)
        plt.close(fig)
        return str(self.plot)


__all__ = ["PruneSensitivity"]
