"""Text form of the IR, one node a line:

    graph Net(%x: f32[1, 3, 8, 8]) {
      %conv1 = conv2d(%x, @conv1.weight, @conv1.bias) {stride=(1, 1), padding=(1, 1)} : f32[1, 16, 8, 8]
      return %conv1
    }

`ir.parse` reads it back (see ir/parser.py for the grammar). Values: `%node`, `@param`, Python literals
(numbers, strings, True/False/None, inf/nan), tuples `(a,)`, lists `[a]`, dicts `{'key': a}`, slices
`1:3`, `...`, dtypes as bare torch names (`int8`), functions by dotted name (`torch.add`). Metas:
`f32[1, 16]`, a parenthesised tuple of them for multi-output ops, nothing for non-tensor values.
`format_graph(g, locations=True)` adds each node's module path and source line as
`loc(module='conv1', source='net.py:12')`.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from slimfx.ir.graph import Graph, Node, Param

_PLAIN_NAME = re.compile(r"[A-Za-z_][\w.]*\Z")
_PLAIN_PARAM = re.compile(r"[\w.]+\Z")


def format_name(sigil: str, name: str) -> str:
    """`%name` / `@name`, quoted (`%"a b"`) when the name holds characters the parser's names do not."""
    plain = _PLAIN_NAME if sigil == "%" else _PLAIN_PARAM
    return f"{sigil}{name}" if plain.match(name) else f"{sigil}{_quote(name)}"


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def format_value(v: Any) -> str:
    if isinstance(v, Node):
        return format_name("%", v.name)
    if isinstance(v, Param):
        return format_name("@", v.name)
    if isinstance(v, tuple):
        inner = ", ".join(format_value(x) for x in v)
        return f"({inner},)" if len(v) == 1 else f"({inner})"
    if isinstance(v, list):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{format_value(k)}: {format_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, slice):
        parts = [format_value(x) if x is not None else "" for x in (v.start, v.stop)]
        s = ":".join(parts)
        return s + (f":{format_value(v.step)}" if v.step is not None else "")
    if v is Ellipsis:
        return "..."
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, torch.device):  # torch.export's factory calls name theirs: arange(..., device=cpu)
        return f"device({format_value(str(v))})"
    if isinstance(v, torch.nn.Module):
        return f"<{type(v).__name__}>"
    if isinstance(v, float):
        return repr(v)  # shortest text that reads back to the same float; inf, -inf, nan
    if callable(v) and hasattr(v, "__name__"):
        return function_name(v)
    return repr(v)


# Where functions in IR text come from, most specific first (ir.parse resolves these names, and only these).
FUNCTION_HOMES = ("torch.nn.functional", "torch.Tensor", "torch.special", "torch.linalg", "torch.fft", "torch",
                  "operator", "math", "builtins")


def function_name(fn: Any) -> str:
    """A function's dotted name: its public home when it is an attribute of one (`torch.add`,
    `operator.getitem`, `builtins.getattr`), else its module and qualified name."""
    import sys

    if isinstance(fn, torch._ops.OpOverload) and fn.namespace == "aten":  # torch.export's calls: arange.start
        return f"torch.ops.aten.{fn.__name__}"
    name = getattr(fn, "__name__", None)
    for home in FUNCTION_HOMES:
        mod = torch.Tensor if home == "torch.Tensor" else sys.modules.get(home)
        if mod is not None and name and getattr(mod, name, None) is fn:
            return f"{home}.{name}"
    mod = getattr(fn, "__module__", None) or "builtins"
    return f"{mod}.{getattr(fn, '__qualname__', name)}"


def format_meta(meta: Any) -> str:
    if meta is None:
        return ""
    if isinstance(meta, tuple):
        return "(" + ", ".join(format_meta(m) for m in meta) + ("," if len(meta) == 1 else "") + ")"
    return str(meta)


def _format_loc(n: Node) -> str:
    parts = [f"{k}={_quote(v)}" for k, v in (("module", n.module_path), ("source", n.source)) if v]
    return f" loc({', '.join(parts)})" if parts else ""


def format_node(n: Node, *, locations: bool = False) -> str:
    if n.op == "output":
        return f"return {format_value(n.inputs[0])}"
    args = ", ".join(format_value(a) for a in n.inputs)
    attrs = n.attrs
    attr_text = ""
    if attrs:
        attr_text = " {" + ", ".join(f"{k}={format_value(v)}" for k, v in attrs.items()) + "}"
    meta = format_meta(n.meta)
    text = f"{format_name('%', n.name)} = {n.op}({args}){attr_text}" + (f" : {meta}" if meta else "")
    return text + (_format_loc(n) if locations else "")


def format_graph(graph: Graph, *, locations: bool = False) -> str:
    """The graph as text; `locations=True` adds each node's module path and source (`loc(...)`)."""
    ins = ", ".join(format_name("%", n.name) + (f": {format_meta(n.meta)}" if n.meta is not None else "")
                    for n in graph.inputs)
    name = graph.name if _PLAIN_NAME.match(graph.name) and "." not in graph.name else _quote(graph.name)
    lines = [f"graph {name}({ins}) {{"]
    for n in graph:
        if n.op == "input":
            continue
        lines.append("  " + format_node(n, locations=locations))
    lines.append("}")
    return "\n".join(lines)
