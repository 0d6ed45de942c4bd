"""The graph IR: nodes in topological order, graph inputs and outputs, and a params table.

A node's `inputs` are data operands (other nodes, `Param` references, Python
constants, or lists/tuples of those); its `attrs` are configuration (stride,
dims, ...), and may also refer to nodes (a reshape whose size comes from
`size(x, 0)`). Use lists are kept up to date when `inputs`/`attrs` are
*assigned*; mutate them only by assignment.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPE_SHORT = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "bool",
}


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of a tensor value, as seen on the example inputs.

    `sym` names the symbolic dims: one entry per dim, a name ("batch", "seq", "height", a user's) where the
    dim is exactly that size at any size the model runs at, None where it is fixed or derived (batch * heads);
    `sym` None: not known (a node a pass made; `ir.propagate_symbols` fills it in). A graph input's `sym` is
    what the exporters keep dynamic (ONNX dim_param names, torch.export Dims). Metas compare by shape and
    dtype only: the same tensor type with or without names.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    sym: tuple[str | None, ...] | None = field(default=None, compare=False)

    @staticmethod
    def of(t: torch.Tensor) -> TensorMeta:
        return TensorMeta(tuple(int(s) for s in t.shape), t.dtype)

    def with_sym(self, sym: Any) -> TensorMeta:
        """The same meta with symbolic dim names `sym` (None, or one name/None per dim)."""
        if sym is not None:
            sym = tuple(sym)
            if len(sym) != len(self.shape):
                raise ValueError(f"{len(sym)} symbolic dim names for a rank-{len(self.shape)} tensor")
        return TensorMeta(self.shape, self.dtype, sym)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def __str__(self) -> str:
        dims = [f"{n}:{d}" if n else str(d) for d, n in zip(self.shape, self.sym or (None,) * len(self.shape))]
        return f"{_DTYPE_SHORT.get(self.dtype, str(self.dtype).replace('torch.', ''))}[{', '.join(dims)}]"


def meta_of(value: Any) -> Any:
    """TensorMeta for a tensor, a tuple of metas for a tuple/list of tensors, None otherwise."""
    if isinstance(value, torch.Tensor):
        return TensorMeta.of(value)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(TensorMeta.of(v) for v in value)
    return None


@dataclass(frozen=True)
class Param:
    """A reference to an entry of the graph's params table."""

    name: str

    def __str__(self) -> str:
        return f"@{self.name}"


def map_refs(value: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply `fn` to every Node and Param leaf of a nested input/attr structure."""
    if isinstance(value, (Node, Param)):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_refs(v, fn) for v in value)
    if isinstance(value, list):
        return [map_refs(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_refs(v, fn) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(map_refs(value.start, fn), map_refs(value.stop, fn), map_refs(value.step, fn))
    return value


def iter_refs(value: Any) -> Iterator[Node | Param]:
    """Every Node and Param leaf of a nested structure, in order."""
    if isinstance(value, (Node, Param)):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from iter_refs(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_refs(v)
    elif isinstance(value, slice):
        for v in (value.start, value.stop, value.step):
            yield from iter_refs(v)


def operands(node: Node, last: tuple | None) -> tuple[tuple, bool]:
    """((inputs, attr items, refs), unchanged) for a node checked again and again: `last` is what this
    returned for it before; its refs are reused when the node's inputs were not reassigned and its
    attributes hold the same values (incremental checks: ir.Verifier, ir.Evaluator)."""
    inputs, items = node._inputs, tuple(node._attrs.items())
    if last is not None and last[0] is inputs:
        try:
            if last[1] == items:
                return last, True
        except Exception:  # noqa: BLE001 - a tensor attribute compared by value: treat as changed
            pass
    refs: list[Node | Param] = []
    _collect(inputs, refs)
    _collect(node._attrs, refs)
    return (inputs, items, refs), False


def _collect(value: Any, out: list) -> None:
    t = type(value)
    if t is Node or t is Param:
        out.append(value)
    elif t is tuple or t is list:
        for v in value:
            tv = type(v)
            if tv is Node or tv is Param:
                out.append(v)
            elif tv not in _SCALARS and not (tv is tuple and all(type(e) in _SCALARS for e in v)):
                _collect(v, out)
    elif t is dict:
        _collect(list(value.values()), out)
    elif t is slice:
        _collect((value.start, value.stop, value.step), out)
    elif isinstance(value, (Node, Param, tuple, list, dict)):  # a subclass (fx's immutable_list): the general walk
        out.extend(iter_refs(value))


_SCALARS = (int, float, bool, type(None))  # a tuple of these (stride, padding, a shape) holds no refs


def _tensor_key(t: Any, name: str) -> Any:
    """What makes two params one tensor: the same view of the same storage (`name` where that cannot be told)."""
    if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel():
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
    return name


class Node:
    """One operation. `op` is a canonical op name (see ir.ops), `input`, `output` or `opaque`."""

    __slots__ = ("name", "op", "_inputs", "_attrs", "meta", "source", "module_path", "users",
                 "graph", "_prev", "_next", "__weakref__")

    def __init__(self, name: str, op: str, inputs: Iterable[Any] = (), attrs: dict[str, Any] | None = None,
                 meta: Any = None, source: str | None = None, module_path: str | None = None):
        self.name = name
        self.op = op
        self._inputs: tuple[Any, ...] = tuple(inputs)
        self._attrs: dict[str, Any] = dict(attrs or {})
        self.meta = meta
        self.source = source
        self.module_path = module_path
        self.users: dict[Node, None] = {}
        self.graph: Graph | None = None
        self._prev: Node | None = None
        self._next: Node | None = None

    # -- operands -------------------------------------------------------------
    @property
    def inputs(self) -> tuple[Any, ...]:
        return self._inputs

    @inputs.setter
    def inputs(self, value: Iterable[Any]) -> None:
        self._unlink_uses()
        self._inputs = tuple(value)
        self._link_uses()

    @property
    def attrs(self) -> dict[str, Any]:
        return self._attrs

    @attrs.setter
    def attrs(self, value: dict[str, Any]) -> None:
        self._unlink_uses()
        self._attrs = dict(value)
        self._link_uses()

    def input_nodes(self) -> list[Node]:
        """Distinct nodes this node reads, in operand order."""
        seen: dict[Node, None] = {}
        for r in itertools.chain(iter_refs(self._inputs), iter_refs(self._attrs)):
            if isinstance(r, Node):
                seen[r] = None
        return list(seen)

    def params(self) -> list[Param]:
        """Param references among the inputs, in operand order."""
        return [r for r in iter_refs(self._inputs) if isinstance(r, Param)]

    def replace_input(self, old: Node, new: Any) -> None:
        """Replace every reference to `old` in inputs and attrs by `new`."""
        swap = lambda r: new if r is old else r  # noqa: E731
        self._unlink_uses()
        self._inputs = map_refs(self._inputs, swap)
        self._attrs = map_refs(self._attrs, swap)
        self._link_uses()

    def _link_uses(self) -> None:
        if self.graph is None:
            return
        for n in self.input_nodes():
            n.users[self] = None

    def _unlink_uses(self) -> None:
        if self.graph is None:
            return
        for n in self.input_nodes():
            n.users.pop(self, None)

    # -- navigation -----------------------------------------------------------
    @property
    def next(self) -> Node | None:
        return self._next if self._next is not None and self._next.op != "_root" else None

    @property
    def prev(self) -> Node | None:
        return self._prev if self._prev is not None and self._prev.op != "_root" else None

    @property
    def tensor_meta(self) -> TensorMeta:
        """The output TensorMeta; raises if the node does not produce a single tensor."""
        if not isinstance(self.meta, TensorMeta):
            raise TypeError(f"node %{self.name} ({self.op}) has no single-tensor meta: {self.meta!r}")
        return self.meta

    def where(self) -> str:
        """Human description of where the node comes from, for error messages."""
        parts = []
        if self.module_path:
            parts.append(f"module '{self.module_path}'")
        if self.source:
            parts.append(self.source)
        return ", ".join(parts) if parts else "unknown source"

    def __repr__(self) -> str:
        return f"%{self.name}"


class Graph:
    """Nodes in topological order (a doubly linked list), plus the params table.

    `params` maps a name to a tensor (every weight and buffer); `buffers` is the
    subset of names that are not trainable (running stats, quantized ints, ...).
    """

    def __init__(self) -> None:
        self._root = Node("_root", "_root")
        self._root._prev = self._root._next = self._root
        self._names: dict[str, Node] = {}
        self._next_suffix: dict[tuple[bool, str], int] = {}  # (is_param, base) -> next suffix to try
        self.params: dict[str, torch.Tensor] = {}
        self.buffers: set[str] = set()
        self.name = "graph"
        self.training = False  # the mode the lowered module starts in (that of the captured model)
        self.capture_method = "fx"  # the front end that built the graph: "fx" or "export" (see ir.capture)
        # What a saved model file recorded about how the graph was made (recipe, pass history, model name);
        # JSON-able; written back by `save` (see ir/serialize.py).
        self.metadata: dict[str, Any] = {}

    # -- iteration ----------------------------------------------------------
    def __iter__(self) -> Iterator[Node]:
        n = self._root._next
        while n is not self._root:
            nxt = n._next
            yield n
            n = nxt

    @property
    def nodes(self) -> list[Node]:
        return list(self)

    def __len__(self) -> int:
        return len(self._names)

    @property
    def inputs(self) -> list[Node]:
        return [n for n in self if n.op == "input"]

    @property
    def output_node(self) -> Node:
        last = self._root._prev
        if last is self._root or last.op != "output":
            raise ValueError("graph has no output node")
        return last

    @property
    def outputs(self) -> Any:
        """The output structure (a node, or a tuple/list/dict of nodes)."""
        return self.output_node.inputs[0]

    def output_nodes(self) -> list[Node]:
        return [r for r in iter_refs(self.outputs) if isinstance(r, Node)]

    def node(self, name: str) -> Node:
        try:
            return self._names[name]
        except KeyError:
            raise KeyError(f"no node named %{name} in the graph") from None

    def has_node(self, name: str) -> bool:
        return name in self._names

    def find(self, op: str | None = None, *, module_path: str | None = None) -> list[Node]:
        """Nodes with the given op and/or module path."""
        return [n for n in self if (op is None or n.op == op)
                and (module_path is None or n.module_path == module_path)]

    # -- construction ----------------------------------------------------------
    def unique_name(self, base: str) -> str:
        base = base or "v"
        if base not in self._names:
            return base
        return self._fresh(base, self._names)

    def _fresh(self, base: str, taken: dict) -> str:
        """`base_i` for the first free i, remembering i per base so that creating n nodes (or params)
        with one base name costs O(n), not O(n^2)."""
        key = (taken is self.params, base)
        i = self._next_suffix.get(key, 1)
        while f"{base}_{i}" in taken:
            i += 1
        self._next_suffix[key] = i + 1
        return f"{base}_{i}"

    def create_node(self, op: str, inputs: Iterable[Any] = (), attrs: dict[str, Any] | None = None, *,
                    name: str | None = None, meta: Any = None, before: Node | None = None,
                    after: Node | None = None, source: str | None = None,
                    module_path: str | None = None) -> Node:
        """Create a node and insert it before/after an anchor (default: before the output node)."""
        node = Node(self.unique_name(name or op), op, inputs, attrs, meta, source, module_path)
        if before is None and after is None:
            last = self._root._prev
            before = last if last is not self._root and last.op == "output" else self._root
        self._insert(node, before if before is not None else after._next)  # type: ignore[union-attr]
        return node

    def _insert(self, node: Node, before: Node) -> None:
        if node.name in self._names:
            raise ValueError(f"node name %{node.name} already used")
        prev = before._prev
        node._prev, node._next = prev, before
        prev._next = node  # type: ignore[union-attr]
        before._prev = node
        node.graph = self
        self._names[node.name] = node
        node._link_uses()

    def move_before(self, node: Node, anchor: Node) -> None:
        """Move an existing node so it sits right before `anchor`."""
        node._prev._next, node._next._prev = node._next, node._prev  # type: ignore[union-attr]
        prev = anchor._prev
        node._prev, node._next = prev, anchor
        prev._next = node  # type: ignore[union-attr]
        anchor._prev = node

    def set_outputs(self, outputs: Any) -> Node:
        """Set (or replace) the output structure."""
        try:
            out = self.output_node
            out.inputs = (outputs,)
            return out
        except ValueError:
            return self.create_node("output", (outputs,), name="output", before=self._root)

    def replace_all_uses(self, old: Node, new: Any) -> int:
        """Make every user of `old` read `new` instead. Returns the number of users changed."""
        users = list(old.users)
        for u in users:
            u.replace_input(old, new)
        return len(users)

    def erase(self, node: Node) -> None:
        """Remove a node that nothing uses any more."""
        if node.users:
            raise ValueError(f"cannot erase %{node.name}: still used by {list(node.users)}")
        node._unlink_uses()
        node._prev._next, node._next._prev = node._next, node._prev  # type: ignore[union-attr]
        node._prev = node._next = None
        node.graph = None
        del self._names[node.name]

    def rename(self, node: Node, new_name: str) -> None:
        new_name = self.unique_name(new_name)
        del self._names[node.name]
        node.name = new_name
        self._names[new_name] = node

    # -- params ----------------------------------------------------------------
    def add_param(self, name: str, tensor: torch.Tensor, *, buffer: bool = False, unique: bool = True) -> Param:
        """Add a tensor to the params table (under a fresh name if `unique` and taken)."""
        if unique and name in self.params:
            name = self._fresh(name, self.params)
        self.params[name] = tensor.detach()
        if buffer or not tensor.is_floating_point():
            self.buffers.add(name)
        else:
            self.buffers.discard(name)
        return Param(name)

    def param(self, ref: Param | str) -> torch.Tensor:
        name = ref.name if isinstance(ref, Param) else ref
        return self.params[name]

    def param_users(self, *, tied: bool = False) -> dict[str, list[Node]]:
        """Which nodes read each param; with `tied`, each name lists the readers of every name that holds the
        same tensor (`param_aliases`: an LM head tied to the token table reads it under a name of its own)."""
        users: dict[str, list[Node]] = {name: [] for name in self.params}
        for n in self:
            for p in n.params():
                users.setdefault(p.name, []).append(n)
        if tied:
            alias = self.param_aliases()
            merged: dict[str, list[Node]] = {}
            for name, readers in users.items():
                merged.setdefault(alias.get(name, name), []).extend(readers)
            users = {name: merged[alias.get(name, name)] for name in users}
        return users

    def param_aliases(self) -> dict[str, str]:
        """Each param's canonical name: the first param that holds the same tensor (same storage, offset, shape,
        strides and dtype). fx capture names a tied weight once per module holding it (`wte.weight` and
        `head.weight`); the names stay, and copies, files and exports keep them one tensor."""
        first: dict[Any, str] = {}
        return {name: first.setdefault(_tensor_key(t, name), name) for name, t in self.params.items()}

    def remove_unused_params(self) -> list[str]:
        used = {p.name for n in self for p in itertools.chain(n.params(), (r for r in iter_refs(n.attrs) if isinstance(r, Param)))}
        dropped = [k for k in self.params if k not in used]
        for k in dropped:
            del self.params[k]
            self.buffers.discard(k)
        return dropped

    # -- whole-graph helpers ------------------------------------------------------
    def copy(self) -> Graph:
        """A deep copy: new nodes, cloned params."""
        g = Graph()
        g.name = self.name
        g.training = self.training
        g.capture_method = self.capture_method
        g.metadata = copy.deepcopy(self.metadata)
        mapping: dict[Node, Node] = {}
        remap = lambda r: mapping[r] if isinstance(r, Node) else r  # noqa: E731
        for n in self:
            m = Node(n.name, n.op, map_refs(n.inputs, remap), map_refs(n.attrs, remap), n.meta, n.source,
                     n.module_path)
            g._insert(m, g._root)
            mapping[n] = m
        clones: dict[Any, torch.Tensor] = {}  # tied params (param_aliases) stay one tensor
        g.params = {}
        for k, v in self.params.items():
            key = _tensor_key(v, k)
            if key not in clones:
                clones[key] = v.clone()
            g.params[k] = clones[key]
        g.buffers = set(self.buffers)
        return g

    def checkpoint(self) -> Checkpoint:
        """The graph as it is now, cheaply (no text, no tensor copies): `restore()` rebuilds it later even
        after passes edit this graph. Params are held by reference; `modified_params()` names those
        changed in place since (their restored values are the changed ones)."""
        return Checkpoint(self)

    def save(self, path: str | os.PathLike, *, metadata: dict[str, Any] | None = None) -> Any:
        """Write the graph as a .slimfx file: IR text, safetensors weights, JSON metadata (ir/serialize.py).
        Returns the path."""
        from slimfx.ir.serialize import save_graph

        return save_graph(self, path, metadata=metadata)

    @staticmethod
    def load(path: str | os.PathLike) -> Graph:
        """Read a .slimfx file (no pickle, no code run); ModelFileError naming the file when it cannot.
        Ops that packages register (e.g. slimfx.passes) must be imported first: `slimfx.load` does that."""
        from slimfx.ir.serialize import load_graph

        return load_graph(path)

    def to_networkx(self):
        """A networkx.MultiDiGraph view: one vertex per node (by name) and per param ('@name').

        Edge attributes: `pos` is the operand index of the target node that reads the source.
        Derived, never the source of truth.
        """
        import networkx as nx

        g = nx.MultiDiGraph()
        for n in self:
            g.add_node(n.name, kind="node", op=n.op, node=n)
            for pos, arg in enumerate(n.inputs):
                for r in iter_refs(arg):
                    if isinstance(r, Param):
                        g.add_node(f"@{r.name}", kind="param", op="param", param=r.name)
                        g.add_edge(f"@{r.name}", n.name, pos=pos)
                    else:
                        g.add_edge(r.name, n.name, pos=pos)
            for key, val in n.attrs.items():
                for r in iter_refs(val):
                    if isinstance(r, Node):
                        g.add_edge(r.name, n.name, pos=key)
        return g

    def __str__(self) -> str:
        from slimfx.ir.printer import format_graph

        return format_graph(self)

    def __repr__(self) -> str:
        return f"<ir.Graph {self.name}: {len(self)} nodes, {len(self.params)} params>"


class Checkpoint:
    """What `Graph.checkpoint` returns: every node's fields as they were, the params table by reference."""

    def __init__(self, graph: Graph):
        self.rows = [(n, n.name, n.op, n._inputs, dict(n._attrs), n.meta, n.source, n.module_path) for n in graph]
        self.params = dict(graph.params)
        self.versions = {k: t._version for k, t in self.params.items()}
        self.buffers = set(graph.buffers)
        self.header = (graph.name, graph.training, graph.capture_method, copy.deepcopy(graph.metadata))

    def modified_params(self) -> list[str]:
        return [k for k, t in self.params.items() if t._version != self.versions[k]]

    def restore(self) -> Graph:
        """A new Graph equal to the one checkpointed."""
        g = Graph()
        g.name, g.training, g.capture_method, g.metadata = self.header[0], self.header[1], self.header[2], \
            copy.deepcopy(self.header[3])
        mapping: dict[Node, Node] = {}
        remap = lambda r: mapping.get(r, r) if isinstance(r, Node) else r  # noqa: E731
        for old, name, op, inputs, attrs, meta, source, module_path in self.rows:
            m = Node(name, op, map_refs(inputs, remap), map_refs(attrs, remap), meta, source, module_path)
            g._insert(m, g._root)
            mapping[old] = m
        g.params, g.buffers = dict(self.params), set(self.buffers)
        return g
