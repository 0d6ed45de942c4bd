"""verify(graph): the IR's invariants. Passes run it after every change (PassManager)."""

from __future__ import annotations

from typing import Any

import torch

from slimfx.ir.errors import SlimfxError
from slimfx.ir.graph import Graph, Node, Param, TensorMeta, operands
from slimfx.ir.ops import OPS, STRUCTURAL_OPS, get_op, trait


class VerifyError(SlimfxError):
    """The graph breaks an IR invariant; the message names the node."""


def verify(graph: Graph, *, check_shapes: bool = True) -> None:
    """Check: defined-before-use, params present, known ops, users consistent, one output last,
    every tensor node has a meta, and (when `check_shapes`) metas agree with what the op computes
    on meta tensors of the input shapes. (`Verifier` checks one graph again and again, incrementally.)"""
    Verifier(check_shapes=check_shapes)(graph)


class Verifier:
    """verify() for a graph checked again and again, e.g. after every pass of a pipeline.

    The first call checks everything. Later calls on the same graph walk the operands and run the shape
    check only for nodes that changed: a node whose op, operands, attributes, meta, operand metas and param
    shapes are what they were at the last call keeps its verdict (its references are still checked against
    the node order and the use lists, which are cheap). A different graph starts afresh.
    """

    def __init__(self, *, check_shapes: bool = True):
        self.check_shapes = check_shapes
        self._graph: Graph | None = None
        self._known: dict[Node, tuple] = {}  # node -> (operands(), nodes read, state)

    def __call__(self, graph: Graph) -> None:
        if graph is not self._graph:
            self._graph, self._known = graph, {}
        known: dict[Node, tuple] = {}
        try:
            self._check(graph, known)
        finally:
            self._known = known  # what passed (on an error: the nodes before it)

    def _check(self, graph: Graph, known: dict[Node, tuple]) -> None:
        nodes = graph.nodes
        if not nodes or nodes[-1].op != "output":
            raise VerifyError("graph has no output node at its end")
        seen: set[Node] = set()
        names: set[str] = set()
        pairs = 0
        last = self._known
        params = graph.params
        for n in nodes:
            # what the node reads, walked again only when its operands or attributes changed
            prev = last.get(n)
            ops, same = operands(n, prev[0] if prev is not None else None)
            refs = ops[2]
            read = prev[1] if same else tuple(dict.fromkeys([r for r in refs if isinstance(r, Node)]))
            state = (n.op, n.meta, [r.meta if isinstance(r, Node) else
                                    (t.shape, t.dtype) if (t := params.get(r.name)) is not None else None
                                    for r in refs])
            if n.name in names:
                raise VerifyError(f"node name %{n.name} appears twice")
            names.add(n.name)
            if n.graph is not graph:
                raise VerifyError(f"%{n.name} does not belong to this graph")
            if n.op not in OPS and n.op not in STRUCTURAL_OPS:
                raise VerifyError(f"%{n.name} has unknown op {n.op!r}")
            if n.op == "output" and n is not nodes[-1]:
                raise VerifyError(f"output node %{n.name} is not the last node")
            _check_refs(n, refs, seen, graph)
            if not same or not _same(prev[2], state):
                _check_node(n, graph, self.check_shapes)
            pairs += len(read)
            seen.add(n)
            known[n] = (ops, read, state)
        if pairs != sum(len(n.users) for n in nodes):  # a use list names a node that does not read it
            for n in nodes:
                for u in n.users:
                    if u.graph is not graph or u not in known or n not in known[u][1]:
                        raise VerifyError(f"%{n.name}.users lists %{u.name}, which does not read it")


def _same(a: tuple, b: tuple) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a tensor attribute compared by value: treat as changed
        return False


def _check_refs(n: Node, refs: list, seen: set[Node], graph: Graph) -> None:
    for r in refs:
        if isinstance(r, Node):
            if r not in seen:
                raise VerifyError(f"%{n.name} ({n.op}) uses %{r.name} before it is defined"
                                  f"{'' if r.graph is graph else ' (the node is not in the graph)'}")
            if n not in r.users:
                raise VerifyError(f"%{r.name}.users is missing %{n.name} (inputs mutated in place?)")
        elif r.name not in graph.params:
            raise VerifyError(f"%{n.name} ({n.op}) reads param @{r.name}, which is not in the params table")


def _check_node(n: Node, graph: Graph, check_shapes: bool) -> None:
    """The checks of one changed node: it has a meta where it must, and (with shapes) the meta is right."""
    if n.meta is None and n.op not in ("output", "opaque") and not _may_be_value(n.op):
        raise VerifyError(f"%{n.name} ({n.op}) has no TensorMeta; run ir.propagate_shapes or set node.meta")
    if not check_shapes or n.op in STRUCTURAL_OPS or _may_be_value(n.op) or n.meta is None:
        return
    res = _cached_meta(n, graph)
    if res[0] == "err":
        raise VerifyError(f"%{n.name} ({n.op}, {n.where()}) fails on its input shapes: {res[1]}")
    if res[0] == "ok":
        got = res[1]
        if isinstance(got, (TensorMeta, tuple)) and got != n.meta:
            raise VerifyError(f"%{n.name} ({n.op}) records {n.meta} but computes {got} from its inputs")


def _may_be_value(op: str) -> bool:
    """Ops whose result may be a Python value rather than a tensor (size, shape, getitem): no meta."""
    return trait(op, "result") in ("value", "any")


def _fake(v, graph: Graph):
    if isinstance(v, Node):
        m = v.meta
        if isinstance(m, TensorMeta):
            return torch.empty(m.shape, dtype=m.dtype, device="meta")
        if isinstance(m, tuple) and all(isinstance(x, TensorMeta) for x in m):
            return tuple(torch.empty(x.shape, dtype=x.dtype, device="meta") for x in m)
        raise _Skip
    if isinstance(v, Param):
        t = graph.params[v.name]
        return torch.empty(t.shape, dtype=t.dtype, device="meta")
    if isinstance(v, tuple):
        return tuple(_fake(x, graph) for x in v)
    if isinstance(v, list):
        return [_fake(x, graph) for x in v]
    if isinstance(v, dict):
        return {k: _fake(x, graph) for k, x in v.items()}
    if isinstance(v, slice) and any(isinstance(x, Node) for x in (v.start, v.stop, v.step)):
        raise _Skip  # bounds computed at run time (size nodes): nothing to check statically
    return v


class _Skip(Exception):
    pass


# (op impl, operand shapes/constants, attrs) -> what the op computes on meta tensors. Many nodes
# share a signature (every block of a network, every pass of a pipeline re-verifying the same graph),
# and some meta kernels cost milliseconds (python decompositions), so verify memoizes them.
_SHAPE_CACHE: dict[Any, tuple] = {}
_SHAPE_CACHE_MAX = 100_000


class _Unhashable(Exception):
    pass


def _sig(v: Any, graph: Graph) -> Any:
    """A hashable stand-in for an operand that determines the op's output meta."""
    if isinstance(v, Node):
        return ("n", v.meta)
    if isinstance(v, Param):
        t = graph.params[v.name]
        return ("p", tuple(t.shape), t.dtype)
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_sig(x, graph) for x in v))
    if isinstance(v, dict):
        return ("d", tuple((k, _sig(x, graph)) for k, x in v.items()))
    if isinstance(v, slice):
        return ("s", _sig(v.start, graph), _sig(v.stop, graph), _sig(v.step, graph))
    if isinstance(v, torch.Tensor):  # hashed by identity: never a reliable (or memory-safe) key
        raise _Unhashable
    try:
        hash(v)
    except TypeError:
        raise _Unhashable from None
    return (type(v), v)


def _computed_meta(n: Node, graph: Graph) -> tuple:
    """("ok", meta) | ("skip",) | ("err", message): the op run on meta tensors of its operands."""
    op = get_op(n.op)
    try:
        args = _fake(n.inputs, graph)
        kwargs = _fake(n.attrs, graph)
        if op.training_flag and kwargs.get("training") is None:
            kwargs["training"] = False
        if op.state_inputs:  # run-time state (a counter the op bumps in training) shapes nothing
            args = tuple(None if i in op.state_inputs else a for i, a in enumerate(args))
        out = op.impl(*args, **kwargs)
    except _Skip:
        return ("skip",)
    except Exception as e:  # noqa: BLE001 - an op that fails on its recorded input shapes is broken
        if "meta" in str(e) and ("not implemented" in str(e).lower() or "NotImplemented" in type(e).__name__):
            return ("skip",)
        return ("err", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    got = out if not isinstance(out, torch.Tensor) else TensorMeta(tuple(out.shape), out.dtype)
    if isinstance(out, (tuple, list)):
        got = tuple(TensorMeta(tuple(o.shape), o.dtype) for o in out if isinstance(o, torch.Tensor))
    return ("ok", got)


def infer_meta(node: Node) -> Any:
    """The output meta of `node` computed from its operands' metas on meta tensors (no arithmetic);
    None when it cannot be inferred (operands without metas, ops without meta kernels). For passes
    that create nodes: `node.meta = infer_meta(node)`."""
    if node.graph is None or node.op in STRUCTURAL_OPS:
        return None
    res = _cached_meta(node, node.graph)
    return res[1] if res[0] == "ok" else None


def _cached_meta(n: Node, graph: Graph) -> tuple:
    try:
        key: Any = (n.op, get_op(n.op).impl, _sig(n.inputs, graph), _sig(n.attrs, graph))
    except _Unhashable:
        return _computed_meta(n, graph)
    res = _SHAPE_CACHE.get(key)
    if res is None:
        res = _computed_meta(n, graph)
        if len(_SHAPE_CACHE) >= _SHAPE_CACHE_MAX:
            _SHAPE_CACHE.clear()
        _SHAPE_CACHE[key] = res
    return res
