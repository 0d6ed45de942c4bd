"""Lowering: IR graph -> runnable, trainable torch.fx.GraphModule."""

from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn as nn

from slimfx.ir.graph import Graph, Node, Param, map_refs
from slimfx.ir.ops import get_op

# fx renames a node whose name would shadow a Python builtin or keyword (`%slice` -> `slice_1`, an input `input`
# -> `input_1`) and then moves the next one up (`%slice_1` -> `slice_2`), so fx names are not IR names: each fx node
# of a lowering carries its IR node's name here, and code reading a lowered module's nodes asks `ir_name`.
IR_NAME = "slimfx_ir_name"


def ir_name(n: fx.Node) -> str:
    """The name of the IR node that fx node `n` of a `lower`ed module computes (its own name otherwise)."""
    return n.meta.get(IR_NAME, n.name)


def _install(root: nn.Module, qualname: str, value: Any) -> None:
    *path, field = qualname.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    if isinstance(value, nn.Module):
        mod.add_module(field, value)
    elif isinstance(value, nn.Parameter):
        mod.register_parameter(field, value)
    else:
        mod.register_buffer(field, value)


def lower(graph: Graph, *, copy_params: bool = False) -> fx.GraphModule:
    """Build a torch.fx.GraphModule that computes what `graph` computes.

    Float params become nn.Parameters that share storage with `graph.params`
    (so training the lowered module trains the graph) unless `copy_params`.
    The module's train/eval mode drives batch_norm and dropout nodes.
    """
    root = nn.Module()
    fxg = fx.Graph()
    env: dict[Node, fx.Node] = {}
    attrs_nodes: dict[str, fx.Node] = {}

    def get_attr(name: str) -> fx.Node:
        if name not in attrs_nodes:
            attrs_nodes[name] = fxg.get_attr(name)
        return attrs_nodes[name]

    installed: set[str] = set()
    alias = graph.param_aliases()
    values: dict[str, Any] = {}  # canonical name -> the installed tensor: a tied weight is one nn.Parameter

    def ref(r: Any) -> Any:
        if isinstance(r, Node):
            return env[r]
        if isinstance(r, Param):
            if r.name not in installed:
                canonical = alias.get(r.name, r.name)
                if canonical not in values:
                    t = graph.params[r.name]
                    if copy_params:
                        t = t.clone()
                    values[canonical] = t if r.name in graph.buffers or not t.is_floating_point() \
                        else nn.Parameter(t, requires_grad=True)
                _install(root, r.name, values[canonical])
                installed.add(r.name)
            return get_attr(r.name)
        return r

    for node in graph:
        if node.op == "input":
            env[node] = fxg.placeholder(node.name)
        elif node.op == "output":
            fxg.output(map_refs(node.inputs[0], ref))
        elif node.op == "opaque":
            kind, target = node.attrs["kind"], node.attrs["target"]
            args = map_refs(node.inputs, ref)
            kwargs = map_refs(node.attrs.get("kwargs", {}), ref)
            if kind == "call_module":
                name = target
                if name not in installed:
                    _install(root, name, node.attrs["module"])
                    installed.add(name)
            env[node] = fxg.create_node(kind, target, args, kwargs, name=node.name)
        else:
            op = get_op(node.op)
            args = map_refs(node.inputs, ref)
            kwargs = map_refs(node.attrs, ref)
            if op.training_flag and kwargs.get("training") is None:
                kwargs["training"] = get_attr("training")
            env[node] = fxg.create_node("call_function", op.impl, args, kwargs, name=node.name)
        if node in env:
            env[node].meta[IR_NAME] = node.name
    gm = fx.GraphModule(root, fxg, graph.name)
    return gm.train(graph.training)


__all__ = ["lower", "ir_name"]
