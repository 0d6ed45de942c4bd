"""Facts about nodes that several passes need: does it run in training mode, does it have side
effects, is it deterministic, and what it computes on concrete values."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from slimfx.ir import Graph, Node, Param, TensorMeta, map_refs
from slimfx.ir.ops import OPS

_RANDOM_WORDS = ("rand", "normal", "bernoulli", "multinomial", "poisson", "dropout", "empty", "uniform",
                 "rrelu", "exponential", "geometric", "cauchy", "seed")


def runs_in_training(node: Node) -> bool:
    """Whether a batch_norm/dropout node computes in training mode (attr training=None follows the
    graph's mode, which is the mode the lowered module starts in)."""
    t = node.attrs.get("training")
    return bool(node.graph.training if t is None and node.graph is not None else t)


def _target_name(node: Node) -> str:
    """`add_` for x.add_(), torch.add_ and aten.add_.Tensor alike (overload suffix dropped)."""
    t = node.attrs.get("target")
    if isinstance(t, str):
        return t
    packet = getattr(t, "overloadpacket", None)  # torch._ops.OpOverload (aten-level captures)
    return getattr(packet, "__name__", None) or getattr(t, "__name__", str(t))


def mutates(node: Node) -> bool:
    """The node writes into a graph tensor in place: an in-place call (`x.add_()`, `x[i] = v`,
    aten.copy_), batch_norm in training mode, or instance_norm normalizing with its input's statistics while it
    holds running ones (it updates them). A leaf module call may update its own buffers, which no other node can
    read, so it does not count here (but see has_side_effects)."""
    if node.op == "opaque":
        target = node.attrs.get("target")
        schema = getattr(target, "_schema", None)
        if schema is not None and getattr(schema, "is_mutable", False):
            return True
        name = _target_name(node)
        return target in (operator.setitem, operator.delitem) or (name.endswith("_") and not name.endswith("__"))
    if node.op == "instance_norm":
        use_input_stats = node.attrs.get("use_input_stats")
        return node.inputs[1] is not None and (runs_in_training(node) if use_input_stats is None else use_input_stats)
    return node.op == "batch_norm" and runs_in_training(node)


def graph_mutates(graph: Graph) -> Node | None:
    """The first node that writes into a tensor in place, or None. Value-based rewrites (cse,
    constant folding, no-op removal) assume tensors are never written after they are computed."""
    return next((n for n in graph if mutates(n)), None)


def has_side_effects(node: Node) -> bool:
    """True for nodes that must stay even when nothing reads them: inputs/outputs, in-place writes and
    module calls (see `mutates`), asserts, prints and warnings."""
    if node.op in ("input", "output"):
        return True
    if mutates(node):
        return True
    if node.op == "opaque":
        if node.attrs.get("kind") == "call_module" or node.attrs.get("target") is print:
            return True
        name = _target_name(node)
        return "assert" in name or "print" in name or "warn" in name
    return False


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


__all__ = ["runs_in_training", "has_side_effects", "is_deterministic", "mutates", "graph_mutates",
           "eval_node", "meta_of_value", "is_scalar", "erase_dead"]
