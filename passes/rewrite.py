"""Patterns: a small function of torch ops, traced into IR and matched against the graph.

    def pat(x, w, b):
        return F.relu(F.linear(x, w, b))

    pattern = Pattern(pat)
    for m in pattern.find(graph): ...                 # inspect: m["x"], m["w"], m["linear"], m.anchor
    print(pattern.explain(graph))                     # why did it not match?

Rewriting is `passes/rules.py` (Rule, RuleSet, apply_rules): a pattern with a replacement written
the same way. A pattern is traced with capture's own converters, so it is the same canonical IR
as the graph (`F.linear`, `nn.Linear` and `torch._C._nn.linear` all become `linear`). Matching rules:

- Each argument of the pattern function is a wildcard: it matches any graph
  value that is a node or a param (`@w`); an argument with a default value
  (`b=None`) also matches Python constants such as a missing bias. An argument
  used twice must bind the same value both times.
- Op nodes match graph nodes of the same op whose operands match recursively;
  `add` and `mul` (ir.ops.COMMUTATIVE_OPS) match either operand order.
- Attributes the pattern sets to a non-default value (`F.max_pool2d(x,
  kernel_size=3)`, `F.conv2d(x, w, b, stride=2)`) must be equal; attributes
  left at their default values match any value (`F.conv2d(x, w, b)` matches
  every stride and padding), unless `exact_attrs=True`. An argument given as an
  attribute binds it (`call("quantize", x, s, z, dtype=dtype)`).
- `call(op, *inputs, **attrs)` spells any canonical op by name (and compares only
  the attributes written).
- Every value computed inside a match, except the pattern's output, must be used
  only inside the match: rewriting it away would change other users (unless the
  match is taken with `exclusive=False`).

Matching is anchored at the pattern's output op: candidates are the graph nodes
with that op, and each attempt costs the size of the pattern, so a sweep is
linear in the graph. Each pattern is compiled into straight-line Python
(`_compile`); `Pattern._match` walks the pattern instead and says why it fails.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from slimfx.ir import Graph, Node, Param, iter_refs
from slimfx.ir.capture import converter_for, trace_function
from slimfx.ir.errors import CaptureError, PassError
from slimfx.ir.ops import COMMUTATIVE_OPS, OPS
from slimfx.ir.printer import format_value
from slimfx.ir.verify import infer_meta


def _depth(out: Node, args: dict[Node, Any]) -> int:
    memo: dict[Node, int] = {}

    def d(n: Node) -> int:
        if n in args:
            return 0
        if n not in memo:
            memo[n] = 1 + max((d(r) for r in n.input_nodes()), default=0)
        return memo[n]

    return d(out)


_MAX_PATHS = 16  # operand orders tried for add/mul nodes: 2 per such node, up to this many in all


def _compile(pattern: Pattern) -> list[Callable[[Node], tuple[tuple, tuple] | None]]:
    """The pattern as straight-line Python, one function per choice of operand order at add/mul nodes.

    Each function checks the candidate the way `Pattern._match` walks it (op, attrs, operand count,
    operands, depth first) and returns (the arguments' values, the matched nodes in pattern order), or
    None. Matching is the inner loop of every rule-based pass: this runs about 5x faster than walking the
    pattern. `_match` stays the reference and the explainer; together the functions try every operand
    order, so they find every match `_match` finds."""
    consts: dict[str, Any] = {}
    argvar = {p: f"a{i}" for i, p in enumerate(pattern.args)}
    nodevar = {p: f"n{i}" for i, p in enumerate(pattern.ops)}
    paths: list[list[str]] = []
    temps = iter(range(1 << 30))

    def const(v: Any) -> str:
        name = f"C{len(consts)}"
        consts[name] = v
        return name

    def has_refs(v: Any) -> bool:
        return any(isinstance(r, Node) for r in iter_refs(v))

    def walk(tasks: list[tuple[Any, str]], bound: frozenset, lines: list[str]) -> None:
        if len(paths) > _MAX_PATHS:
            return
        if not tasks:
            paths.append(lines)
            return
        (pv, expr), rest = tasks[0], tasks[1:]
        if isinstance(pv, Node) and pv in pattern.args:
            v = argvar[pv]
            if pv in bound:
                walk(rest, bound, [*lines, f"if not _eq({v}, {expr}): return None"])
                return
            check = [] if pattern.args[pv][1] else [f"if not isinstance({v}, _REF): return None"]
            walk(rest, bound | {pv}, [*lines, f"{v} = {expr}", *check])
        elif isinstance(pv, Node):
            v = nodevar[pv]
            if pv in bound:
                walk(rest, bound, [*lines, f"if {expr} is not {v}: return None"])
                return
            own = [f"{v} = {expr}", f"if not isinstance({v}, Node) or {v}.op != {pv.op!r}: return None"]
            own += [f"if {v} is {nodevar[o]}: return None" for o in bound if o in nodevar]
            attrs, swap = pattern._plans[pv]
            sub: list[tuple[Any, str]] = []
            if attrs:
                own.append(f"t_{v} = {v}.attrs")
                for key, apv in attrs:
                    own.append(f"if {key!r} not in t_{v}: return None")
                    sub.append((apv, f"t_{v}[{key!r}]"))
            own += [f"i_{v} = {v}.inputs", f"if len(i_{v}) != {len(pv.inputs)}: return None"]
            operands = [(x, f"i_{v}[{k}]") for k, x in enumerate(pv.inputs)]
            walk([*sub, *operands, *rest], bound | {pv}, [*lines, *own])
            if swap:
                (x0, e0), (x1, e1) = operands
                walk([*sub, (x0, e1), (x1, e0), *rest], bound | {pv}, [*lines, *own])
        elif isinstance(pv, (tuple, list)) and has_refs(pv):
            t = f"s{next(temps)}"
            own = [f"{t} = {expr}", f"if not isinstance({t}, (tuple, list)) or len({t}) != {len(pv)}: return None"]
            walk([*((x, f"{t}[{k}]") for k, x in enumerate(pv)), *rest], bound, [*lines, *own])
        elif type(pv) in _NUMBERS:  # the usual constant (`x * 1`): numbers compared inline, as _eq does
            c, t = const(pv), f"s{next(temps)}"
            walk(rest, bound, [*lines, f"{t} = {expr}",
                               f"if ({t} != {c}) if type({t}) in _NUMBERS else (type({t}) is Node or not _eq({c}, {t})):"
                               " return None"])
        else:
            walk(rest, bound, [*lines, f"if not _eq({const(pv)}, {expr}): return None"])

    walk([(pattern.output, "node")], frozenset(), [])
    if len(paths) > _MAX_PATHS:  # a pattern with many add/mul nodes: walk it instead
        return [functools.partial(_walk_match, pattern)]
    return [_define(pattern.name, i, lines, [argvar[p] for p in pattern.args], [nodevar[p] for p in pattern.ops],
                    consts) for i, lines in enumerate(paths)]


def _define(name: str, i: int, lines: list[str], args: list[str], nodes: list[str],
            consts: dict[str, Any]) -> Callable[[Node], tuple[tuple, tuple] | None]:
    """One compiled path as a function: the checks, then (argument values, matched nodes)."""
    body = [*(f"{a} = None" for a in args), *lines, f"return ({''.join(a + ', ' for a in args)}), "
            f"({''.join(n + ', ' for n in nodes)})"]
    src = "\n".join([f"def path_{i}(node):", *("    " + line for line in body)])
    env: dict[str, Any] = {"Node": Node, "_REF": (Node, Param), "_eq": _eq, "_NUMBERS": _NUMBERS, **consts}
    exec(compile(src, f"<pattern {name} path {i}>", "exec"), env)  # noqa: S102 - code we generated
    return env[f"path_{i}"]


def _walk_match(pattern: Pattern, node: Node) -> tuple[tuple, tuple] | None:
    try:
        m = pattern._match(node, node.graph, exclusive=False)  # type: ignore[arg-type]
    except _Fail:
        return None
    return tuple(m.values.values()), tuple(m.nodes[p.name] for p in pattern.ops)


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
    if a is b:
        return True
    if type(a) in _NUMBERS and type(b) in _NUMBERS:  # the common case, first (bools are not numbers here)
        return a == b
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


_NUMBERS = (int, float)


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


_NONE_CREATED: list[Node] = []  # shared and never appended to: most matches create nothing with insert()


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
        self.created: list[Node] = _NONE_CREATED  # nodes made with insert(), which the driver looks at again

    def __getitem__(self, key: str) -> Any:
        try:
            return self.values[key]
        except KeyError:
            pass
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
        if self.created is _NONE_CREATED:
            self.created = []
        self.created.append(node)
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

    def mark(self) -> tuple[int, int]:
        return len(self.values), len(self.nodes)

    def rollback(self, mark: tuple[int, int]) -> None:
        """Forget what was bound since `mark` (matching only ever adds entries; dicts pop in LIFO order)."""
        while len(self.values) > mark[0]:
            self.values.popitem()
        while len(self.nodes) > mark[1]:
            self.rev.pop(self.nodes.popitem()[1])


class _Fail(Exception):
    """A mismatch: `reason` names the pattern node and the graph value at fault. The text is only built
    when asked for (`explain`): matching is the hot loop of every rule-based pass."""

    def __init__(self, why: Callable[[], str], progress: int):
        self.why = why
        self.progress = progress

    @property
    def reason(self) -> str:
        return self.why()


def _has_proxy(values: Any) -> fx.Proxy | None:
    for v in values:
        if isinstance(v, fx.Proxy):
            return v
        if isinstance(v, (tuple, list)) and (found := _has_proxy(v)) is not None:
            return found
    return None


def call(op: str, *inputs: Any, **attrs: Any) -> Any:
    """A canonical op by name, in a pattern or replacement function.

        call("identity", x)                                  # ops no torch function spells
        call("quantize", x, s, z, dtype=dtype, axis=axis)    # attrs bound to arguments
        call("batch_norm", y, mean, var, w, b, tracked)      # any eps, momentum, training

    In a pattern only the attributes written here are compared (each one equal to a constant, or bound to
    an argument); in a replacement the node gets exactly these attributes (plus, when the pattern has one
    node of the same op, that matched node's others).
    """
    proxy = _has_proxy((*inputs, *attrs.values()))
    if proxy is None:
        raise PassError(f"call({op!r}, ...) builds a node of a pattern or replacement function; it only "
                        "runs while slimfx traces such a function (give the function to Pattern or Rule)")
    return proxy.tracer.create_proxy("call_function", call, (op, *inputs), attrs)


class precompute:  # noqa: N801 - used as a decorator, like functools.cache
    """Marks a function a replacement calls on params and constants: it runs while rewriting, once per
    match, on the matched tensors (None for an argument bound to None), and what it returns (a tensor or a
    tuple of tensors) becomes new params of the graph.

        @precompute
        def scaled(w, s):
            return w * s

        Rule(lambda x, w, s=None: F.linear(x, w) * s, lambda x, w, s: F.linear(x, scaled(w, s)), ...)

    A result in the place of a param the matched node of the same op read (`w` above) takes that param's
    name when nothing outside the match reads it (the tensor is replaced, never written in place);
    otherwise it is a new param named after that param or after the matched layer (`fc.bias`).
    """

    def __init__(self, fn: Callable):
        functools.update_wrapper(self, fn)
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        proxy = _has_proxy((*args, *kwargs.values()))
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", self, args, kwargs)
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"precompute({getattr(self.fn, '__qualname__', self.fn)})"


def trace(fn: Callable, what: str) -> tuple[Graph, dict[str, fx.Node], dict[Node, tuple[str, bool]]]:
    """Trace a pattern or replacement function into canonical IR (`call(...)` nodes become their op).
    Returns the graph, the fx node of each IR node (by name), and each input node's (argument name, has a
    default?)."""
    name = getattr(fn, "__name__", what)
    try:
        graph, fx_nodes = trace_function(fn)
    except CaptureError as e:
        raise PassError(f"{what} {name!r} cannot be traced: {e}") from e
    for n in graph:
        if n.op == "opaque" and n.attrs.get("target") is call:
            op, *inputs = n.inputs
            if op not in OPS:
                raise PassError(f"{what} {name!r}: call({op!r}, ...) names no canonical op; known ops: "
                                f"{', '.join(sorted(OPS))}")
            n.op = op
            n.inputs, n.attrs = tuple(inputs), dict(n.attrs.get("kwargs", {}))
        elif n.op == "opaque" and n.attrs.get("kind") == "call_module":
            raise PassError(f"{what} {name!r}: modules cannot appear in patterns or replacements; "
                            f"write %{n.name} with torch.nn.functional")
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    inputs = graph.inputs
    if len(params) != len(inputs):
        raise PassError(f"{what} {name!r}: only positional arguments are supported (got {sig})")
    return graph, fx_nodes, {n: (p.name, p.default is not p.empty) for n, p in zip(inputs, params)}


class Pattern:
    """A pattern function traced into IR, ready to be matched. See the module docstring."""

    def __init__(self, fn: Callable, *, exact_attrs: bool = False):
        self.fn = fn
        self.name = getattr(fn, "__name__", "pattern")
        self.graph, fx_nodes, args = trace(fn, "pattern")
        #: pattern input node -> (argument name, also matches constants?)
        self.args: dict[Node, tuple[str, bool]] = args
        out = self.graph.outputs
        if not isinstance(out, Node) or out.op == "input":
            raise PassError(f"pattern {self.name!r} must return one value computed by a torch op, "
                            f"got {format_value(out)}")
        self.output: Node = out
        self.ops: list[Node] = [n for n in self.graph if n.op not in ("input", "output")]
        for n in self.ops:
            if n.op == "opaque" and isinstance(n.attrs.get("target"), precompute):
                raise PassError(f"pattern {self.name!r}: {n.attrs['target']!r} computes new params; it belongs "
                                "in a replacement, not in a pattern")
        self.wild_attrs: dict[Node, set[str]] = {
            n: (set() if exact_attrs else _default_attr_keys(fx_nodes[n.name], n, self.graph)) for n in self.ops}
        # per op node: the attrs to compare, and whether its two operands match in either order
        self._plans: dict[Node, tuple[tuple[tuple[str, Any], ...], bool]] = {
            n: (tuple((k, v) for k, v in n.attrs.items() if k not in self.wild_attrs[n]),
                n.op in COMMUTATIVE_OPS and len(n.inputs) == 2) for n in self.ops}
        #: op nodes on the longest chain from an argument to the output (a lone op: 1): a match anchored at
        #: a node reaches at most depth - 1 nodes up the graph
        self.depth = _depth(self.output, self.args)
        self._arg_names = [name for name, _ in self.args.values()]
        self._op_names = [n.name for n in self.ops]
        self._paths = _compile(self)

    @property
    def anchor_op(self) -> str:
        return self.output.op

    def __str__(self) -> str:
        return str(self.graph)

    # -- matching ------------------------------------------------------------------------------------
    def _attempt(self, node: Node, graph: Graph, exclusive: bool = True) -> Match | None:
        """The match anchored at `node`, or None: the compiled matcher (see `_compile`); `_match` is the
        same search, slower, and says why it fails."""
        for path in self._paths:
            found = path(node)
            if found is None:
                continue
            values, nodes = found
            if exclusive and len(nodes) > 1:
                inside = set(nodes)
                if any(u not in inside for t in nodes[:-1] for u in t.users):
                    continue
            return Match(graph, node, dict(zip(self._arg_names, values)), dict(zip(self._op_names, nodes)))
        return None

    def _candidates(self, graph: Graph) -> list[Node]:
        return [n for n in graph if n.op == self.anchor_op]

    def match_at(self, node: Node, graph: Graph | None = None, *, exclusive: bool = True) -> Match | None:
        """The match anchored at `node` (the node the pattern's output would match), or None.
        `exclusive=False` also accepts matches whose inner values have readers outside the match."""
        return self._attempt(node, graph or node.graph, exclusive)  # type: ignore[arg-type]

    def why_not(self, node: Node, *, exclusive: bool = True) -> str | None:
        """Why the pattern does not match at `node` (None when it does): its first mismatch."""
        if self._attempt(node, node.graph, exclusive) is not None:  # type: ignore[arg-type]
            return None
        try:
            self._match(node, node.graph, exclusive)  # type: ignore[arg-type]
        except _Fail as e:
            return e.reason
        return "no order of the add/mul operands matches"

    def _match(self, node: Node, graph: Graph, exclusive: bool = True) -> Match:
        st = _State()
        self._node(self.output, node, st)
        for p, t in st.nodes.items():
            if p is self.output or not exclusive:
                continue
            for u in t.users:
                if u not in st.rev:
                    raise _Fail(lambda t=t, p=p, u=u: f"graph node %{t.name} (matched by pattern node %{p.name}) "
                                f"is also used by "
                                f"%{u.name} ({u.op}) outside the match", len(st.nodes))
        bound = st.values
        return Match(graph, node, {name: bound.get(p) for p, (name, _) in self.args.items()},
                     {p.name: t for p, t in st.nodes.items()})

    def _node(self, p: Node, t: Any, st: _State) -> None:
        if not isinstance(t, Node):
            raise _Fail(lambda: f"pattern node %{p.name} ({p.op}) wants a computed value, the graph has "
                        f"{format_value(t)}", len(st.nodes))
        if p in st.nodes:
            seen = st.nodes[p]
            if seen is not t:
                raise _Fail(lambda: f"pattern node %{p.name} is used twice but the graph reads two different "
                            f"values (%{seen.name} and %{t.name})", len(st.nodes))
            return
        if t.op != p.op:
            raise _Fail(lambda: f"pattern node %{p.name} wants op {p.op!r}; graph node %{t.name} is {t.op!r}"
                        f" ({t.where()})", len(st.nodes))
        if t in st.rev:
            other = st.rev[t]
            raise _Fail(lambda: f"graph node %{t.name} would match two pattern nodes (%{other.name}, "
                        f"%{p.name})", len(st.nodes))
        st.nodes[p] = t
        st.rev[t] = p
        attrs, swap = self._plans[p]
        for key, pv in attrs:
            if key not in t.attrs:
                raise _Fail(lambda key=key: f"graph node %{t.name} ({t.op}) has no attribute {key!r} that pattern node "
                            f"%{p.name} requires", len(st.nodes) - 1)
            try:
                self._value(pv, t.attrs[key], st)
            except _Fail as e:
                inner, have = e, t.attrs[key]
                raise _Fail(lambda key=key, pv=pv, have=have, inner=inner:
                            f"pattern node %{p.name} ({p.op}) wants {key}={format_value(pv)}; graph node "
                            f"%{t.name} has {key}={format_value(have)}"
                            + ("" if inner.reason.startswith("constant") else f" ({inner.reason})"),
                            len(st.nodes) - 1) from None
        pin, tin = p.inputs, t.inputs
        if len(pin) != len(tin):
            raise _Fail(lambda: f"pattern node %{p.name} ({p.op}) has {len(pin)} operands, graph node %{t.name} "
                        f"has {len(tin)}", len(st.nodes) - 1)
        if swap:
            saved = st.mark()
            try:
                self._value(pin[0], tin[0], st)
                self._value(pin[1], tin[1], st)
                return
            except _Fail as first:
                st.rollback(saved)
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
            if pv in self.args:
                self._bind(pv, tv, st)
            else:
                self._node(pv, tv, st)
        elif isinstance(pv, (tuple, list)):
            if not isinstance(tv, (tuple, list)) or len(tv) != len(pv):
                raise _Fail(lambda: f"constant {format_value(pv)} differs from {format_value(tv)}", len(st.nodes))
            for a, b in zip(pv, tv):
                self._value(a, b, st)
        elif not _eq(pv, tv):
            raise _Fail(lambda: f"constant {format_value(pv)} differs from {format_value(tv)}", len(st.nodes))

    def _bind(self, p: Node, t: Any, st: _State) -> None:
        name, takes_constants = self.args[p]
        if not isinstance(t, (Node, Param)) and not takes_constants:
            raise _Fail(lambda: f"pattern argument {name!r} matches a node or a param, the graph has the constant "
                        f"{format_value(t)} (give the argument a default, e.g. `{name}=None`, to accept "
                        "constants)", len(st.nodes))
        if p in st.values:
            first = st.values[p]
            if not _eq(first, t):
                raise _Fail(lambda: f"pattern argument {name!r} is used twice but binds {format_value(first)} "
                            f"and {format_value(t)}", len(st.nodes))
            return
        st.values[p] = t

    # -- public API ------------------------------------------------------------------------------------
    def find(self, graph: Graph, *, condition: Callable[[Match], bool] | None = None,
             exclusive: bool = True) -> list[Match]:
        """Every match in the graph (they may overlap); `condition` filters them."""
        out = []
        for node in self._candidates(graph):
            m = self._attempt(node, graph, exclusive)
            if m is not None and (condition is None or condition(m)):
                out.append(m)
        return out

    def explain(self, graph: Graph, *, condition: Callable[[Match], bool] | None = None,
                exclusive: bool = True) -> str:
        """Why the pattern does (not) match: the closest candidate and its first mismatching node."""
        cands = self._candidates(graph)
        if not cands:
            return (f"pattern {self.name!r}: no graph node has op {self.anchor_op!r} (the op of the pattern's "
                    "output), so there is nothing to anchor a match at")
        best: tuple[int, Node, str] | None = None
        found = 0
        for node in cands:
            m = self._attempt(node, graph, exclusive)
            if m is None:
                try:
                    self._match(node, graph, exclusive)
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


__all__ = ["Pattern", "Match", "call", "precompute", "trace"]
