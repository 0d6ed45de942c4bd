"""Text form of the IR, one node a line:

    %conv1 = conv2d(%x, @conv1.weight, @conv1.bias) {stride=(1, 1), padding=(1, 1)} : f32[1, 16, 8, 8]
"""

from __future__ import annotations

from typing import Any

import torch

from slimfx.ir.graph import Graph, Node, Param


def format_value(v: Any) -> str:
    if isinstance(v, (Node, Param)):
        return str(v) if isinstance(v, Param) else f"%{v.name}"
    if isinstance(v, tuple):
        inner = ", ".join(format_value(x) for x in v)
        return f"({inner},)" if len(v) == 1 else f"({inner})"
    if isinstance(v, list):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {format_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, slice):
        parts = [format_value(x) if x is not None else "" for x in (v.start, v.stop)]
        s = ":".join(parts)
        return s + (f":{format_value(v.step)}" if v.step is not None else "")
    if v is Ellipsis:
        return "..."
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, torch.nn.Module):
        return f"<{type(v).__name__}>"
    if callable(v) and hasattr(v, "__name__"):
        mod = getattr(v, "__module__", None) or ""
        return f"{mod + '.' if mod and mod != 'builtins' else ''}{v.__name__}"
    return repr(v)


def format_meta(meta: Any) -> str:
    if meta is None:
        return ""
    if isinstance(meta, tuple):
        return "(" + ", ".join(format_meta(m) for m in meta) + ")"
    return str(meta)


def format_node(n: Node) -> str:
    if n.op == "output":
        return f"return {format_value(n.inputs[0])}"
    args = ", ".join(format_value(a) for a in n.inputs)
    attrs = n.attrs
    if n.op == "opaque":
        attrs = {"target": n.attrs["target"] if isinstance(n.attrs["target"], str) else format_value(n.attrs["target"]),
                 **({"kwargs": n.attrs["kwargs"]} if n.attrs.get("kwargs") else {})}
        attrs = {k: (v if isinstance(v, str) else v) for k, v in attrs.items()}
    attr_text = ""
    if attrs:
        attr_text = " {" + ", ".join(f"{k}={v if isinstance(v, str) and k == 'target' else format_value(v)}"
                                     for k, v in attrs.items()) + "}"
    meta = format_meta(n.meta)
    return f"%{n.name} = {n.op}({args}){attr_text}" + (f" : {meta}" if meta else "")


def format_graph(graph: Graph) -> str:
    ins = ", ".join(f"%{n.name}: {format_meta(n.meta)}" for n in graph.inputs)
    lines = [f"graph {graph.name}({ins}) {{"]
    for n in graph:
        if n.op == "input":
            continue
        lines.append("  " + format_node(n))
    lines.append("}")
    return "\n".join(lines)
