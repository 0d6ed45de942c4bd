"""Cleanup passes: dead code, no-op nodes, constant subgraphs and common subexpressions.

Each is one linear sweep over the graph; they are the `cleanup` recipe and the
usual prologue and epilogue of every other recipe.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from slimfx.ir import Graph, Node, Param, iter_refs
from slimfx.ir.ops import COMMUTATIVE_OPS
from slimfx.passes.base import Pass, PassContext, PassResult, option, register_pass
from slimfx.passes.graph_utils import (
    erase_dead,
    eval_node,
    graph_mutates,
    has_side_effects,
    is_deterministic,
    meta_of_value,
    runs_in_training,
)
from slimfx.passes.rewrite import Match, call
from slimfx.passes.rules import Rule, RuleSet, apply_rules


@register_pass("dce")
class DeadCodeElimination(Pass):
    """Removes nodes whose values nothing reads (keeping side effects) and params no node reads."""

    preserves_outputs = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        removed = erase_dead(graph, graph.nodes)
        dropped = graph.remove_unused_params()
        return PassResult(changed=bool(removed or dropped), stats={"nodes_removed": removed,
                                                                   "params_removed": len(dropped)})


def _keep(x):
    return x


def _same_meta(m: Match) -> bool:
    """The value passed through has the output's shape and dtype (`ids * 1.0` makes floats: not a no-op)."""
    meta = meta_of_value(m["x"], m.graph)
    return meta is not None and meta == m.anchor.meta


def _no_opaque_reader(m: Match) -> bool:
    """An opaque `x.view()` after `x.contiguous()` may rely on the copy's contiguity."""
    return _same_meta(m) and not any(u.op == "opaque" for u in m.anchor.users)


def _same_sizes_everywhere(m: Match) -> bool:
    """A reshape/expand whose run-time sizes come from another tensor (its batch) has its input's shape on
    the example only: it stays."""
    return _same_meta(m) and _follows_own_dims(m.anchor, m["x"])


def _follows_own_dims(node: Node, x: Any) -> bool:
    """True when every size a reshape/expand computes at run time is the same dim of its own input
    (`x.reshape(x.size(0), 6)`), so equal shapes on the example mean equal shapes at every size."""
    entries = node.attrs.get("shape" if node.op == "reshape" else "size")
    entries = entries if isinstance(entries, (tuple, list)) else (entries,)
    for i, e in enumerate(entries):
        if not isinstance(e, Node):
            continue
        if e.op == "size" and e.inputs[0] is x and isinstance(e.attrs.get("dim"), int):
            dim = e.attrs["dim"]
        elif e.op == "getitem" and isinstance(e.inputs[0], Node) and e.inputs[0].op == "shape" \
                and e.inputs[0].inputs[0] is x and isinstance(e.attrs.get("index"), int):
            dim = e.attrs["index"]
        else:
            return False
        if dim % len(entries) != i:
            return False
    return True


@functools.cache
def noop_rules() -> RuleSet:
    """The no-ops remove-identity drops, one rule per op (the rule names are the ops)."""
    def unary(op: str, condition: Callable[[Match], bool] | None = _same_meta) -> Rule:
        return Rule(lambda x: call(op, x), _keep, condition, name=op)

    return RuleSet([
        unary("identity", None),
        unary("dropout", lambda m: not runs_in_training(m.anchor)),
        unary("contiguous", _no_opaque_reader),
        *(unary(op) for op in ("flatten", "cast")),
        *(unary(op, _same_sizes_everywhere) for op in ("reshape", "expand")),
        Rule(lambda x: x * 1, _keep, _same_meta, name="mul"),   # also 1 * x, x * 1.0
        Rule(lambda x: x / 1, _keep, _same_meta, name="div"),
        Rule(lambda x: x + 0, _keep, _same_meta, name="add"),
        Rule(lambda x: x - 0, _keep, _same_meta, name="sub"),
    ])


@register_pass("remove-identity")
class RemoveIdentity(Pass):
    """Removes no-ops: identity, eval dropout, same-shape reshape/flatten/expand/contiguous, x*1, x+0, x/1.

    Also same-dtype casts and x-0. A dropout is a no-op when its `training` attr is False, or None
    (follow the module's mode) in a graph captured in eval mode."""

    preserves_outputs = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        writer = graph_mutates(graph)
        if writer is not None:
            ctx.logger.debug("remove-identity: only `identity` nodes are removed: %%%s (%s) writes in place, "
                             "so `x * 1` may be a copy that matters", writer.name, writer.op)
        rules = noop_rules() if writer is None else RuleSet([noop_rules()["identity"]])
        counts = apply_rules(graph, rules)
        removed = {k: v for k, v in sorted(counts.items()) if v}
        return PassResult(changed=bool(removed), stats={"removed": sum(removed.values()), **{
            f"removed_{k}": v for k, v in removed.items()}})


@register_pass("fold-constants")
class FoldConstants(Pass):
    """Computes subgraphs that depend only on params and constants once, storing results as params."""

    preserves_outputs = True

    max_growth_numel: int = option(65536, ge=0, help=(
        "elements: a folded tensor bigger than every param it is computed from is stored only up to this "
        "many elements, so folding (e.g. an `expand` of a bias) never bloats the model; 0 folds only what "
        "is no bigger than its params"))

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if (writer := _refuse_mutating(graph, ctx, self.name)) is not None:
            return writer
        const: dict[Node, tuple[int, bool]] = {}  # node -> (largest param numel in its cone, reads trainable)
        for n in graph:
            if not is_deterministic(n) or (n.op == "opaque" and n.attrs.get("kind") == "call_module"):
                continue
            big, trainable, ok = 0, False, True
            for r in _refs(n):
                if isinstance(r, Node):
                    if r not in const:
                        ok = False
                        break
                    big, trainable = max(big, const[r][0]), trainable or const[r][1]
                elif isinstance(r, Param):
                    t = graph.params[r.name]
                    big = max(big, t.numel())
                    trainable = trainable or (r.name not in graph.buffers and t.is_floating_point())
            if ok:
                const[n] = (big, trainable)
        frontier = [n for n in const if any(u not in const for u in n.users)]
        if not frontier:
            return PassResult(changed=False, stats={"folded": 0})
        values: dict[Node, Any] = {}

        def value_of(r: Any) -> Any:
            if isinstance(r, Param):
                return graph.params[r.name]
            if r not in values:
                values[r] = eval_node(r, value_of)
            return values[r]

        folded = skipped = 0
        with torch.no_grad():
            for n in frontier:
                try:
                    v = value_of(n)
                except Exception as e:  # noqa: BLE001 - leave a node we cannot compute where it is
                    ctx.logger.debug("fold-constants: %%%s (%s) not folded: %s", n.name, n.op, e)
                    skipped += 1
                    continue
                big, trainable = const[n]
                if isinstance(v, torch.Tensor):
                    if v.numel() > max(big, self.max_growth_numel) or \
                            any(_reads_in_attrs(u, n) for u in n.users):
                        skipped += 1
                        continue
                    ref: Any = graph.add_param(f"folded.{n.name}", v.detach().clone(), buffer=not trainable)
                elif _is_literal(v):
                    ref = tuple(v) if isinstance(v, torch.Size) else v
                else:
                    skipped += 1
                    continue
                for u in list(n.users):
                    if u not in const:
                        u.replace_input(n, ref)
                folded += 1
        erased = erase_dead(graph, [n for n in graph if n in const])
        graph.remove_unused_params()
        return PassResult(changed=folded > 0, stats={"folded": folded, "nodes_removed": erased,
                                                     "not_folded": skipped})


def _refuse_mutating(graph: Graph, ctx: PassContext, name: str) -> PassResult | None:
    """Value-based rewrites are unsound when tensors are written in place after they are computed
    (two equal-looking reads may see different values): such graphs are left alone, and said so."""
    writer = graph_mutates(graph)
    if writer is None:
        return None
    ctx.logger.info("%s: skipped, %%%s (%s, %s) writes a tensor in place", name, writer.name, writer.op,
                    writer.where())
    return PassResult(changed=False, stats={"skipped_in_place_writes": 1})


def _refs(n: Node):
    yield from iter_refs((n.inputs, n.attrs))


def _reads_in_attrs(user: Node, n: Node) -> bool:
    return any(r is n for r in iter_refs(user.attrs))


def _is_literal(v: Any) -> bool:
    if isinstance(v, (bool, int, float)):
        return True
    return isinstance(v, (tuple, list, torch.Size)) and all(isinstance(x, (bool, int, float)) for x in v)


class _Unhashable(Exception):
    pass


def _key(v: Any) -> Any:
    """A hashable key equal for operands that are interchangeable (same node, param or constant)."""
    if isinstance(v, (Node, Param)):
        return v
    if isinstance(v, float):
        return ("float", repr(v))  # keeps 0.0 and -0.0 apart
    if v is None or isinstance(v, (bool, int, str, torch.dtype, type(Ellipsis))):
        return (type(v).__name__, v)
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_key(x) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple((k, _key(x)) for k, x in v.items()))
    if isinstance(v, slice):
        return ("slice", _key(v.start), _key(v.stop), _key(v.step))
    if isinstance(v, torch.Tensor):
        raise _Unhashable
    try:
        hash(v)
    except TypeError:
        raise _Unhashable from None
    return (type(v).__qualname__, v)


@register_pass("cse")
class CommonSubexpressionElimination(Pass):
    """Merges nodes that compute the same op on the same operands and attrs (add/mul in either order)."""

    preserves_outputs = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if (writer := _refuse_mutating(graph, ctx, self.name)) is not None:
            return writer
        seen: dict[Any, Node] = {}
        merged = 0
        for n in graph.nodes:
            if n.op == "opaque" or not is_deterministic(n) or has_side_effects(n):
                continue
            try:
                ins = [_key(v) for v in n.inputs]
                if n.op in COMMUTATIVE_OPS and len(ins) == 2:
                    ins.sort(key=repr)
                k = (n.op, tuple(ins), _key(n.attrs))
            except _Unhashable:
                continue
            first = seen.get(k)
            if first is None:
                seen[k] = n
                continue
            if first.meta != n.meta:
                continue
            graph.replace_all_uses(n, first)
            graph.erase(n)
            merged += 1
        return PassResult(changed=merged > 0, stats={"merged": merged})


__all__ = ["DeadCodeElimination", "RemoveIdentity", "FoldConstants", "CommonSubexpressionElimination"]
