"""`prune-channels`: dependency-aware structured pruning that physically shrinks the model.

Groups come from `passes.prune.groups.analyze`; each group loses the least important
units (channels, attention heads, conv groups) and every param and attr they reach is
rewritten, so the result is a smaller dense graph (no masks) that verifies, lowers,
trains and exports.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

import torch

from slimfx.ir import OPS, Graph, count_macs, count_params, lower, ops_with, propagate_shapes, verify
from slimfx.ir.analysis import example_inputs as inputs_from_metas
from slimfx.ir.errors import PassError
from slimfx.passes.base import Pass, PassContext, PassResult, option, register_pass
from slimfx.passes.prune.groups import (
    BLOCK,
    Dependencies,
    Group,
    analyze,
    apply,
    keep_every_axis,
    missing_trait_message,
)

Criterion = Literal["l1", "l2", "bn-scale", "taylor"]


def example_inputs(graph: Graph, ctx: PassContext) -> tuple:
    """The context's example inputs, or inputs made from the graph inputs' metas (ir.analysis.example_inputs)."""
    if ctx.example_inputs:
        return ctx.example_inputs
    missing = next((n for n in graph.inputs if n.meta is None), None)
    if missing is not None:
        raise PassError(f"graph input %{missing.name} has no shape; give example inputs (PassContext.example_inputs)")
    return inputs_from_metas(graph)


def match_any(patterns: list[str], names: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(nm, p) for p in patterns for nm in names if nm)


# layers that own a weight (weighted ops and lookup tables: conv, linear, embedding): what patterns name
LAYER_OPS = ops_with(weighted=True) | ops_with(quant="table")


def check_patterns(graph: Graph, patterns: list[str], option: str, pass_name: str) -> None:
    """Every pattern must name some node (module path or name) or param; else say what exists."""
    names = [x for n in graph for x in (n.name, n.module_path or "")] + list(graph.params)
    for p in patterns:
        if not any(fnmatch.fnmatchcase(nm, p) for nm in names if nm):
            mods = sorted({n.module_path for n in graph if n.module_path and n.op in LAYER_OPS})
            raise PassError(f"pass '{pass_name}': {option} pattern {p!r} names no module, node or param of the graph; "
                            f"layers are e.g. {', '.join(mods[:8]) or '(none)'} (fnmatch patterns such as 'layer1.*')")


def patterns_problem(graph: Graph, pass_name: str, **options: list[str]) -> str | None:
    """`check_patterns` for each named option (e.g. protect=[...], overrides=[...]): what is wrong, or None."""
    try:
        for option, patterns in options.items():
            check_patterns(graph, list(patterns), option, pass_name)
    except PassError as e:
        return str(e)
    return None


def group_names(g: Group, graph: Graph) -> list[str]:
    out = []
    for s in g.spaces:
        out += [s.node, s.module_path, s.weight or ""]
    return out


# --- importance ---------------------------------------------------------------------------------

def importance(graph: Graph, deps: Dependencies, criterion: str, ctx: PassContext | None = None,
               *, batches: int = 4) -> tuple[torch.Tensor, list[str]]:
    """Score of every unit (indexed by its root label); higher means keep. Also notes on fallbacks (lines
    for the report, as every pass's `notes`)."""
    roots = deps.roots
    notes: list[str] = []
    grads: dict[str, torch.Tensor] = {}
    if criterion == "taylor":
        grads = _taylor_products(graph, ctx, batches)

    def accumulate(roles: tuple[str, ...], kind: str) -> torch.Tensor:
        score = torch.zeros(deps.num_labels, dtype=torch.float64)
        for (name, axis), m in deps.members.items():
            if m.role not in roles:
                continue
            t = graph.params[name].detach().double()
            dims = [d for d in range(t.dim()) if d != axis]
            if kind == "taylor":
                if name not in grads:
                    continue
                per = grads[name].double().sum(dim=dims).abs() if dims else grads[name].double().abs()
            elif kind == "l1":
                per = t.abs().sum(dim=dims) if dims else t.abs()
            elif kind == "bn":
                per = t.abs()
            else:
                per = t.pow(2).sum(dim=dims) if dims else t.pow(2)
            score.index_add_(0, roots[m.labels], per)
        return score

    if criterion == "l1":
        return accumulate(("weight",), "l1"), notes
    if criterion == "l2":
        return accumulate(("weight",), "l2").sqrt(), notes
    if criterion == "taylor":
        return accumulate(("weight", "bias", "norm"), "taylor"), notes
    bn = accumulate(("norm",), "bn")
    l2 = accumulate(("weight",), "l2").sqrt()
    fallback = []
    for g in deps.groups:
        if not any(bool(bn[u] > 0) for u in g.units):
            for u in g.units:
                bn[u] = l2[u]
            fallback.append(g.name)
    if fallback:  # one readable line: the report's headline lists a pass's notes
        notes.append(f"criterion bn-scale ranked {len(fallback)} of {len(deps.groups)} groups by l2, as they have no "
                     f"norm layer ({', '.join(fallback)}); a fold-batchnorm before prune-channels removes the batch "
                     "norms bn-scale reads: put it after")
    return bn, notes


def _taylor_products(graph: Graph, ctx: PassContext | None, batches: int) -> dict[str, torch.Tensor]:
    """Σ weight·grad over a few batches of data (train data with targets, else calibration data with the
    model's own predictions as targets)."""
    from slimfx.passes.finetune import iter_batches

    if ctx is None:
        raise PassError("pass 'prune-channels': criterion 'taylor' needs data; give train_data or calibration_data")
    if ctx.train_data is not None:
        data = [(x, y) for x, y in iter_batches(ctx.train_data, batch_size=64, shuffle=False, seed=ctx.seed)]
    elif ctx.calibration_data is not None:
        data = [(x, None) for x in ctx.calibration_batches()]
    else:
        raise PassError("pass 'prune-channels': criterion 'taylor' needs data (gradient x weight); give the "
                        "context train_data or calibration_data, or use criterion 'l2'")
    gm = lower(graph, copy_params=True)
    gm.eval()
    params = dict(gm.named_parameters(remove_duplicate=False))  # a tied weight under each of its names
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    for i, (x, y) in enumerate(data):
        if i >= batches:
            break
        gm.zero_grad()
        out = gm(*x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        target = y if y is not None else out.detach().argmax(-1)
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
        loss.backward()
        for k, p in params.items():
            if p.grad is not None:
                acc[k] += p.detach() * p.grad
    return acc


# --- planning -------------------------------------------------------------------------------------

def reach(deps: Dependencies) -> dict[int, tuple[tuple[str, int], ...]]:
    """Each unit's (param, axis) members: the params whose indices it removes."""
    out: dict[int, list[tuple[str, int]]] = {}
    for key, m in deps.members.items():
        for u in set(deps.roots[m.labels].tolist()):
            out.setdefault(u, []).append(key)
    return {u: tuple(sorted(keys)) for u, keys in out.items()}


def sections(group: Group, reached: dict[int, tuple]) -> list[list[int]]:
    """The group's units split by the params they reach (`reach`): units that reach the same members form one
    section. A plain group is one section; a group whose channels are split between consumers (chunk, split,
    slice: ShuffleNet's halves, one passed through and one read by a conv) has one per part."""
    by_sig: dict[tuple, list[int]] = {}
    for u in group.units:
        by_sig.setdefault(reached.get(u, ()), []).append(u)
    return list(by_sig.values())


def _quotas(sizes: list[int], total: int) -> list[int]:
    """`total` split over sections of `sizes` in proportion (largest remainders; ties to the larger section)."""
    n = sum(sizes)
    exact = [total * s / n for s in sizes]
    out = [int(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - out[i]), -sizes[i], i))
    for i in order[:total - sum(out)]:
        out[i] += 1
    return out


def _lowest(group: Group, reached: dict[int, tuple], scores: torch.Tensor, count: int) -> list[int]:
    """The `count` units to remove from `group`: the lowest-scoring ones of each section, the same fraction of
    every section (balanced), so every layer that reads a part of the group loses its share. Removing the
    lowest-scoring units of the whole group could take them all from one part (ShuffleNetV2: the half a
    block passes through), leaving the convs that read the other part at full width."""
    def key(u: int) -> tuple[float, int]:
        return float(scores[u]), u

    parts = sections(group, reached)
    if len(parts) == 1:
        return sorted(group.units, key=key)[:count]
    return [u for part, q in zip(parts, _quotas([len(p) for p in parts], count)) for u in sorted(part, key=key)[:q]]


def plan(deps: Dependencies, scores: torch.Tensor, sparsity_of: dict[int, float], round_to: int = 1) -> list[int]:
    """Units to remove: per group the lowest-scoring fraction (the same fraction of each of its sections,
    `sections`), rounded, at least one unit kept."""
    removed: list[int] = []
    reached = reach(deps)
    for g in deps.groups:
        s = sparsity_of.get(g.id, 0.0)
        n = len(g.units)
        if s <= 0 or n == 0:
            continue
        kept = n - int(round(s * n))
        if round_to > 1 and g.kind == "channels":
            total = kept + g.blocked_channels
            total = max(round_to, int(round(total / round_to)) * round_to)
            kept = min(n, total - g.blocked_channels)
        kept = max(1, min(n, kept))  # documented clamp: a group never reaches 0 channels
        removed += _lowest(g, reached, scores, n - kept)
    return keep_every_axis(deps, removed, scores)


# onnxruntime's fast convolution kernels (NCHWc) work on blocks of 8 channels (AVX2): benchmarks/conv_widths.py
# times a conv per width (batch 32, 1 thread: a 3x3 conv over 22 channels took 1.22x the time of one over 24, a
# depthwise 7x7 3.8x).
FAST_WIDTH_MULTIPLE = 8


def _slow_width_note(before: Graph, after: Graph) -> list[str]:
    """A note naming the convs pruning left at channel counts onnxruntime runs on a slow path (a width it changed
    to one that is not a multiple of FAST_WIDTH_MULTIPLE), with the option that avoids it."""
    def widths(g: Graph) -> dict[str, tuple[int, int]]:
        out = {}
        for n in g:
            op, x = OPS.get(n.op), n.inputs[0] if n.inputs else None
            layer = op.weighted if op is not None else None
            if layer is not None and layer.channel_dim == 1 and hasattr(getattr(x, "meta", None), "shape") \
                    and hasattr(n.meta, "shape"):
                out[n.module_path or n.name] = (x.meta.shape[1], n.meta.shape[1])
        return out

    old = widths(before)
    slow = [f"{name} ({w[0]}->{w[1]} channels)" for name, w in widths(after).items()
            if any(c != c0 and c % FAST_WIDTH_MULTIPLE for c, c0 in zip(w, old.get(name, w)))]
    if not slow:
        return []
    shown = ", ".join(slow[:6]) + (f" and {len(slow) - 6} more" if len(slow) > 6 else "")
    return [f"{len(slow)} conv layers were left at channel counts that are not multiples of {FAST_WIDTH_MULTIPLE}: "
            f"{shown}; onnxruntime's fast conv kernels work on blocks of {FAST_WIDTH_MULTIPLE} channels, so such a "
            "model can be no faster, or slower, than the original (a conv over 22 channels runs slower than over 24, "
            f"a depthwise one several times slower): set round_to = {FAST_WIDTH_MULTIPLE} on prune-channels"]


# --- the pass -------------------------------------------------------------------------------------

@register_pass("prune-channels")
@dataclass
class PruneChannels(Pass):
    """Remove whole channels, attention heads and FFN units everywhere their dependencies reach."""

    preserves_outputs = False

    sparsity: float = option(0.5, ge=0, lt=1, help=(
        "fraction of each group's units (channels, heads, FFN units) to remove; ignored when target_macs is "
        "set (typical: 0.25-0.75)"))
    target_macs: float | None = option(None, gt=0, le=1, help=(
        "instead of sparsity: the smallest same fraction removed from every group that brings MACs to at "
        "most this ratio of the input graph's, e.g. 0.5; unset: use sparsity"))
    criterion: Criterion = option("l2", help=(
        "how units are ranked: l1 | l2 (weight norms over every layer of the group); bn-scale (|gamma| of "
        "the batch norm); taylor (|sum of weight x gradient|, needs data)"))
    round_to: int = option(1, ge=1, help="keep channel counts multiples of this (e.g. 8 for SIMD-friendly "
                                         "widths); heads are whole units already")
    protect: list[str] = option([], help="fnmatch patterns on layer names; a group with a protected source "
                                         "layer is left alone, e.g. ['fc', 'layer1.*']")
    overrides: dict[str, float] = option({}, ge=0, lt=1, help=(
        "pattern -> sparsity for the groups whose source layers match, e.g. {'layer4.*' = 0.25}"))
    taylor_batches: int = option(4, ge=1, help="criterion = taylor: batches of data the gradients are "
                                               "summed over")

    def check_context(self, ctx: PassContext) -> str | None:
        if self.criterion == "taylor" and ctx.train_data is None and ctx.calibration_data is None:
            return "prune-channels criterion 'taylor' needs train_data or calibration_data (gradient x weight)"
        return None

    def check_graph(self, graph: Graph) -> str | None:
        return patterns_problem(graph, self.name, protect=self.protect, overrides=list(self.overrides))

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        problem = self.check_graph(graph)
        if problem:
            raise PassError(problem)
        inputs = example_inputs(graph, ctx)
        deps = analyze(graph)
        for op in deps.missing:
            ctx.logger.warning("prune-channels: %s", missing_trait_message(op))
        scores, notes = importance(graph, deps, self.criterion, ctx, batches=self.taylor_batches)
        macs0, params0 = count_macs(graph), count_params(graph)

        def sparsities(s: float) -> dict[int, float]:
            out = {}
            for g in deps.groups:
                names = group_names(g, graph)
                if match_any(self.protect, names):
                    continue
                hit = [v for p, v in self.overrides.items() if match_any([p], names)]
                out[g.id] = hit[-1] if hit else s
            return out

        def build(s: float, check: bool = True) -> tuple[Graph, list[int]]:
            removed = plan(deps, scores, sparsities(s), self.round_to)
            work = graph.copy()
            apply(work, deps, removed)
            try:
                propagate_shapes(work, *inputs)
                if check:
                    verify(work)
            except Exception as e:  # noqa: BLE001 - report it as the pass's fault, never leave a broken graph
                raise PassError(f"pass 'prune-channels' produced an invalid graph ({type(e).__name__}: {e}); "
                                "this is a bug in the dependency analysis: protect the layers named above or "
                                "report the model") from e
            return work, removed

        chosen = self.sparsity
        if self.target_macs is not None:
            lo, hi = 0.0, 0.95
            work, removed = build(hi, check=False)
            if count_macs(work) > self.target_macs * macs0:
                raise PassError(f"pass 'prune-channels': target_macs={self.target_macs} is out of reach; removing "
                                f"95% of every prunable group gives {count_macs(work) / macs0:.3f} "
                                "(protected layers and blocked groups keep their MACs)")
            for _ in range(8):
                mid = (lo + hi) / 2
                if count_macs(build(mid, check=False)[0]) <= self.target_macs * macs0:
                    hi = mid
                else:
                    lo = mid
            chosen = hi
        work, removed = build(chosen)  # a pruned copy: the given graph stays as it was
        work.remove_unused_params()
        removed_set = set(removed)
        table = []
        for g in deps.groups:
            rm = [u for u in g.units if u in removed_set]
            prim = g.spaces[0]
            kept_ch = sum(1 for lab in range(prim.start, prim.start + prim.size)
                          if int(deps.roots[lab]) not in removed_set)
            table.append({"group": g.name, "kind": g.kind, "sources": g.sources(), "units": len(g.units),
                          "removed_units": len(rm), "channels": g.channels, "kept_channels": kept_ch,
                          "protected": match_any(self.protect, group_names(g, graph))})
        macs1, params1 = count_macs(work), count_params(work)
        stats = {
            "criterion": self.criterion, "sparsity": chosen, "groups": table, "blocked": deps.blocked,
            "unprunable": deps.unprunable,
            "macs_before": macs0, "macs_after": macs1, "macs_ratio": macs1 / macs0 if macs0 else 1.0,
            "params_before": params0, "params_after": params1,
            "removed_units": len(removed),
        }
        notes += _slow_width_note(graph, work)
        if notes:
            stats["notes"] = notes
        if deps.missing:  # ops pruning stopped at for want of a trait: op -> the trait (the reasons are in blocked)
            stats["missing_traits"] = dict(deps.missing)
        return PassResult(changed=bool(removed), stats=stats, graph=work if removed else None)


__all__ = ["PruneChannels", "importance", "plan", "example_inputs", "check_patterns",
           "BLOCK"]
