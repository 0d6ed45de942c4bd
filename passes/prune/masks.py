"""Unstructured pruning: explicit `mask` nodes on conv/linear weights, and baking them in.

`prune-weights` inserts `%w_m = mask(@layer.weight, @layer.weight.mask)` in front of each pruned
layer, whose weight operand becomes `%w_m`. Masks are ordinary IR: they lower to `W * M`, survive
later passes (a training pass keeps pruned weights at zero because the mask multiplies them in the
forward pass, so their gradient is zero too), and `materialize-masks` folds them into the weights.
Dense kernels are no faster with zeros; the gain is compressibility (and sparse kernels elsewhere).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

import torch

from slimfx.ir import Graph, Node, Param, TensorMeta, ops_with
from slimfx.ir.errors import PassError
from slimfx.passes.base import Pass, PassContext, PassResult, option, register_pass

PRUNABLE_OPS = ops_with(weighted=True)  # layers with a weight operand (ir.Weighted): conv1d, conv2d, linear, ...


def weight_of(node: Node) -> tuple[Param, Param | None] | None:
    """(weight param, mask param or None) of a conv/linear node, None when the weight is computed."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if isinstance(w, Param):
        return w, None
    if isinstance(w, Node) and w.op == "mask" and all(isinstance(p, Param) for p in w.inputs[:2]):
        return w.inputs[0], w.inputs[1]
    return None


def _names(node: Node, weight: Param) -> list[str]:
    return [x for x in (node.module_path, node.name, weight.name) if x]


def _matches(patterns: list[str] | tuple[str, ...], names: list[str]) -> str | None:
    for p in patterns:
        if any(fnmatch.fnmatchcase(nm, p) for nm in names):
            return p
    return None


def layer_sparsity(graph: Graph) -> list[dict]:
    """Per conv/linear layer: zeros in the effective weight (W ⊙ M when masked)."""
    rows = []
    for n in graph:
        if n.op not in PRUNABLE_OPS:
            continue
        wm = weight_of(n)
        if wm is None:
            continue
        w = graph.params[wm[0].name]
        eff = w * graph.params[wm[1].name] if wm[1] is not None else w
        zeros = int((eff == 0).sum())
        rows.append({"layer": n.module_path or n.name, "weight": wm[0].name, "numel": eff.numel(), "zeros": zeros,
                     "sparsity": round(zeros / max(1, eff.numel()), 4)})
    return rows


@register_pass("prune-weights")
@dataclass
class PruneWeights(Pass):
    """Unstructured pruning: zero the smallest (or random) weights of conv/linear layers with explicit masks."""

    preserves_outputs = False

    sparsity: float = option(0.5, ge=0, lt=1, help="fraction of each layer's weights to zero (typical: 0.5-0.9)")
    criterion: Literal["magnitude", "random"] = option("magnitude", help=(
        "which weights go: magnitude (the smallest |w|) or random (seeded by the run's seed)"))
    scope: Literal["layer", "global"] = option("layer", help=(
        "layer: every layer loses `sparsity` of its weights; global: one magnitude threshold over all "
        "layers not in overrides, so layers with small weights lose more"))
    overrides: dict[str, float] = option({}, ge=0, lt=1, help=(
        "fnmatch pattern on module path, node or param name -> sparsity for that layer, e.g. {'fc' = 0.2}"))
    skip: list[str] = option([], help="patterns of layers left dense, e.g. ['conv1', 'fc']")

    def check_graph(self, graph: Graph) -> str | None:
        from slimfx.passes.prune.channels import patterns_problem

        return patterns_problem(graph, self.name, skip=self.skip, overrides=list(self.overrides))

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        problem = self.check_graph(graph)
        if problem:
            raise PassError(problem)
        layers: list[tuple[Node, Param, Param | None, float | None]] = []
        seen: set[str] = set()
        for n in graph:
            if n.op not in PRUNABLE_OPS:
                continue
            wm = weight_of(n)
            if wm is None or wm[0].name in seen:
                continue
            names = _names(n, wm[0])
            if _matches(self.skip, names):
                continue
            seen.add(wm[0].name)
            hit = [v for p, v in self.overrides.items() if _matches([p], names)]
            layers.append((n, wm[0], wm[1], hit[-1] if hit else None))
        gen = torch.Generator().manual_seed(ctx.seed)

        def effective(w: Param, m: Param | None) -> torch.Tensor:
            t = graph.params[w.name]
            return t * graph.params[m.name] if m is not None else t

        def score(t: torch.Tensor) -> torch.Tensor:
            return t.abs().flatten() if self.criterion == "magnitude" else torch.rand(t.numel(), generator=gen)

        new_masks: dict[str, torch.Tensor] = {}
        glob = [(n, w, m) for n, w, m, s in layers if s is None] if self.scope == "global" else []
        if glob:
            scores = [score(effective(w, m)) for _, w, m in glob]
            allv = torch.cat(scores)
            k = int(round(self.sparsity * allv.numel()))
            flat = torch.ones(allv.numel(), dtype=torch.bool)
            if k:
                flat[torch.argsort(allv, stable=True)[:k]] = False
            pos = 0
            for (_, w, _m), s in zip(glob, scores, strict=True):
                new_masks[w.name] = flat[pos:pos + s.numel()].view_as(graph.params[w.name])
                pos += s.numel()
        for _n, w, m, s in layers:
            if w.name in new_masks:
                continue
            rate = self.sparsity if s is None else s
            t = effective(w, m)
            k = int(round(rate * t.numel()))
            keep = torch.ones(t.numel(), dtype=torch.bool)
            if k:
                keep[torch.argsort(score(t), stable=True)[:k]] = False
            new_masks[w.name] = keep.view_as(t)
        changed = False
        users = graph.param_users()
        for _n, w, m, _s in layers:
            mask = new_masks[w.name].to(graph.params[w.name].dtype)
            if m is not None:  # an earlier mask: keep its zeros (masks only ever remove more)
                graph.params[m.name] = graph.params[m.name] * mask
                changed = True
                continue
            mref = graph.add_param(f"{w.name}_mask", mask, buffer=True)
            consumers = [u for u in users.get(w.name, []) if u.op in PRUNABLE_OPS and u.inputs[1] == w]
            first = consumers[0]
            mnode = graph.create_node("mask", (w, mref), name=f"{first.name}_mask", before=first,
                                      meta=TensorMeta.of(graph.params[w.name]), module_path=first.module_path,
                                      source=first.source)
            for u in consumers:
                u.inputs = (u.inputs[0], mnode, *u.inputs[2:])
            changed = True
        rows = layer_sparsity(graph)
        total = sum(r["numel"] for r in rows)
        zeros = sum(r["zeros"] for r in rows)
        return PassResult(changed=changed, stats={"layers": rows, "pruned_layers": len(layers),
                                                  "sparsity": round(zeros / max(1, total), 4),
                                                  "criterion": self.criterion, "scope": self.scope})


@register_pass("materialize-masks")
@dataclass
class MaterializeMasks(Pass):
    """Bake every `mask` node into its weight (W := W ⊙ M) and drop the mask; exporters then see plain zeros."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        done = 0
        for n in graph.find("mask"):
            w, m = n.inputs[0], n.inputs[1]
            if not (isinstance(w, Param) and isinstance(m, Param)):
                ctx.logger.warning("materialize-masks: %%%s masks a computed weight; left as is", n.name)
                continue
            shared = [u for u in graph.param_users().get(w.name, []) if u is not n]
            if shared:  # another node reads the dense weight: bake into a new param
                ref = graph.add_param(f"{w.name}.masked", graph.params[w.name] * graph.params[m.name])
            else:
                graph.params[w.name] = graph.params[w.name] * graph.params[m.name]
                ref = w
            graph.replace_all_uses(n, ref)
            graph.erase(n)
            done += 1
        graph.remove_unused_params()
        rows = layer_sparsity(graph)
        total = sum(r["numel"] for r in rows)
        zeros = sum(r["zeros"] for r in rows)
        return PassResult(changed=bool(done), stats={"materialized": done,
                                                     "sparsity": round(zeros / max(1, total), 4)})


__all__ = ["PruneWeights", "MaterializeMasks", "layer_sparsity", "weight_of"]
