"""Read the IR's text form (what ir/printer.py writes) back into a Graph.

    g = ir.parse('''
    graph Net(%x: f32[2, 4]) {
      %fc = linear(%x, @fc.weight, @fc.bias) : f32[2, 3]
      %relu = relu(%fc) : f32[2, 3]
      return %relu
    }''', {"fc.weight": torch.randn(3, 4), "fc.bias": torch.zeros(3)})

Grammar (one node a line; blank lines and lines starting with `//` or `#` are skipped):

    graph   := 'graph' NAME '(' [input {',' input}] ')' '{' {node} 'return' value '}'
    input   := %NAME [':' meta]
    node    := %NAME '=' OP '(' [value {',' value}] ')' ['{' NAME '=' value {',' ...} '}'] [':' meta] [loc]
    meta    := DTYPE '[' [INT {',' INT}] ']' | '(' meta {',' meta} [','] ')'
    loc     := 'loc' '(' ('module' | 'source') '=' STRING {',' ...} ')'
    value   := atom [':' [atom] [':' atom]]          (a slice: `1:3`, `:`, `::2`)
    atom    := %NODE | @PARAM | NUMBER | STRING | True | False | None | inf | nan | '...' | DTYPE
             | dotted.function | '(' values ')' | '[' values ']' | '{' atom ':' value, ... '}'

Names are `%name` / `@param.name`, or quoted (`%"odd name"`) when they hold other characters. Functions
(targets of `opaque` nodes) resolve only to torch, torch.nn.functional, torch.Tensor, operator and math
callables already imported: parsing never imports or runs code.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Mapping
from typing import Any

import torch

from slimfx.ir.errors import SlimfxError
from slimfx.ir.graph import _DTYPE_SHORT, Graph, Node, Param, TensorMeta
from slimfx.ir.ops import OPS
from slimfx.ir.printer import FUNCTION_HOMES


class ParseError(SlimfxError):
    """IR text that does not follow the grammar, or refers to what is not there; names the line."""


_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<node>%(?:"(?:[^"\\]|\\.)*"|[A-Za-z_][\w.]*))
  | (?P<param>@(?:"(?:[^"\\]|\\.)*"|[\w.]+))
  | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<number>-?(?:inf\b|nan\b|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?))
  | (?P<ellipsis>\.\.\.)
  | (?P<ident>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)
  | (?P<module><[^>]*>)
  | (?P<punct>[()\[\]{},=:])
""", re.VERBOSE)

_SHORT_DTYPES = {v: k for k, v in _DTYPE_SHORT.items()}
_UNSAFE_FUNCTIONS = frozenset({"load", "save", "compile", "from_file", "hub", "jit", "export", "ops", "utils",
                               "serialization", "distributed", "package", "onnx", "import_ir_module",
                               # call any value / reach any attribute: with them, text could climb from a tensor
                               # to a function's __globals__ and builtins.eval
                               "call", "attrgetter", "methodcaller"})
_SAFE_BUILTINS = frozenset({"getattr", "len", "min", "max", "abs", "int", "float", "bool", "round", "range",
                            "slice", "tuple", "list", "dict", "sum", "all", "any"})


def _dtype(name: str) -> torch.dtype | None:
    if name in _SHORT_DTYPES:
        return _SHORT_DTYPES[name]
    v = getattr(torch, name, None) if not name.startswith("_") and "." not in name else None
    return v if isinstance(v, torch.dtype) else None


def resolve_function(dotted: str) -> Any:
    """The callable a dotted name in IR text names (`torch.add`, `_operator.getitem`, `builtins.getattr`),
    looked up in already-imported torch/operator/math modules only; None when it names nothing allowed."""
    import builtins

    if dotted.startswith("torch.ops.aten."):
        return _aten_operator(dotted[len("torch.ops.aten."):])
    for home in FUNCTION_HOMES:
        if not dotted.startswith(home + "."):
            continue
        rest = dotted[len(home) + 1:]
        if "." in rest or rest.startswith("_") or rest in _UNSAFE_FUNCTIONS or rest.startswith("set_"):
            continue
        if home == "builtins" and rest not in _SAFE_BUILTINS:
            continue
        obj = torch.Tensor if home == "torch.Tensor" else builtins if home == "builtins" else sys.modules.get(home)
        fn = getattr(obj, rest, None) if obj is not None else None
        if callable(fn) and not isinstance(fn, type | torch.dtype):
            return fn
    return None


def _aten_operator(name: str) -> Any:
    """An ATen operator overload (`arange.start`) torch.export capture leaves in a graph; only functional
    ones (a schema that writes no tensor), never a private or in-place name."""
    op, _, overload = name.partition(".")
    if not op or not overload or "." in overload or op.startswith("_") or op.endswith("_") or overload.startswith("_"):
        return None
    packet = getattr(torch.ops.aten, op, None)
    fn = getattr(packet, overload, None) if packet is not None else None
    if not isinstance(fn, torch._ops.OpOverload) or fn._schema.is_mutable:
        return None
    return fn


def check_opaque(inputs: list[Any], attrs: dict[str, Any]) -> str | None:
    """What is wrong with an `opaque` node read from text (None when nothing): text may only call what
    capture writes there and resolve_function allows: a function (call_function), a public torch.Tensor
    method of a node (call_method), getattr of a node with a public name written in the text. Anything else
    (a module call, another fx kind, a method of a literal, an attribute name computed at run time or
    private) could walk from a tensor to arbitrary Python objects, so a model file would run code."""
    kind, target = attrs.get("kind"), attrs.get("target")
    if kind == "call_function":
        if not callable(target):
            return f"its target {target!r} is not a function (call_function needs one IR text may name)"
        if target is getattr and not (len(inputs) == 2 and isinstance(inputs[0], Node) and isinstance(inputs[1], str)
                                      and inputs[1].isidentifier() and not inputs[1].startswith("_")):
            return ("builtins.getattr needs a node and a public attribute name written as a string, "
                    f"got {inputs!r}")
        return None
    if kind == "call_method":
        if not (isinstance(target, str) and target.isidentifier() and not target.startswith("_")
                and target not in _UNSAFE_FUNCTIONS and callable(getattr(torch.Tensor, target, None))):
            return f"its method {target!r} is not a public torch.Tensor method"
        if not inputs or not isinstance(inputs[0], Node):
            return f"the method {target!r} must be called on a node (%name), not on {inputs[:1]!r}"
        return None
    if kind == "call_module":
        return "it calls a module object, which IR text cannot carry (save refuses such a graph)"
    return f"its kind is {kind!r}; IR text holds call_function and call_method opaque nodes only"


class _Line:
    """The tokens of one line, with a cursor; errors name the line and column."""

    def __init__(self, text: str, lineno: int, source: str):
        self.text, self.lineno, self.source = text, lineno, source
        self.toks: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                raise self.error(f"unexpected character {text[pos]!r}", pos)
            if m.lastgroup != "ws":
                self.toks.append((m.lastgroup, m.group(), pos))  # type: ignore[arg-type]
            pos = m.end()
        self.i = 0

    def error(self, what: str, col: int | None = None) -> ParseError:
        if col is None:
            col = self.toks[self.i][2] if self.i < len(self.toks) else len(self.text)
        return ParseError(f"{self.source}, line {self.lineno}, column {col + 1}: {what}\n"
                          f"  {self.text.strip()}")

    def peek(self) -> tuple[str, str]:
        return self.toks[self.i][:2] if self.i < len(self.toks) else ("end", "")

    def next(self) -> tuple[str, str]:
        tok = self.peek()
        if tok[0] == "end":
            raise self.error("the line ends too early")
        self.i += 1
        return tok

    def accept(self, text: str) -> bool:
        if self.peek()[1] == text and self.peek()[0] in ("punct", "ident"):
            self.i += 1
            return True
        return False

    def expect(self, text: str, what: str = "") -> None:
        if not self.accept(text):
            found = self.peek()[1] or "the end of the line"
            raise self.error(f"expected {text!r}{' ' + what if what else ''}, found {found!r}")

    def done(self) -> None:
        if self.i < len(self.toks):
            raise self.error(f"unexpected {self.peek()[1]!r} at the end of the line")


def _unquote(text: str) -> str:
    return ast.literal_eval(text) if text[:1] == '"' else text


class _Parser:
    def __init__(self, graph: Graph, params: Mapping[str, torch.Tensor]):
        self.graph, self.params = graph, params
        self.env: dict[str, Node] = {}

    # -- values -----------------------------------------------------------------------------------------
    def value(self, ln: _Line) -> Any:
        start = None if ln.peek()[1] == ":" and ln.peek()[0] == "punct" else self.atom(ln)
        if not (ln.peek() == ("punct", ":")):
            return start
        ln.next()
        stop = None if self._slice_part_ends(ln) else self.atom(ln)
        step = None
        if ln.peek() == ("punct", ":"):
            ln.next()
            step = None if self._slice_part_ends(ln) else self.atom(ln)
        return slice(start, stop, step)

    @staticmethod
    def _slice_part_ends(ln: _Line) -> bool:
        kind, text = ln.peek()
        return kind == "end" or (kind == "punct" and text in (",", ")", "]", "}", ":"))

    def _seq(self, ln: _Line, close: str) -> tuple[list[Any], bool]:
        items, trailing = [], False
        while not ln.accept(close):
            items.append(self.value(ln))
            trailing = False
            if ln.accept(","):
                trailing = True
                continue
            ln.expect(close)
            break
        return items, trailing

    def atom(self, ln: _Line) -> Any:
        kind, text = ln.next()
        if kind == "node":
            name = _unquote(text[1:])
            if name not in self.env:
                ln.i -= 1
                raise ln.error(f"%{name} is used before it is defined (or never defined)")
            return self.env[name]
        if kind == "param":
            name = _unquote(text[1:])
            if name not in self.params:
                ln.i -= 1
                raise ln.error(f"@{name} is not in the params table (the weights given with the text)")
            return Param(name)
        if kind == "number":
            if text.lstrip("-") in ("inf", "nan"):
                return float(text)
            return float(text) if any(c in text for c in ".eE") else int(text)
        if kind == "string":
            return ast.literal_eval(text)
        if kind == "ellipsis":
            return Ellipsis
        if kind == "ident":
            if text in ("True", "False", "None"):
                return {"True": True, "False": False, "None": None}[text]
            dt = _dtype(text)
            if dt is not None:
                return dt
            if text == "device" and ln.accept("("):
                where = self.value(ln)
                ln.expect(")", "after a device")
                if not isinstance(where, str) or where != "cpu":
                    raise ln.error(f"device({where!r}): slimfx graphs run on the CPU; write device(\"cpu\")")
                return torch.device(where)
            if "." in text:
                fn = resolve_function(text)
                if fn is not None:
                    return fn
                ln.i -= 1
                raise ln.error(f"{text} names no function IR text may refer to (torch, torch.nn.functional, "
                               "torch.Tensor, operator and math functions)")
            ln.i -= 1
            raise ln.error(f"unknown name {text!r} (strings are quoted; dtypes are torch names such as int8)")
        if kind == "module":
            ln.i -= 1
            raise ln.error(f"{text} stands for a torch module object, which IR text cannot carry")
        if text == "(":
            items, trailing = self._seq(ln, ")")
            return items[0] if len(items) == 1 and not trailing else tuple(items)
        if text == "[":
            return self._seq(ln, "]")[0]
        if text == "{":
            out: dict[Any, Any] = {}
            while not ln.accept("}"):
                key = self.atom(ln)
                ln.expect(":", "after a dict key")
                out[key] = self.value(ln)
                if not ln.accept(","):
                    ln.expect("}")
                    break
            return out
        ln.i -= 1
        raise ln.error(f"expected a value, found {text!r}")

    # -- metas --------------------------------------------------------------------------------------------
    def meta(self, ln: _Line) -> Any:
        if ln.accept("("):
            metas = []
            while not ln.accept(")"):
                metas.append(self.meta(ln))
                if not ln.accept(","):
                    ln.expect(")")
                    break
            return tuple(metas)
        kind, text = ln.next()
        dt = _dtype(text) if kind == "ident" else None
        if dt is None:
            ln.i -= 1
            raise ln.error(f"expected a tensor type such as f32[1, 3], found {text!r}")
        ln.expect("[", "after the dtype")
        dims: list[int] = []
        names: list[str | None] = []
        while not ln.accept("]"):
            kind, text = ln.next()
            name = None
            if kind == "ident" and ln.accept(":"):  # a symbolic dim: `batch:2`
                name = text
                kind, text = ln.next()
            if kind != "number" or not text.isdigit():
                ln.i -= 1
                raise ln.error(f"a dimension must be a whole number >= 0 (or name:number), found {text!r}")
            dims.append(int(text))
            names.append(name)
            if not ln.accept(","):
                ln.expect("]")
                break
        return TensorMeta(tuple(dims), dt, tuple(names) if any(names) else None)

    def loc(self, ln: _Line) -> dict[str, str]:
        out = {}
        ln.expect("(", "after loc")
        while not ln.accept(")"):
            kind, key = ln.next()
            if key not in ("module", "source"):
                ln.i -= 1
                raise ln.error(f"loc takes module= and source=, not {key!r}")
            ln.expect("=")
            kind, text = ln.next()
            if kind != "string":
                ln.i -= 1
                raise ln.error("loc values are quoted strings")
            out[key] = ast.literal_eval(text)
            if not ln.accept(","):
                ln.expect(")")
                break
        return out

    # -- lines --------------------------------------------------------------------------------------------
    def header(self, ln: _Line) -> None:
        ln.expect("graph", "(IR text starts with `graph NAME(...) {`)")
        kind, text = ln.next()
        if kind not in ("ident", "string"):
            ln.i -= 1
            raise ln.error(f"expected the graph's name, found {text!r}")
        self.graph.name = ast.literal_eval(text) if kind == "string" else text
        ln.expect("(")
        while not ln.accept(")"):
            kind, text = ln.next()
            if kind != "node":
                ln.i -= 1
                raise ln.error(f"expected a graph input such as %x: f32[1, 3], found {text!r}")
            meta = self.meta(ln) if ln.accept(":") else None
            self.define(ln, Node(_unquote(text[1:]), "input", meta=meta))
            if not ln.accept(","):
                ln.expect(")")
                break
        ln.expect("{")
        ln.done()

    def define(self, ln: _Line, node: Node) -> None:
        if node.name in self.env:
            raise ln.error(f"%{node.name} is defined twice", ln.toks[0][2] if ln.toks else 0)
        self.graph._insert(node, self.graph._root)
        self.env[node.name] = node

    def node(self, ln: _Line) -> None:
        kind, text = ln.next()
        if kind != "node":
            ln.i -= 1
            raise ln.error(f"expected `%name = op(...)` or `return ...`, found {text!r}")
        name = _unquote(text[1:])
        ln.expect("=")
        kind, op = ln.next()
        if kind != "ident":
            ln.i -= 1
            raise ln.error(f"expected an op name after '=', found {op!r}")
        if op in ("input", "output"):
            ln.i -= 1
            raise ln.error(f"{op} nodes are not written as lines: inputs are declared in the graph header, "
                           "outputs by `return`")
        ln.expect("(", "after the op name")
        inputs, _ = self._seq(ln, ")")
        attrs: dict[str, Any] = {}
        if ln.accept("{"):
            while not ln.accept("}"):
                kind, key = ln.next()
                if kind != "ident" or "." in key:
                    ln.i -= 1
                    raise ln.error(f"expected an attribute name, found {key!r}")
                if key in attrs:
                    ln.i -= 1
                    raise ln.error(f"attribute {key!r} is given twice")
                ln.expect("=", f"after attribute {key!r}")
                attrs[key] = self.value(ln)
                if not ln.accept(","):
                    ln.expect("}")
                    break
        meta = self.meta(ln) if ln.accept(":") else None
        loc = self.loc(ln) if ln.accept("loc") else {}
        ln.done()
        if op == "opaque" and (why := check_opaque(inputs, attrs)) is not None:
            ln.i = 0
            raise ln.error(f"opaque node %{name} cannot be read from text: {why}")
        self.define(ln, Node(name, op, inputs, attrs, meta, loc.get("source"), loc.get("module")))


def parse(text: str, params: Mapping[str, torch.Tensor] | None = None, *, buffers: set[str] | None = None,
          training: bool = False, capture_method: str = "fx", source: str = "IR text") -> Graph:
    """The Graph that `text` (ir.format_graph / print(graph) output) describes, with `params` (name ->
    tensor) as its params table. `buffers` names the params that are not trainable (default: the
    non-float ones and those an op reads as a buffer, its `buffer_inputs` trait: batch_norm's running
    statistics). ParseError (naming `source` and the line) for text that does not follow the grammar
    or refers to undefined nodes or absent params. The graph is not verified: call ir.verify."""
    params = dict(params or {})
    graph = Graph()
    graph.training, graph.capture_method = training, capture_method
    for name, t in params.items():
        if not isinstance(t, torch.Tensor):
            raise ParseError(f"{source}: params[{name!r}] is a {type(t).__name__}, not a tensor")
        graph.add_param(name, t, buffer=buffers is not None and name in buffers, unique=False)
    parser = _Parser(graph, params)
    state = "header"
    for lineno, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith(("//", "#")):
            continue
        ln = _Line(raw, lineno, source)
        if state == "header":
            parser.header(ln)
            state = "body"
        elif state == "body":
            if ln.accept("return"):
                graph.set_outputs(parser.value(ln))
                ln.done()
                state = "close"
            else:
                parser.node(ln)
        elif state == "close":
            ln.expect("}", "after the return line")
            ln.done()
            state = "end"
        else:
            raise ln.error("text after the graph's closing '}'", 0)
    if state != "end":
        want = {"header": "a `graph NAME(...) {` line", "body": "a `return ...` line",
                "close": "the closing '}'"}[state]
        raise ParseError(f"{source}: the text ends before {want}")
    if buffers is None:
        graph.buffers = _buffers_read(graph)
    return graph


def _buffers_read(graph: Graph) -> set[str]:
    """Params that are buffers by what reads them: non-float ones, and those at an op's `buffer_inputs`."""
    out = {k for k, t in graph.params.items() if not t.is_floating_point()}
    for n in graph:
        op = OPS.get(n.op)
        for i in op.buffer_inputs if op is not None else ():
            if i < len(n.inputs) and isinstance(n.inputs[i], Param):
                out.add(n.inputs[i].name)
    return out


__all__ = ["parse", "ParseError", "resolve_function"]
