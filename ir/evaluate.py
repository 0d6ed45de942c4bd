"""Evaluator: run a graph on fixed inputs op by op, and run it again after edits recomputing only what changed.

    ev = Evaluator((x,))
    before = ev(graph)        # every node computed (eval mode, no autograd)
    ...                       # a pass edits the graph
    after = ev(graph)         # only nodes whose op, operands, attributes or params changed, or that read
                              # a value that changed, are computed again

What `ir.lower(graph).eval()(x)` computes, without building a torch.fx module (which costs far more than
running a large graph on small inputs). The PassManager's numerics check uses it after every pass. A value
computed again and found equal (torch.equal) to the one before stops the recomputation there: removing a
no-op or merging duplicates recomputes only the nodes that now read something else. Every node's value is
kept between calls (what a forward pass for training keeps too).
"""

from __future__ import annotations

from typing import Any

import torch

from slimfx.ir.graph import Graph, Node, Param, map_refs, operands
from slimfx.ir.ops import get_op


class Evaluator:
    """Runs graphs on `inputs` (a tuple, one per graph input), reusing the values of unchanged nodes."""

    def __init__(self, inputs: tuple):
        self.inputs = tuple(inputs)
        self._known: dict[Node, tuple] = {}  # node -> (operands(), op, nodes read, params read, states, value)
        self.computed = 0  # nodes computed by the last call (the rest were reused)

    def __call__(self, graph: Graph) -> Any:
        """The graph's outputs (its output structure) on the inputs."""
        env: dict[Node, Any] = {}
        changed: set[Node] = set()
        known: dict[Node, tuple] = {}
        last = self._known
        params = graph.params
        ins = iter(self.inputs)
        computed = 0
        with torch.no_grad():
            for n in graph:
                if n.op == "output":
                    self._known, self.computed = known, computed
                    return map_refs(n.inputs[0], lambda r: env[r] if isinstance(r, Node) else params[r.name])
                # (operands(), op, nodes read, params read, their states, value) as last time
                prev = last.get(n)
                ops, same = operands(n, prev[0] if prev is not None else None)
                if same:
                    read, pread = prev[2], prev[3]
                else:
                    read = tuple(r for r in ops[2] if type(r) is Node)
                    pread = tuple(r.name for r in ops[2] if type(r) is not Node)
                    prev = None
                state = [(id(t), t._version) for t in map(params.__getitem__, pread)] if pread else None
                if n.op == "input":
                    value = next(ins)
                    fresh = prev is None or prev[5] is not value
                elif prev is None or prev[1] != n.op or prev[4] != state or (changed and not changed.isdisjoint(read)):
                    value, fresh = _compute(n, env, params), True
                    computed += 1
                else:
                    value, fresh = prev[5], False
                if fresh and (prev is None or not _equal(prev[5], value)):
                    changed.add(n)
                env[n] = value
                known[n] = (ops, n.op, read, pread, state, value)
        raise ValueError("graph has no output node")  # pragma: no cover - verify refuses such graphs

    def forget(self) -> None:
        """Drop every kept value (the next call computes everything)."""
        self._known = {}


_LEAF = (int, float, bool, str, type(None), torch.dtype)


def _compute(n: Node, env: dict[Node, Any], params: dict[str, torch.Tensor]) -> Any:
    def fetch(r: Any) -> Any:
        return env[r] if isinstance(r, Node) else params[r.name]

    def bind(v: Any) -> Any:
        t = type(v)
        if t is Node:
            return env[v]
        if t is Param:
            return params[v.name]
        if t in _LEAF or (t is tuple and all(type(e) in _LEAF for e in v)):
            return v
        return map_refs(v, fetch)

    args = tuple(map(bind, n.inputs))
    kwargs = {k: bind(v) for k, v in n.attrs.items()}
    if n.op == "opaque":
        kind, target = kwargs["kind"], kwargs["target"]
        extra = kwargs.get("kwargs", {})
        if kind == "call_module":
            return kwargs["module"].eval()(*args, **extra)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **extra)
        return target(*args, **extra)
    op = get_op(n.op)
    if op.training_flag and kwargs.get("training") is None:
        kwargs["training"] = False
    return op.impl(*args, **kwargs)


def _same(a: tuple, b: tuple) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a tensor attribute compared by value: treat as changed
        return False


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return _same((a,), (b,))


__all__ = ["Evaluator"]
