"""Pattern rewriting: match a small function of torch ops against the graph and replace it.

    def pat(x, w, b):
        return F.relu(F.linear(x, w, b))

    pattern = Pattern(pat)
    for m in pattern.find(graph): ...                 # inspect
    rewrite(graph, pattern, lambda g, m: ..., condition=lambda m: ...)   # replace
    print(pattern.explain(graph))                     # why did it not match?

A pattern is traced with capture's own converters, so it is the same canonical IR
as the graph (`F.linear`, `nn.Linear` and `torch._C._nn.linear` all become
`linear`). Matching rules:

- Each argument of the pattern function is a wildcard: it matches any graph
  value that is a node or a param (`@w`); an argument with a default value
  (`b=None`) also matches Python constants such as a missing bias. An argument
  used twice must bind the same value both times.
- Op nodes match graph nodes of the same op whose operands match recursively;
  `add` and `mul` (ir.ops.COMMUTATIVE_OPS) match either operand order.
- Attributes the pattern sets to a non-default value (`F.max_pool2d(x,
  kernel_size=3)`, `F.conv2d(x, w, b, stride=2)`) must be equal; attributes
  left at their default values match any value (`F.conv2d(x, w, b)` matches
  every stride and padding), unless `exact_attrs=True`.
- Every value computed inside a match, except the pattern's output, must be used
  only inside the match: rewriting it away would change other users.

Matching is anchored at the pattern's output op: candidates are the graph nodes
with that op, and each attempt costs the size of the pattern, so a sweep is
linear in the graph.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.fx as fx

from slimfx.ir import Graph, Node, Param
from slimfx.ir.capture import converter_for, trace_function
from slimfx.ir.errors import CaptureError, PassError
from slimfx.ir.ops import COMMUTATIVE_OPS
from slimfx.ir.printer import format_value
from slimfx.ir.verify import infer_meta
from slimfx.passes.base import Pass, PassContext, PassResult


class _Probe:
    """Stands in for an argument the pattern left at its default, to see which attrs it drives."""

    def __repr__(self) -> str:
        return "?"


_PROBE = _Probe()


def _contains_probe(v: Any) -> bool:
    if v is _PROBE:
        return True
    if isinstance(v, (tuple, list)):
        return any(_contains_probe(x) for x in v)
    if isinstance(v, dict):
        return any(_contains_probe(x) for x in v.values())
    return False


def _eq(a: Any, b: Any) -> bool:
    """Structural equality of constants (tuples equal lists; tensors by value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.equal(a, b)))
    if isinstance(a, (Node, Param)) or isinstance(b, (Node, Param)):
        return a is b or (isinstance(a, Param) and a == b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_eq(a[k], b[k]) for k in a)
    if type(a) is bool or type(b) is bool:
        return type(a) is type(b) and a == b
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable values are different
        return False


def _default_attr_keys(fx_node: fx.Node, node: Node, graph: Graph) -> set[str]:
    """Attrs of `node` that only come from converter arguments left at their default values.

    Each such argument is replaced by a stand-in (or, for a bool, flipped) and the converter re-run:
    the attrs that change are the ones it drives. (fx spells out every argument of some calls, e.g.
    F.max_pool2d, so "left at the default" means "equal to the default", not "not written".)
    """
    conv = converter_for(fx_node)
    if conv is None:
        return set()
    sig = inspect.signature(conv)
    lookup = lambda a: graph.node(a.name) if isinstance(a, fx.Node) and graph.has_node(a.name) else a  # noqa: E731
    try:
        bound = sig.bind(*fx.node.map_aggregate(fx_node.args, lookup),
                         **fx.node.map_aggregate(fx_node.kwargs, lookup))
    except TypeError:
        return set()
    wild: set[str] = set()
    for p in sig.parameters.values():
        if p.default is p.empty or p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        if p.name in bound.arguments and not _eq(bound.arguments[p.name], p.default):
            continue  # spelled out with a non-default value: must match literally
        probe = sig.bind(*bound.args, **bound.kwargs)
        probe.arguments[p.name] = (not p.default) if isinstance(p.default, bool) else _PROBE
        try:
            out = conv(*probe.args, **probe.kwargs)
        except Exception:  # noqa: BLE001 - the converter cannot take a stand-in: keep the attr literal
            continue
        if out is None or out[0] != node.op:
            continue
        for key, val in out[2].items():
            if _contains_probe(val) or key not in node.attrs or not _eq(val, node.attrs[key]):
                wild.add(key)
    return wild


class Match:
    """One occurrence of a pattern: the bound arguments and the matched nodes.

    `match["w"]` gives what a pattern argument bound (a Node, a Param or a constant) or the graph node
    matched by a pattern node (named as torch.fx names it: `linear`, `relu`, `add_1`; see
    `print(pattern)`). `match.anchor` is the node matched by the pattern's output.
    """

    def __init__(self, graph: Graph, anchor: Node, values: dict[str, Any], nodes: dict[str, Node]):
        self.graph = graph
        self.anchor = anchor
        self.values = values
        self.nodes = nodes

    def __getitem__(self, key: str) -> Any:
        if key in self.values:
            return self.values[key]
        if key in self.nodes:
            return self.nodes[key]
        raise KeyError(f"pattern has no argument or node {key!r}; arguments: {', '.join(self.values)}; "
                       f"nodes: {', '.join(self.nodes)}")

    def __contains__(self, key: str) -> bool:
        return key in self.values or key in self.nodes

    def param(self, key: str) -> torch.Tensor | None:
        """The tensor a pattern argument bound, when it bound a param (None when it bound None)."""
        v = self[key]
        if v is None:
            return None
        if not isinstance(v, Param):
            raise PassError(f"pattern argument {key!r} bound {format_value(v)}, not a param; check "
                            "`isinstance(match[key], Param)` in the pattern's condition")
        return self.graph.params[v.name]

    def insert(self, op: str, inputs: tuple = (), attrs: dict[str, Any] | None = None, *,
               name: str | None = None, meta: Any = None) -> Node:
        """Create a node right before the anchor, carrying the anchor's module path and source line;
        its meta is inferred from the operands' metas unless given."""
        node = self.graph.create_node(op, inputs, attrs, name=name, meta=meta, before=self.anchor,
                                      module_path=self.anchor.module_path, source=self.anchor.source)
        if node.meta is None:
            node.meta = infer_meta(node)
        return node

    def matched_nodes(self) -> list[Node]:
        return list(self.nodes.values())

    def __repr__(self) -> str:
        vals = ", ".join(f"{k}={format_value(v)}" for k, v in self.values.items())
        return f"<Match at %{self.anchor.name}: {vals}>"


class _State:
    __slots__ = ("values", "nodes", "rev")

    def __init__(self) -> None:
        self.values: dict[Node, Any] = {}   # pattern input node -> bound value
        self.nodes: dict[Node, Node] = {}   # pattern op node -> graph node
        self.rev: dict[Node, Node] = {}     # graph node -> pattern op node

    def copy(self) -> _State:
        s = _State()
        s.values, s.nodes, s.rev = dict(self.values), dict(self.nodes), dict(self.rev)
        return s

    def restore(self, other: _State) -> None:
        self.values, self.nodes, self.rev = other.values, other.nodes, other.rev


class _Fail(Exception):
    """A mismatch: `reason` names the pattern node and the graph value at fault."""

    def __init__(self, reason: str, progress: int):
        super().__init__(reason)
        self.reason = reason
        self.progress = progress


class Pattern:
    """A pattern function traced into IR, ready to be matched. See the module docstring."""

    def __init__(self, fn: Callable, *, exact_attrs: bool = False):
        self.fn = fn
        self.name = getattr(fn, "__name__", "pattern")
        try:
            self.graph, fx_nodes = trace_function(fn)
        except CaptureError as e:
            raise PassError(f"pattern {self.name!r} cannot be traced: {e}") from e
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        inputs = self.graph.inputs
        if len(params) != len(inputs):
            raise PassError(f"pattern {self.name!r}: only positional arguments are supported "
                            f"(got {sig})")
        #: pattern input node -> (argument name, also matches constants?)
        self.args: dict[Node, tuple[str, bool]] = {
            n: (p.name, p.default is not p.empty) for n, p in zip(inputs, params)}
        out = self.graph.outputs
        if not isinstance(out, Node) or out.op == "input":
            raise PassError(f"pattern {self.name!r} must return one value computed by a torch op, "
                            f"got {format_value(out)}")
        self.output: Node = out
        self.ops: list[Node] = [n for n in self.graph if n.op not in ("input", "output")]
        for n in self.ops:
            if n.op == "opaque" and n.attrs.get("kind") == "call_module":
                raise PassError(f"pattern {self.name!r}: modules cannot appear in patterns; "
                                f"write %{n.name} with torch.nn.functional")
        self.wild_attrs: dict[Node, set[str]] = {
            n: (set() if exact_attrs else _default_attr_keys(fx_nodes[n.name], n, self.graph)) for n in self.ops}

    @property
    def anchor_op(self) -> str:
        return self.output.op

    def __str__(self) -> str:
        return str(self.graph)

    # -- matching ------------------------------------------------------------------------------------
    def _candidates(self, graph: Graph) -> list[Node]:
        return [n for n in graph if n.op == self.anchor_op]

    def match_at(self, node: Node, graph: Graph | None = None) -> Match | None:
        """The match anchored at `node` (the node the pattern's output would match), or None."""
        try:
            return self._match(node, graph or node.graph)  # type: ignore[arg-type]
        except _Fail:
            return None

    def _match(self, node: Node, graph: Graph) -> Match:
        st = _State()
        self._node(self.output, node, st)
        for p, t in st.nodes.items():
            if p is self.output:
                continue
            for u in t.users:
                if u not in st.rev:
                    raise _Fail(f"graph node %{t.name} (matched by pattern node %{p.name}) is also used by "
                                f"%{u.name} ({u.op}) outside the match", len(st.nodes))
        values = {name: st.values.get(p) for p, (name, _) in self.args.items()}
        nodes = {p.name: t for p, t in st.nodes.items()}
        return Match(graph, node, values, nodes)

    def _node(self, p: Node, t: Any, st: _State) -> None:
        if p in self.args:
            self._bind(p, t, st)
            return
        if not isinstance(t, Node):
            raise _Fail(f"pattern node %{p.name} ({p.op}) wants a computed value, the graph has "
                        f"{format_value(t)}", len(st.nodes))
        if p in st.nodes:
            if st.nodes[p] is not t:
                raise _Fail(f"pattern node %{p.name} is used twice but the graph reads two different "
                            f"values (%{st.nodes[p].name} and %{t.name})", len(st.nodes))
            return
        if t.op != p.op:
            raise _Fail(f"pattern node %{p.name} wants op {p.op!r}; graph node %{t.name} is {t.op!r}"
                        f" ({t.where()})", len(st.nodes))
        if t in st.rev:
            raise _Fail(f"graph node %{t.name} would match two pattern nodes (%{st.rev[t].name}, "
                        f"%{p.name})", len(st.nodes))
        st.nodes[p] = t
        st.rev[t] = p
        wild = self.wild_attrs.get(p, ())
        for key, pv in p.attrs.items():
            if key in wild:
                continue
            if key not in t.attrs:
                raise _Fail(f"graph node %{t.name} ({t.op}) has no attribute {key!r} that pattern node "
                            f"%{p.name} requires", len(st.nodes) - 1)
            try:
                self._value(pv, t.attrs[key], st)
            except _Fail as e:
                raise _Fail(f"pattern node %{p.name} ({p.op}) wants {key}={format_value(pv)}; graph node "
                            f"%{t.name} has {key}={format_value(t.attrs[key])}"
                            + ("" if e.reason.startswith("constant") else f" ({e.reason})"),
                            len(st.nodes) - 1) from None
        pin, tin = p.inputs, t.inputs
        if len(pin) != len(tin):
            raise _Fail(f"pattern node %{p.name} ({p.op}) has {len(pin)} operands, graph node %{t.name} "
                        f"has {len(tin)}", len(st.nodes) - 1)
        if p.op in COMMUTATIVE_OPS and len(pin) == 2:
            saved = st.copy()
            try:
                self._value(pin[0], tin[0], st)
                self._value(pin[1], tin[1], st)
                return
            except _Fail as first:
                st.restore(saved)
                try:
                    self._value(pin[0], tin[1], st)
                    self._value(pin[1], tin[0], st)
                    return
                except _Fail as second:
                    raise (first if first.progress >= second.progress else second) from None
        for pv, tv in zip(pin, tin):
            self._value(pv, tv, st)

    def _value(self, pv: Any, tv: Any, st: _State) -> None:
        if isinstance(pv, Node):
            self._node(pv, tv, st)
        elif isinstance(pv, (tuple, list)):
            if not isinstance(tv, (tuple, list)) or len(tv) != len(pv):
                raise _Fail(f"constant {format_value(pv)} differs from {format_value(tv)}", len(st.nodes))
            for a, b in zip(pv, tv):
                self._value(a, b, st)
        elif not _eq(pv, tv):
            raise _Fail(f"constant {format_value(pv)} differs from {format_value(tv)}", len(st.nodes))

    def _bind(self, p: Node, t: Any, st: _State) -> None:
        name, takes_constants = self.args[p]
        if not isinstance(t, (Node, Param)) and not takes_constants:
            raise _Fail(f"pattern argument {name!r} matches a node or a param, the graph has the constant "
                        f"{format_value(t)} (give the argument a default, e.g. `{name}=None`, to accept "
                        "constants)", len(st.nodes))
        if p in st.values:
            if not _eq(st.values[p], t):
                raise _Fail(f"pattern argument {name!r} is used twice but binds {format_value(st.values[p])} "
                            f"and {format_value(t)}", len(st.nodes))
            return
        st.values[p] = t

    # -- public API ------------------------------------------------------------------------------------
    def find(self, graph: Graph, *, condition: Callable[[Match], bool] | None = None) -> list[Match]:
        """Every match in the graph (they may overlap); `condition` filters them."""
        out = []
        for node in self._candidates(graph):
            m = self.match_at(node, graph)
            if m is not None and (condition is None or condition(m)):
                out.append(m)
        return out

    def explain(self, graph: Graph, *, condition: Callable[[Match], bool] | None = None) -> str:
        """Why the pattern does (not) match: the closest candidate and its first mismatching node."""
        cands = self._candidates(graph)
        if not cands:
            return (f"pattern {self.name!r}: no graph node has op {self.anchor_op!r} (the op of the pattern's "
                    "output), so there is nothing to anchor a match at")
        best: tuple[int, Node, str] | None = None
        found = 0
        for node in cands:
            try:
                m = self._match(node, graph)
            except _Fail as e:
                if best is None or e.progress > best[0]:
                    best = (e.progress, node, e.reason)
                continue
            if condition is not None and not condition(m):
                if best is None or len(self.ops) > best[0]:
                    best = (len(self.ops), node, "the structure matches, but the condition rejected it")
                continue
            found += 1
        if found:
            return f"pattern {self.name!r}: {found} match(es) among {len(cands)} candidate(s)"
        assert best is not None
        progress, node, reason = best
        return (f"pattern {self.name!r}: no match among {len(cands)} candidate(s) with op {self.anchor_op!r}. "
                f"Closest: graph node %{node.name} ({node.where()}), {progress} of {len(self.ops)} pattern "
                f"nodes matched; first mismatch: {reason}")


def _erase_match(graph: Graph, m: Match, pattern: Pattern) -> None:
    """Erase the matched nodes that nothing reads any more (users before producers)."""
    for p in reversed(pattern.ops):
        t = m.nodes.get(p.name)
        if t is not None and t.graph is graph and not t.users:
            graph.erase(t)


def rewrite(graph: Graph, pattern: Pattern | Callable, replacement: Callable[[Graph, Match], Any], *,
            condition: Callable[[Match], bool] | None = None) -> int:
    """Replace every (non-overlapping) match of `pattern`; returns how many were replaced.

    `replacement(graph, match)` builds new nodes (use `match.insert(...)` to place them before the
    anchor) and returns the value that takes the place of the pattern's output: a new node, an existing
    value (e.g. `match["x"]`), the anchor itself after editing it in place, or None to leave the match
    alone. Matched nodes left without users are erased. One sweep: nodes created by replacements are
    not matched again.
    """
    if not isinstance(pattern, Pattern):
        pattern = Pattern(pattern)
    count = 0
    for node in pattern._candidates(graph):
        if node.graph is not graph:  # erased by an earlier replacement
            continue
        m = pattern.match_at(node, graph)
        if m is None or (condition is not None and not condition(m)):
            continue
        new = replacement(graph, m)
        if new is None:
            continue
        count += 1
        if new is node:
            continue
        if isinstance(new, Node) and new.meta is None:
            new.meta = node.meta
        graph.replace_all_uses(node, new)
        _erase_match(graph, m, pattern)
    return count


_COMPILED: dict[type, Pattern] = {}


class PatternPass(Pass):
    """Base class for a pass made of one pattern and its replacement.

        @register_pass("fuse-linear-relu")
        class FuseLinearRelu(PatternPass):
            '''One line saying what it does.'''
            pattern = staticmethod(lambda x, w, b: F.relu(F.linear(x, w, b)))
            def replace(self, graph, match): ...
            def condition(self, match): return True     # optional
    """

    pattern: ClassVar[Callable]
    exact_attrs: ClassVar[bool] = False

    @classmethod
    def compiled_pattern(cls) -> Pattern:
        if cls not in _COMPILED:
            fn = inspect.getattr_static(cls, "pattern", None)
            fn = fn.__func__ if isinstance(fn, staticmethod) else fn
            if fn is None:
                raise PassError(f"pattern pass '{cls.name}' ({cls.__qualname__}) defines no `pattern`")
            _COMPILED[cls] = Pattern(fn, exact_attrs=cls.exact_attrs)
        return _COMPILED[cls]

    def condition(self, match: Match) -> bool:
        return True

    def replace(self, graph: Graph, match: Match) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError(f"pattern pass '{self.name}' must define replace(graph, match)")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        pattern = self.compiled_pattern()
        read_params = False

        def replace(g: Graph, m: Match) -> Any:
            nonlocal read_params
            new = self.replace(g, m)
            if new is not None and not read_params:
                read_params = any(t.params() for t in m.nodes.values())
            return new

        n = rewrite(graph, pattern, replace, condition=self.condition)
        if read_params:  # the rewrite may have dropped the last reader of a weight
            graph.remove_unused_params()
        elif ctx.logger.isEnabledFor(10):  # logging.DEBUG: say why nothing matched
            ctx.logger.debug(pattern.explain(graph, condition=self.condition))
        return PassResult(changed=n > 0, stats={"rewritten": n})


__all__ = ["Pattern", "Match", "rewrite", "PatternPass"]
