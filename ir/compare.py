"""Structural comparison of two graphs: the same nodes (names, ops, operands, attributes, metas, in the
same order), the same outputs and the same params table. Used by the text and file round trips."""

from __future__ import annotations

import math
from typing import Any

import torch

from slimfx.ir.graph import Graph, Node, Param


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, Node) or isinstance(b, Node):
        return isinstance(a, Node) and isinstance(b, Node) and a.name == b.name
    if isinstance(a, Param) or isinstance(b, Param):
        return a == b
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return (type(a) is type(b) or {type(a), type(b)} <= {tuple, torch.Size}) and len(a) == len(b) \
            and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and list(a) == list(b) \
            and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, slice) or isinstance(b, slice):
        return isinstance(a, slice) and isinstance(b, slice) and all(
            _same_value(x, y) for x, y in ((a.start, b.start), (a.stop, b.stop), (a.step, b.step)))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b) and not (callable(a) and callable(b)):
        return False
    return a == b


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (NaN payloads and -0.0 included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def graph_diff(a: Graph, b: Graph, *, params: bool = True, locations: bool = True) -> str | None:
    """The first structural difference between `a` and `b` as a sentence, or None when they are the same.

    `params`: also compare the params tables (names, dtypes, shapes, values bit for bit, which are
    buffers); `locations`: also compare each node's module path and source line."""
    if a.name != b.name:
        return f"graph names differ: {a.name!r} vs {b.name!r}"
    na, nb = a.nodes, b.nodes
    for x, y in zip(na, nb):
        where = f"node %{x.name}"
        if x.name != y.name:
            return f"node order differs: %{x.name} ({x.op}) vs %{y.name} ({y.op})"
        if x.op != y.op:
            return f"{where}: op {x.op!r} vs {y.op!r}"
        if not _same_value(x.inputs, y.inputs):
            return f"{where}: inputs {x.inputs!r} vs {y.inputs!r}"
        if not _same_value(x.attrs, y.attrs):
            return f"{where}: attrs {x.attrs!r} vs {y.attrs!r}"
        if x.meta != y.meta:
            return f"{where}: meta {x.meta} vs {y.meta}"
        if locations and (x.module_path, x.source) != (y.module_path, y.source):
            return f"{where}: location {(x.module_path, x.source)} vs {(y.module_path, y.source)}"
    if len(na) != len(nb):
        extra = (na if len(na) > len(nb) else nb)[min(len(na), len(nb))]
        return f"node counts differ: {len(na)} vs {len(nb)} (first extra: %{extra.name})"
    if params:
        if list(a.params) != list(b.params):
            missing = sorted(set(a.params) ^ set(b.params))
            return f"params tables differ: {', '.join(missing[:5]) or 'same names in another order'}"
        for k, t in a.params.items():
            u = b.params[k]
            if t.dtype != u.dtype or t.shape != u.shape:
                return f"param {k}: {t.dtype}{list(t.shape)} vs {u.dtype}{list(u.shape)}"
            if not torch.equal(_bits(t), _bits(u)):
                return f"param {k}: values differ"
        if a.buffers != b.buffers:
            return f"buffers differ: {sorted(a.buffers ^ b.buffers)[:5]}"
    return None


__all__ = ["graph_diff"]
