"""Parametrized weights (torch.nn.utils.parametrize: weight_norm, spectral_norm, orthogonal, ...) baked at capture.

A parametrized module computes its weight from other tensors on every call (`g * v / ||v||`), so both capture
front-ends record that computation, from the stored `X.parametrizations.weight.original*` tensors, as nodes
of the graph; several of them (aten::_weight_norm, mv, dot) are ops no exporter or pass knows. In eval mode the
computation reads only the model's own tensors, so its value is a constant of the model: it is computed once
here and stored as the param `X.weight`, the name the module exposes it under. A compressed model is
deployed with that weight (what torch.nn.utils.parametrize.remove_parametrizations(leave_parametrized=True)
does); fine-tuning then trains the weight itself.
"""

from __future__ import annotations

from typing import Any

import torch

from slimfx.ir.evaluate import _compute
from slimfx.ir.graph import Graph, Node, Param, iter_refs

_MARK = ".parametrizations."


def bake_parametrizations(graph: Graph) -> list[str]:
    """Replace the nodes that compute parametrized weights from params alone by params of their value; the
    names of the new params (`X.weight`), in graph order. Graphs captured in training mode are left alone
    (spectral_norm's power iteration updates its buffers there)."""
    if graph.training:
        return []
    cone: set[Node] = set()
    for n in graph:
        if _in_parametrization(n) and all(isinstance(r, Param) or r in cone for r in iter_refs((n.inputs, n.attrs))):
            cone.add(n)
    frontier = [n for n in graph if n in cone and any(u not in cone for u in n.users)]
    if not frontier:
        return []
    values: dict[Node, Any] = {}
    with torch.no_grad():
        for n in graph:
            if n in cone:
                values[n] = _compute(n, values, graph.params)
    read = {r.name for n in cone for r in iter_refs((n.inputs, n.attrs)) if isinstance(r, Param)}
    baked = []
    for n in frontier:
        value = values[n]
        if not isinstance(value, torch.Tensor):
            continue
        ref = graph.add_param(_weight_name(n), value.detach().clone())
        for u in list(n.users):
            if u not in cone:
                u.replace_input(n, ref)
        baked.append(ref.name)
    for n in reversed(list(graph)):
        if n in cone and not n.users:
            graph.erase(n)
    still_read = {r.name for n in graph for r in iter_refs((n.inputs, n.attrs)) if isinstance(r, Param)}
    for name in read - still_read:
        del graph.params[name]
        graph.buffers.discard(name)
    return baked


def _in_parametrization(n: Node) -> bool:
    if n.op in ("input", "output") or not n.module_path or _MARK not in f".{n.module_path}.":
        return False
    return not (n.op == "opaque" and n.attrs.get("kind") == "call_module")


def _weight_name(n: Node) -> str:
    """`X.weight` for a node of module `X.parametrizations.weight.0` (the name the module exposes)."""
    owner, _, rest = f".{n.module_path}".partition(_MARK)
    return ".".join(p for p in (owner.lstrip("."), rest.split(".")[0]) if p)
