"""Facts about nodes that several passes need: does it run in training mode, does it have side
effects, is it deterministic, and what it computes on concrete values."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from ir import Graph, Node, Param, map_refs
from ir.ops import OPS

_RANDOM_WORDS = ("rand", "normal", "bernoulli", "multinomial", "poisson", "dropout", "empty", "uniform",
                 "rrelu", "exponential", "geometric", "cauchy", "seed")
_EFFECT_TARGETS = {operator.setitem, operator.delitem, print}


def runs_in_training(node: Node) -> bool:
    """Whether a batch_norm/dropout node computes in training mode (attr training=None follows the
    graph's mode, which is the mode the lowered module starts in)."""
    t = node.attrs.get("training")
    return bool(node.graph.training if t is None and node.graph is not None else t)


def _target_name(node: Node) -> str:
    t = node.attrs.get("target")
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def has_side_effects(node: Node) -> bool:
    """True for nodes that must stay even when nothing reads them: inputs/outputs, module calls (they may
    update state), in-place calls (`x.add_()`, `x[i] = v`), asserts/prints, and batch_norm in training
    mode (it updates the running statistics)."""
    if node.op in ("input", "output"):
        return True
    if node.op == "opaque":
        if node.attrs.get("kind") == "call_module" or node.attrs.get("target") in _EFFECT_TARGETS:
            return True
        name = _target_name(node)
        return (name.endswith("_") and not name.endswith("__")) or "assert" in name or "print" in name \
            or "warn" in name
    return node.op == "batch_norm" and runs_in_training(node)


def is_deterministic(node: Node) -> bool:
    """Same inputs, same output, no side effects: safe to compute once (folding) or share (CSE)."""
    if has_side_effects(node):
        return False
    if node.op == "opaque":
        return not any(w in _target_name(node).lower() for w in _RANDOM_WORDS)
    op = OPS.get(node.op)
    return op is not None and not (op.training_flag and runs_in_training(node))


def eval_node(node: Node, value_of: Callable[[Any], Any]) -> Any:
    """Compute a (deterministic, non-module) node on concrete operand values, as lowering would."""
    args = map_refs(node.inputs, value_of)
    kwargs = map_refs(node.attrs, value_of)
    if node.op == "opaque":
        kind, target = node.attrs["kind"], node.attrs["target"]
        kw = map_refs(node.attrs.get("kwargs", {}), value_of)
        if kind == "call_function":
            return target(*args, **kw)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kw)
        raise ValueError(f"cannot evaluate %{node.name}: {kind} nodes are not folded")
    op = OPS[node.op]
    if op.training_flag and kwargs.get("training") is None:
        kwargs["training"] = False
    if node.op == "batch_norm":
        args = args[:5]  # num_batches_tracked only matters in training
    return op.impl(*args, **kwargs)


def meta_of_value(v: Any, graph: Graph) -> Any:
    """TensorMeta of a node or param operand (None for constants or unknown)."""
    from ir import TensorMeta

    if isinstance(v, Node):
        return v.meta
    if isinstance(v, Param):
        return TensorMeta.of(graph.params[v.name])
    return None


def is_scalar(v: Any, value: float) -> bool:
    """A Python number equal to `value` (not a bool, not a tensor)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == value


def erase_dead(graph: Graph, nodes: list[Node]) -> int:
    """Erase those of `nodes` that nothing reads and that have no side effects, users first."""
    removed = 0
    for n in reversed(nodes):
        if n.graph is graph and not n.users and not has_side_effects(n):
            graph.erase(n)
            removed += 1
    return removed


__all__ = ["runs_in_training", "has_side_effects", "is_deterministic", "eval_node", "meta_of_value",
           "is_scalar", "erase_dead"]
