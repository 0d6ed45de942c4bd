"""ONNX emitters for the ATen ops that torch.export capture keeps as `opaque` nodes.

They are what Hugging Face models build attention masks from (arange, advanced indexing, new_ones, full)
plus a few close relatives (comparisons, logic, where, gather and masked_fill are canonical ops with
emitters of their own; masked_fill and gather stay here for the calls capture keeps as they are: a
masked_fill that changes the dtype, a gather with sparse gradients). Each emitter is registered for
ATen OpOverloads with `register_aten_emitter`; an opaque node whose target has none is refused
with the exporter's usual message naming it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from slimfx.exporters.onnx.context import EmitContext, Emitter, is_static, register_emitter
from slimfx.exporters.onnx.emitters import _err, _out_dtype, filled
from slimfx.ir.errors import ExportError
from slimfx.ir.graph import Node

aten = torch.ops.aten
ATEN_EMITTERS: dict[Any, Emitter] = {}


def register_aten_emitter(*targets: Any):
    """Register `fn(ctx, node) -> onnx name` for opaque call_function nodes of these ATen overloads."""
    def deco(fn: Emitter) -> Emitter:
        for t in targets:
            ATEN_EMITTERS[t] = fn
        return fn
    return deco


@register_emitter("opaque")
def _opaque(ctx: EmitContext, node: Node) -> str:
    fn = ATEN_EMITTERS.get(node.attrs.get("target")) if node.attrs.get("kind") == "call_function" else None
    if fn is None:
        raise ExportError(ctx.unsupported_message(node))
    return fn(ctx, node)


def _args(node: Node) -> tuple[tuple, dict]:
    return node.inputs, dict(node.attrs.get("kwargs") or {})


def _scalar(ctx: EmitContext, v: Any, dtype: torch.dtype) -> str:
    """A 0-d ONNX tensor from a static or batch-dependent scalar (Range takes scalars)."""
    s = ctx.sym(v)
    if is_static(s):
        return ctx.const(s, dtype)
    return ctx.emit("Squeeze", [ctx.sym_tensor(s, dtype), ctx.ints([0])])


# torch.arange too: fx capture keeps `torch.arange(x.shape[1])` as that call when its size follows an input (a
# position index), with the same arguments (start, end, step by position; start/end/step may also be keywords)
@register_aten_emitter(aten.arange.default, aten.arange.start, aten.arange.start_step, torch.arange)
def _arange(ctx: EmitContext, node: Node) -> str:
    args, kwargs = _args(node)
    pos = [0, *args] if len(args) == 1 and "end" not in kwargs else list(args)  # arange(end)
    start, end, step = (pos[i] if len(pos) > i else kwargs.get(k, d) for i, (k, d) in
                        enumerate((("start", 0), ("end", None), ("step", 1))))
    dtype = _out_dtype(node)
    vals = [ctx.sym(v) for v in (start, end, step)]
    if is_static(vals):
        return ctx.const(np.arange(*vals), dtype, name=node.name)
    return ctx.emit("Range", [_scalar(ctx, v, dtype) for v in (start, end, step)])


@register_aten_emitter(aten.new_ones.default, aten.new_zeros.default)
def _new_filled(ctx: EmitContext, node: Node) -> str:
    value = 1 if node.attrs["target"] is aten.new_ones.default else 0
    return filled(ctx, node, node.inputs[1], value)


@register_aten_emitter(aten.full.default)
def _full(ctx: EmitContext, node: Node) -> str:
    size, value = node.inputs[:2]
    if isinstance(value, Node):
        raise _err(node, "full() with a fill value computed at run time")
    return filled(ctx, node, size, value)


@register_aten_emitter(aten.index.Tensor)
def _index(ctx: EmitContext, node: Node) -> str:
    """x[i0, i1, ...] with broadcasting integer index tensors on the leading dims: one GatherND; x[:, ..., i]
    (one index tensor after skipped dims: levit's `attention_biases[:, attention_bias_idxs]`): one Gather."""
    x, indices = node.inputs[:2]
    skipped = next((k for k, i in enumerate(indices) if i is not None), len(indices))
    if skipped and len(indices) == skipped + 1:
        if isinstance(indices[-1], Node) and indices[-1].meta.dtype == torch.bool:
            raise _err(node, "boolean mask indexing (its output size depends on the data)")
        return ctx.emit("Gather", [ctx.value(x), ctx.value(indices[-1], dtype=torch.int64)], axis=skipped)
    if any(i is None for i in indices) or not indices:
        raise _err(node, "advanced indexing that skips a dim (None in the index list)")
    if any(isinstance(i, Node) and i.meta.dtype == torch.bool for i in indices):
        raise _err(node, "boolean mask indexing (its output size depends on the data)")
    idx = [ctx.value(i, dtype=torch.int64) for i in indices]
    if len(idx) > 1:
        # broadcast every index to the common shape: i_k + 0 * i_j for all j
        zero = ctx.const(0, np.int64)
        zeros = [ctx.emit("Mul", [i, zero]) for i in idx]
        idx = [_sum([i] + [z for j, z in enumerate(zeros) if j != k], ctx) for k, i in enumerate(idx)]
    last = ctx.ints([-1])
    stacked = ctx.emit("Concat", [ctx.emit("Unsqueeze", [i, last]) for i in idx], axis=-1)
    return ctx.emit("GatherND", [ctx.value(x), stacked])


def _sum(names: list[str], ctx: EmitContext) -> str:
    out = names[0]
    for n in names[1:]:
        out = ctx.emit("Add", [out, n])
    return out


@register_aten_emitter(aten.gather.default)
def _gather(ctx: EmitContext, node: Node) -> str:
    x, dim, index = node.inputs[:3]
    return ctx.emit("GatherElements", [ctx.value(x), ctx.value(index, dtype=torch.int64)],
                    axis=int(dim) % ctx.rank(x))


@register_aten_emitter(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(ctx: EmitContext, node: Node) -> str:
    x, mask, value = node.inputs[:3]
    dtype = _out_dtype(node)
    return ctx.emit("Where", [ctx.value(mask, dtype=torch.bool), ctx.value(value, dtype=dtype),
                              ctx.value(x, dtype=dtype)])


@register_aten_emitter(aten.clone.default)
def _clone(ctx: EmitContext, node: Node) -> str:
    return ctx.value(node.inputs[0])
