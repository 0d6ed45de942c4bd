"""One ONNX emitter per canonical IR op.

Each emitter reads its node's operands through the context and returns the ONNX name of its
output (a list of names for tuple-valued ops). Emitters keep the graph lean: static shapes are
constants, aliases (contiguous, identity, dropout) emit nothing, 2-D linear is one Gemm.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from onnx import helper, numpy_helper

from slimfx.exporters.onnx.context import Dyn, EmitContext, onnx_dtype, register_emitter, to_numpy
from slimfx.ir.errors import ExportError
from slimfx.ir.graph import Node, Param
from slimfx.ir.ops import trait

INT64_MAX = 2**63 - 1


def _err(node: Node, msg: str) -> ExportError:
    return ExportError(f"cannot export %{node.name} ({node.op}, {node.where()}) to ONNX: {msg}")


def _out_dtype(node: Node) -> torch.dtype:
    return node.tensor_meta.dtype


def _axis(d: int, rank: int) -> int:
    return d % rank if rank else 0


def _pairs(v: Any, n: int) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [int(v)] * n


# --- conv, linear, matmul ---------------------------------------------------------------------------

@register_emitter("conv1d", "conv2d")
def _conv(ctx: EmitContext, node: Node) -> str:
    x, w, b = node.inputs
    k = 1 if node.op == "conv1d" else 2
    wshape = ctx.meta(w).shape
    kernel = list(wshape[2:])
    stride = _pairs(node.attrs.get("stride", 1), k)
    dilation = _pairs(node.attrs.get("dilation", 1), k)
    padding = node.attrs.get("padding", 0)
    if padding == "valid":
        pads = [0] * (2 * k)
    elif padding == "same":
        total = [d * (kk - 1) for d, kk in zip(dilation, kernel)]
        pads = [t // 2 for t in total] + [t - t // 2 for t in total]
    else:
        p = _pairs(padding, k)
        pads = p + p
    ins = [ctx.value(x), ctx.value(w)] + ([ctx.value(b)] if b is not None else [])
    group = int(node.attrs.get("groups", 1))
    # attributes at their ONNX defaults are left out: a few dozen bytes per conv, which shows in small int8 files
    return ctx.emit("Conv", ins, kernel_shape=kernel, strides=None if set(stride) == {1} else stride,
                    pads=None if not any(pads) else pads, dilations=None if set(dilation) == {1} else dilation,
                    group=None if group == 1 else group)


@register_emitter("linear")
def _linear(ctx: EmitContext, node: Node) -> str:
    x, w, b = node.inputs
    rank = ctx.rank(x)
    if rank == 2:
        ins = [ctx.value(x), ctx.value(w)] + ([ctx.value(b)] if b is not None else [])
        return ctx.emit("Gemm", ins, transB=1)
    if isinstance(w, Param):
        wt = ctx.param(w, key="T", transform=lambda t: t.t().contiguous())
    else:
        wt = ctx.emit("Transpose", [ctx.value(w)], perm=[1, 0])
    y = ctx.emit("MatMul", [ctx.value(x), wt])
    return ctx.emit("Add", [y, ctx.value(b)]) if b is not None else y


@register_emitter("matmul")
def _matmul(ctx: EmitContext, node: Node) -> str:
    a, b = node.inputs
    dt = _out_dtype(node)
    return ctx.emit("MatMul", [ctx.value(a, dtype=dt), ctx.value(b, dtype=dt)])


# --- normalisation ------------------------------------------------------------------------------------

@register_emitter("batch_norm")
def _batch_norm(ctx: EmitContext, node: Node) -> str:
    x, mean, var, w, b = node.inputs[:5]
    if node.attrs.get("training") is True or mean is None or var is None:
        raise _err(node, "batch_norm in training mode (or without running statistics) normalises with "
                         "batch statistics, which an inference export cannot reproduce. Put the model in "
                         "eval mode (with track_running_stats=True) before capture.")
    c = ctx.meta(mean).shape[0]
    scale = ctx.value(w) if w is not None else ctx.const(np.ones(c), _out_dtype(node))
    bias = ctx.value(b) if b is not None else ctx.const(np.zeros(c), _out_dtype(node))
    return ctx.emit("BatchNormalization", [ctx.value(x), scale, bias, ctx.value(mean), ctx.value(var)],
                    epsilon=float(node.attrs.get("eps", 1e-5)))


@register_emitter("layer_norm")
def _layer_norm(ctx: EmitContext, node: Node) -> str:
    x, w, b = node.inputs
    shape = tuple(node.attrs["normalized_shape"])
    dt = _out_dtype(node)
    scale = ctx.value(w) if w is not None else ctx.const(np.ones(shape), dt)
    ins = [ctx.value(x), scale] + ([ctx.value(b)] if b is not None else [])
    return ctx.emit("LayerNormalization", ins, axis=-len(shape), epsilon=float(node.attrs.get("eps", 1e-5)))


@register_emitter("group_norm")
def _group_norm(ctx: EmitContext, node: Node) -> str:
    """Reshape to (N, G, -1), InstanceNormalization, reshape back, then the per-channel affine."""
    x, w, b = node.inputs
    meta = ctx.meta(x)
    g = int(node.attrs["num_groups"])
    dt = meta.dtype
    y = ctx.emit("Reshape", [ctx.value(x), ctx.ints([0, g, -1])])
    y = ctx.emit("InstanceNormalization", [y, ctx.const(np.ones(g), dt), ctx.const(np.zeros(g), dt)],
                 epsilon=float(node.attrs.get("eps", 1e-5)))
    y = ctx.emit("Reshape", [y, _reshape_target(ctx, x, node)])
    bshape = [-1] + [1] * (len(meta.shape) - 2)
    if w is not None:
        y = ctx.emit("Mul", [y, ctx.param(w, key="bc", transform=lambda t: t.reshape(bshape))])
    if b is not None:
        y = ctx.emit("Add", [y, ctx.param(b, key="bc", transform=lambda t: t.reshape(bshape))])
    return y


@register_emitter("embedding")
def _embedding(ctx: EmitContext, node: Node) -> str:
    ids, w = node.inputs
    if node.attrs.get("max_norm") is not None:
        raise _err(node, "embedding with max_norm renormalises its table at run time; ONNX cannot express it")
    return ctx.emit("Gather", [ctx.value(w), ctx.value(ids)], axis=0)


# --- activations ----------------------------------------------------------------------------------------

_UNARY = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "hardswish": "HardSwish", "neg": "Neg",
          "sqrt": "Sqrt", "exp": "Exp", "log": "Log", "abs": "Abs", "erf": "Erf", "reciprocal": "Reciprocal"}


@register_emitter(*_UNARY)
def _unary(ctx: EmitContext, node: Node) -> str:
    return ctx.emit(_UNARY[node.op], [ctx.value(node.inputs[0], dtype=_out_dtype(node))])


@register_emitter("rsqrt")
def _rsqrt(ctx: EmitContext, node: Node) -> str:
    return ctx.emit("Reciprocal", [ctx.emit("Sqrt", [ctx.value(node.inputs[0], dtype=_out_dtype(node))])])


@register_emitter("silu")
def _silu(ctx: EmitContext, node: Node) -> str:
    x = ctx.value(node.inputs[0])
    return ctx.emit("Mul", [x, ctx.emit("Sigmoid", [x])])


@register_emitter("hardsigmoid")
def _hardsigmoid(ctx: EmitContext, node: Node) -> str:
    return ctx.emit("HardSigmoid", [ctx.value(node.inputs[0])], alpha=1.0 / 6.0, beta=0.5)


@register_emitter("leaky_relu")
def _leaky_relu(ctx: EmitContext, node: Node) -> str:
    return ctx.emit("LeakyRelu", [ctx.value(node.inputs[0])], alpha=float(node.attrs.get("negative_slope", 0.01)))


@register_emitter("relu6", "clamp")
def _clip(ctx: EmitContext, node: Node) -> str:
    dt = _out_dtype(node)
    lo, hi = (0.0, 6.0) if node.op == "relu6" else (node.attrs.get("min"), node.attrs.get("max"))
    if node.op == "clamp" and lo is not None and hi is None and float(lo) == 0.0 and dt.is_floating_point:
        return ctx.emit("Relu", [ctx.value(node.inputs[0])])
    lo_n = ctx.value(lo, dtype=dt) if lo is not None else None
    hi_n = ctx.value(hi, dtype=dt) if hi is not None else None
    return ctx.emit("Clip", [ctx.value(node.inputs[0], dtype=dt), lo_n, hi_n])


@register_emitter("gelu")
def _gelu(ctx: EmitContext, node: Node) -> str:
    x = ctx.value(node.inputs[0])
    dt = _out_dtype(node)
    approx = node.attrs.get("approximate", "none")
    if ctx.opset >= 20:
        return ctx.emit("Gelu", [x], approximate=approx)
    if approx == "tanh":
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        x3 = ctx.emit("Mul", [ctx.emit("Mul", [x, x]), x])
        inner = ctx.emit("Add", [x, ctx.emit("Mul", [x3, ctx.const(0.044715, dt)])])
        t = ctx.emit("Tanh", [ctx.emit("Mul", [inner, ctx.const(math.sqrt(2.0 / math.pi), dt)])])
    else:
        # The x * 0.5 * (1 + erf(x / sqrt 2)) form that onnxruntime fuses into one Gelu kernel.
        t = ctx.emit("Erf", [ctx.emit("Div", [x, ctx.const(math.sqrt(2.0), dt)])])
    y = ctx.emit("Mul", [x, ctx.emit("Add", [t, ctx.const(1.0, dt)])])
    return ctx.emit("Mul", [y, ctx.const(0.5, dt)])


@register_emitter("softmax", "log_softmax")
def _softmax(ctx: EmitContext, node: Node) -> str:
    x = node.inputs[0]
    return ctx.emit("Softmax" if node.op == "softmax" else "LogSoftmax", [ctx.value(x)],
                    axis=_axis(int(node.attrs["dim"]), ctx.rank(x)))


# --- elementwise ------------------------------------------------------------------------------------------

_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow"}


@register_emitter(*_BINARY)
def _binary(ctx: EmitContext, node: Node) -> str:
    a, b = node.inputs
    dt = _out_dtype(node)
    if node.op == "pow":
        if not isinstance(b, (Node, Param)) and float(b) == 2.0:
            xa = ctx.value(a, dtype=dt)
            return ctx.emit("Mul", [xa, xa])
        if not isinstance(b, (Node, Param)) and float(b) == 0.5:
            return ctx.emit("Sqrt", [ctx.value(a, dtype=dt)])
    return ctx.emit(_BINARY[node.op], [ctx.value(a, dtype=dt), ctx.value(b, dtype=dt)])


@register_emitter("cast")
def _cast(ctx: EmitContext, node: Node) -> str:
    x = node.inputs[0]
    if ctx.meta(x).dtype == _out_dtype(node):
        return ctx.value(x)
    return ctx.cast(ctx.value(x), _out_dtype(node))


@register_emitter("contiguous", "identity", "dropout")
def _alias(ctx: EmitContext, node: Node) -> str:
    if node.op == "dropout" and node.attrs.get("training") is True and float(node.attrs.get("p", 0.0)) > 0:
        raise _err(node, "functional dropout with training=True is random at inference; pass "
                         "training=self.training (or use nn.Dropout) so eval mode disables it")
    return ctx.value(node.inputs[0])


# --- pooling ------------------------------------------------------------------------------------------------

@register_emitter("max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d")
def _pool(ctx: EmitContext, node: Node) -> str:
    k = 1 if node.op.endswith("1d") else 2
    a = node.attrs
    kernel = _pairs(a["kernel_size"], k)
    stride = _pairs(a.get("stride") or kernel, k)
    pad = _pairs(a.get("padding", 0), k)
    ceil = int(bool(a.get("ceil_mode", False)))
    x = ctx.value(node.inputs[0])
    if node.op.startswith("max"):
        return ctx.emit("MaxPool", [x], kernel_shape=kernel, strides=stride, pads=pad + pad,
                        dilations=_pairs(a.get("dilation", 1), k), ceil_mode=ceil)
    if a.get("divisor_override") is not None:
        raise _err(node, "avg_pool with divisor_override has no ONNX equivalent")
    return ctx.emit("AveragePool", [x], kernel_shape=kernel, strides=stride, pads=pad + pad, ceil_mode=ceil,
                    count_include_pad=int(bool(a.get("count_include_pad", True))))


@register_emitter("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool2d")
def _adaptive_pool(ctx: EmitContext, node: Node) -> str:
    x = node.inputs[0]
    spatial = ctx.meta(x).shape[2:]
    out = node.tensor_meta.shape[2:]
    is_max = node.op.startswith("adaptive_max")
    xv = ctx.value(x)
    if tuple(spatial) == tuple(out):
        return xv
    if all(o == 1 for o in out):
        return ctx.emit("GlobalMaxPool" if is_max else "GlobalAveragePool", [xv])
    if any(i % o for i, o in zip(spatial, out)):
        raise _err(node, f"adaptive pooling from {tuple(spatial)} to {tuple(out)}: the input size is not a "
                         "multiple of the output size, so the windows differ in size and no single ONNX "
                         "pooling op matches. Choose an output size that divides the input size.")
    kernel = [i // o for i, o in zip(spatial, out)]
    return ctx.emit("MaxPool" if is_max else "AveragePool", [xv], kernel_shape=kernel, strides=kernel)


# --- shapes ----------------------------------------------------------------------------------------------------

def _reshape_target(ctx: EmitContext, x: Any, node: Node, spec: Any = None) -> str:
    """The Reshape shape input for `x` -> `node`'s output shape, constant whenever possible.

    Batch-dependent output dims become 0 (copy the input dim at the same position) when they equal
    it, at most one becomes -1, and only if more remain are they computed from `spec` (the IR's
    shape entries) at run time. One batch-dependent dim is written as -1 even when 0 would do:
    onnxruntime's shape inference carries the input's symbolic dim through a 0 but not a -1, and
    with the symbol kept its memory planner and fusions make the attention Transposes/MatMuls of
    tiny_bert 5-10% slower than torch.onnx's (which computes every dim at run time).
    """
    out = list(node.tensor_meta.shape)
    dyn = ctx.dynamic_dims(node)
    if not any(dyn):
        return ctx.ints(out)
    target: list[Any] = list(out)
    pending = [i for i, d in enumerate(dyn) if d]
    pd_out = ctx.probe_dims(node)
    pd_in = ctx.probe_dims(x) if isinstance(x, Node) else None
    if pd_out is not None and pd_in is not None:
        for i in list(pending):
            if i < len(pd_in[0]) and pd_out[0][i] == pd_in[0][i] and pd_out[1][i] == pd_in[1][i]:
                target[i] = 0
                pending.remove(i)
    if any(t == 0 for t in out):  # a real 0-sized dim would be misread as "copy"
        raise _err(node, "reshape to a shape with a 0-sized dim and a dynamic batch")
    if not pending:
        copied = [i for i, t in enumerate(target) if t == 0]
        if copied:
            pending.append(copied[0])
    if len(pending) <= 1:
        for i in pending:
            target[i] = -1
        return ctx.ints(target)
    if spec is None:
        raise _err(node, "several batch-dependent dims in the output shape; export with dynamic_batch=False")
    entries = []
    for e in spec:
        s = ctx.sym(e)
        entries.extend(s if isinstance(s, (tuple, list)) else [s])
    if len(entries) != len(out):
        raise _err(node, f"shape {entries} does not match the output rank {len(out)}")
    for i in pending:
        target[i] = entries[i]
    return ctx.sym_tensor(target)


def _reshape_to_meta(ctx: EmitContext, node: Node, x: Any, spec: Any = None) -> str:
    if ctx.meta(x).shape == node.tensor_meta.shape and not any(ctx.dynamic_dims(node)):
        return ctx.value(x)
    return ctx.emit("Reshape", [ctx.value(x), _reshape_target(ctx, x, node, spec)])


@register_emitter("reshape")
def _reshape(ctx: EmitContext, node: Node) -> str:
    x = node.inputs[0]
    if ctx.meta(x).shape == node.tensor_meta.shape and ctx.dynamic_dims(x) == ctx.dynamic_dims(node):
        return ctx.value(x)
    return ctx.emit("Reshape", [ctx.value(x), _reshape_target(ctx, x, node, node.attrs.get("shape"))])


@register_emitter("flatten")
def _flatten(ctx: EmitContext, node: Node) -> str:
    x = node.inputs[0]
    rank = ctx.rank(x)
    if rank == 0:
        return ctx.emit("Reshape", [ctx.value(x), ctx.ints([1])])
    start = _axis(int(node.attrs.get("start_dim", 0)), rank)
    end = _axis(int(node.attrs.get("end_dim", -1)), rank)
    if start >= end:
        return ctx.value(x)
    if start == 1 and end == rank - 1:
        return ctx.emit("Flatten", [ctx.value(x)], axis=1)
    return ctx.emit("Reshape", [ctx.value(x), _reshape_target(ctx, x, node)])


def _perm_is_identity(perm: list[int]) -> bool:
    return perm == sorted(perm)


@register_emitter("permute")
def _permute(ctx: EmitContext, node: Node) -> str:
    x = node.inputs[0]
    rank = ctx.rank(x)
    perm = [_axis(int(d), rank) for d in node.attrs["dims"]]
    return ctx.value(x) if _perm_is_identity(perm) else ctx.emit("Transpose", [ctx.value(x)], perm=perm)


@register_emitter("transpose")
def _transpose(ctx: EmitContext, node: Node) -> str:
    x = node.inputs[0]
    rank = ctx.rank(x)
    perm = list(range(rank))
    d0, d1 = _axis(int(node.attrs["dim0"]), rank), _axis(int(node.attrs["dim1"]), rank)
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return ctx.value(x) if d0 == d1 else ctx.emit("Transpose", [ctx.value(x)], perm=perm)


@register_emitter("expand")
def _expand(ctx: EmitContext, node: Node) -> str:
    x = node.inputs[0]
    in_shape = ctx.meta(x).shape
    out = node.tensor_meta.shape
    if tuple(in_shape) == tuple(out) and ctx.dynamic_dims(x) == ctx.dynamic_dims(node):
        return ctx.value(x)
    offset = len(out) - len(in_shape)
    dyn_out = ctx.dynamic_dims(node)
    dyn_in = ctx.dynamic_dims(x)
    target: list[Any] = []
    for i, o in enumerate(out):
        j = i - offset
        if j >= 0 and (in_shape[j] == o and dyn_in[j] == dyn_out[i]):
            target.append(1)  # ONNX Expand broadcasts: 1 keeps the input's dim
        elif not dyn_out[i]:
            target.append(o)
        else:
            spec = ctx.sym(node.attrs["size"])
            spec = [e for s in spec for e in (s if isinstance(s, (tuple, list)) else [s])]
            target.append(spec[i])
    return ctx.emit("Expand", [ctx.value(x), ctx.sym_tensor(target)])


@register_emitter("cat")
def _cat(ctx: EmitContext, node: Node) -> str:
    dt = _out_dtype(node)
    rank = len(node.tensor_meta.shape)
    xs = [x for x in node.inputs if not (isinstance(x, Node) and ctx.meta(x).numel == 0 and ctx.rank(x) == 1)]
    if len(xs) == 1:
        return ctx.value(xs[0], dtype=dt)
    return ctx.emit("Concat", [ctx.value(x, dtype=dt) for x in xs], axis=_axis(int(node.attrs.get("dim", 0)), rank))


@register_emitter("stack")
def _stack(ctx: EmitContext, node: Node) -> str:
    dt = _out_dtype(node)
    rank = len(node.tensor_meta.shape)
    axis = _axis(int(node.attrs.get("dim", 0)), rank)
    axes = ctx.ints([axis])
    parts = [ctx.emit("Unsqueeze", [ctx.value(x, dtype=dt), axes]) for x in node.inputs]
    return parts[0] if len(parts) == 1 else ctx.emit("Concat", parts, axis=axis)


@register_emitter("split", "chunk")
def _split(ctx: EmitContext, node: Node) -> list[str]:
    x = node.inputs[0]
    rank = ctx.rank(x)
    axis = _axis(int(node.attrs.get("dim", 0)), rank)
    metas = node.meta
    if not isinstance(metas, tuple):
        raise _err(node, "split without a tuple of output metas; run ir.propagate_shapes")
    if ctx.dynamic_dims(x)[axis]:
        raise _err(node, "split along the batch dim with a dynamic batch; export with dynamic_batch=False")
    sizes = [m.shape[axis] for m in metas]
    if len(sizes) == 1:
        return [ctx.value(x)]
    return ctx.emit("Split", [ctx.value(x), ctx.ints(sizes)], outputs=len(sizes), axis=axis)


@register_emitter("getitem")
def _getitem(ctx: EmitContext, node: Node) -> str:
    base = node.inputs[0]
    names = ctx._env.get(base)
    if not isinstance(names, list):
        raise _err(node, f"getitem of %{getattr(base, 'name', base)}, which is not a tuple of tensors")
    return names[node.attrs["index"]]


@register_emitter("unsqueeze")
def _unsqueeze(ctx: EmitContext, node: Node) -> str:
    rank = len(node.tensor_meta.shape)
    return ctx.emit("Unsqueeze", [ctx.value(node.inputs[0]), ctx.ints([_axis(int(node.attrs["dim"]), rank)])])


@register_emitter("squeeze")
def _squeeze(ctx: EmitContext, node: Node) -> str:
    x = node.inputs[0]
    shape = ctx.meta(x).shape
    dyn = ctx.dynamic_dims(x)
    dim = node.attrs.get("dim")
    dims = range(len(shape)) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
    axes = sorted({_axis(int(d), len(shape)) for d in dims if shape[_axis(int(d), len(shape))] == 1
                   and not dyn[_axis(int(d), len(shape))]})
    if not axes:
        return ctx.value(x)
    return ctx.emit("Squeeze", [ctx.value(x), ctx.ints(axes)])


@register_emitter("slice")
def _slice(ctx: EmitContext, node: Node) -> str:
    """Tensor indexing with ints, slices, None and Ellipsis: one Slice, then Gather/Squeeze, then Unsqueeze."""
    x = node.inputs[0]
    rank = ctx.rank(x)
    index = node.attrs["index"]
    idx = list(index) if isinstance(index, tuple) else [index]
    # bounds that are size nodes (export capture with a dynamic sequence length): ints, or Dyn when
    # they follow the batch size
    idx = [slice(ctx.sym(i.start), ctx.sym(i.stop), ctx.sym(i.step)) if isinstance(i, slice) else ctx.sym(i)
           for i in idx]
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if Ellipsis in idx:
        pos = idx.index(Ellipsis)
        idx = idx[:pos] + [slice(None)] * (rank - n_real) + idx[pos + 1:]
    idx += [slice(None)] * (rank - sum(1 for i in idx if i is not None))
    starts, ends, axes, steps, int_axes, new_axes = [], [], [], [], [], []
    d = 0   # input dim
    od = 0  # output dim (after removing ints, adding Nones)
    ints: list[tuple[int, int]] = []
    for i in idx:
        if i is None:
            new_axes.append(od)
            od += 1
            continue
        if isinstance(i, bool) or not isinstance(i, (int, slice)):
            raise _err(node, f"index {i!r} is not an int, slice, None or Ellipsis")
        if isinstance(i, int):
            ints.append((d, i))
            int_axes.append(d)
        else:
            if not (i.start in (None, 0) and i.stop is None and i.step in (None, 1)):
                if (i.step or 1) < 1:
                    raise _err(node, "slices with a step below 1")
                starts.append(i.start if isinstance(i.start, Dyn) else int(i.start or 0))
                ends.append(INT64_MAX if i.stop is None else i.stop if isinstance(i.stop, Dyn) else int(i.stop))
                axes.append(d)
                steps.append(int(i.step or 1))
            od += 1
        d += 1
    y = ctx.value(x)
    if axes:
        ins = [y, ctx.sym_tensor(starts), ctx.sym_tensor(ends), ctx.ints(axes)]
        if any(s != 1 for s in steps):
            ins.append(ctx.ints(steps))
        y = ctx.emit("Slice", ins)
    if len(ints) == 1:
        dd, i = ints[0]
        y = ctx.emit("Gather", [y, ctx.const(i, np.int64)], axis=dd)
    elif ints:
        # Take each int position as a length-1 slice, then squeeze them all at once.
        y = ctx.emit("Slice", [y, ctx.ints([i for _, i in ints]),
                               ctx.ints([i + 1 if i != -1 else INT64_MAX for _, i in ints]),
                               ctx.ints([dd for dd, _ in ints])])
        y = ctx.emit("Squeeze", [y, ctx.ints(int_axes)])
    if new_axes:
        y = ctx.emit("Unsqueeze", [y, ctx.ints(new_axes)])
    return y


@register_emitter("mean", "sum")
def _reduce(ctx: EmitContext, node: Node) -> str:
    x = node.inputs[0]
    rank = ctx.rank(x)
    dim = node.attrs.get("dim")
    keep = int(bool(node.attrs.get("keepdim", False)))
    axes = None if dim is None else sorted(_axis(int(d), rank) for d in (dim if isinstance(dim, (tuple, list)) else [dim]))
    op = "ReduceMean" if node.op == "mean" else "ReduceSum"
    xv = ctx.value(x, dtype=_out_dtype(node))
    if op == "ReduceMean" and ctx.opset < 18:
        return ctx.emit(op, [xv], axes=axes, keepdims=keep)
    return ctx.emit(op, [xv] + ([ctx.ints(axes)] if axes is not None else []), keepdims=keep)


# --- attention, resize --------------------------------------------------------------------------------

@register_emitter("scaled_dot_product_attention")
def _sdpa(ctx: EmitContext, node: Node) -> str:
    """softmax(q k^T * scale + mask) v, decomposed into MatMul, Mul, Add, Softmax, MatMul."""
    q, k, v, mask = node.inputs[:4]
    a = node.attrs
    if float(a.get("dropout_p") or 0.0) > 0.0:
        raise _err(node, "scaled_dot_product_attention with dropout_p > 0 is random; pass "
                         "dropout_p=self.p if self.training else 0.0")
    dt = _out_dtype(node)
    qs, ks = ctx.meta(q).shape, ctx.meta(k).shape
    rk = len(ks)
    perm = list(range(rk))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    kt = ctx.emit("Transpose", [ctx.value(k)], perm=perm)
    scores = ctx.emit("MatMul", [ctx.value(q), kt])
    scale = a.get("scale")
    scale = 1.0 / math.sqrt(qs[-1]) if scale is None else float(scale)
    if scale != 1.0:
        scores = ctx.emit("Mul", [scores, ctx.const(scale, dt)])
    L, S = qs[-2], ks[-2]
    if a.get("is_causal"):
        if ctx.dynamic_dims(q)[-2] or ctx.dynamic_dims(k)[-2]:
            raise _err(node, "is_causal with a batch-dependent sequence length")
        causal = np.triu(np.full((L, S), -np.inf, dtype=np.float32), k=1)
        scores = ctx.emit("Add", [scores, ctx.const(causal, dt, name="causal_mask")])
    if mask is not None:
        mmeta = ctx.meta(mask)
        if mmeta.dtype == torch.bool:
            if isinstance(mask, Param):
                m = ctx.param_tensor(mask)
                add = torch.zeros(m.shape, dtype=dt).masked_fill(~m, float("-inf"))
                mv = ctx.const(to_numpy(add), dt, name="attn_mask")
            else:
                mv = ctx.emit("Where", [ctx.value(mask), ctx.const(0.0, dt), ctx.const(-np.inf, dt)])
        else:
            mv = ctx.value(mask, dtype=dt)
        scores = ctx.emit("Add", [scores, mv])
    probs = ctx.emit("Softmax", [scores], axis=-1)
    return ctx.emit("MatMul", [probs, ctx.value(v)])


@register_emitter("interpolate")
def _interpolate(ctx: EmitContext, node: Node) -> str:
    x = node.inputs[0]
    a = node.attrs
    mode = a.get("mode", "nearest")
    if a.get("antialias"):
        raise _err(node, "interpolate with antialias=True")
    rank = ctx.rank(x)
    in_sp = ctx.meta(x).shape[2:]
    out_sp = node.tensor_meta.shape[2:]
    kw: dict[str, Any] = {}
    if mode == "nearest":
        kw = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    elif mode in ("linear", "bilinear", "trilinear"):
        kw = dict(mode="linear",
                  coordinate_transformation_mode="align_corners" if a.get("align_corners") else "pytorch_half_pixel")
    elif mode == "bicubic":
        kw = dict(mode="cubic", cubic_coeff_a=-0.75,
                  coordinate_transformation_mode="align_corners" if a.get("align_corners") else "pytorch_half_pixel")
    else:
        raise _err(node, f"interpolate mode {mode!r} (supported: nearest, linear, bilinear, trilinear, bicubic)")
    sf = a.get("scale_factor")
    xv = ctx.value(x)
    if sf is not None and not a.get("recompute_scale_factor"):
        sfs = _pairs(sf, rank - 2) if not isinstance(sf, float) else [sf] * (rank - 2)
        scales = ctx.const([1.0, 1.0] + [float(s) for s in sfs], np.float32)
        return ctx.emit("Resize", [xv, "", scales], **kw)
    dyn = ctx.dynamic_dims(node)
    lead = [ctx.dim(x, 0) if dyn[0] else node.tensor_meta.shape[0], node.tensor_meta.shape[1]]
    sizes = ctx.sym_tensor(lead + list(out_sp))
    del in_sp
    return ctx.emit("Resize", [xv, "", "", sizes], **kw)


# --- quantization ----------------------------------------------------------------------------------------

def _qparam(ctx: EmitContext, v: Any, dtype: torch.dtype, per_tensor: bool) -> str:
    """A scale or zero point operand as an initializer of `dtype` (0-D when per-tensor)."""
    if isinstance(v, Param):
        t = ctx.param_tensor(v)
        if per_tensor and t.numel() == 1 and t.dim() > 0:
            return ctx.param(v, key="scalar", transform=lambda t: t.reshape(()), dtype=dtype)
        return ctx.param(v, dtype=dtype if t.dtype != dtype else None)
    if isinstance(v, Node):
        return ctx.value(v, dtype=dtype)
    if isinstance(v, torch.Tensor):
        v = v.reshape(()) if per_tensor and v.numel() == 1 else v
        return ctx.const(to_numpy(v.to(dtype)), dtype)
    return ctx.const(v, dtype)


def _qtensor(ctx: EmitContext, v: Any) -> Any:
    if isinstance(v, Param):
        return ctx.param_tensor(v)
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, (int, float)):
        return torch.tensor(v)
    return None


@register_emitter("quantize")
def _quantize(ctx: EmitContext, node: Node) -> str:
    x, scale, zp = node.inputs
    dtype = node.attrs.get("dtype", torch.int8)
    axis = node.attrs.get("axis")
    if isinstance(x, Param) and all(_qtensor(ctx, p) is not None for p in (scale, zp)):
        # A constant (a weight or a bias): store the integers themselves as the initializer.
        from slimfx.ir.ops import get_op

        q = get_op("quantize").impl(ctx.param_tensor(x), _qtensor(ctx, scale), _qtensor(ctx, zp),
                                    dtype=dtype, axis=axis)
        return ctx.const(to_numpy(q), dtype, name=f"{x.name}.quantized")
    if dtype not in (torch.int8, torch.uint8):
        raise _err(node, f"QuantizeLinear to {dtype} of a run-time tensor (ONNX quantizes activations to "
                         "int8/uint8; int32 is only for constants such as biases)")
    per_tensor = axis is None
    rank = ctx.rank(x)
    return ctx.emit("QuantizeLinear", [ctx.value(x), _qparam(ctx, scale, torch.float32, per_tensor),
                                       _qparam(ctx, zp, dtype, per_tensor)],
                    axis=None if axis is None else _axis(int(axis), rank))


@register_emitter("dequantize")
def _dequantize(ctx: EmitContext, node: Node) -> str:
    q, scale, zp = node.inputs
    axis = node.attrs.get("axis")
    qdt = ctx.meta(q).dtype
    per_tensor = axis is None
    rank = ctx.rank(q)
    # int8/uint8 zero points stay explicit even when 0: onnxruntime's QDQ fusion (QGemm, NhwcMaxPool)
    # needs them. An int32 (bias) zero point of 0 is left out: it is the default, and fusion ignores it.
    zero = _qtensor(ctx, zp)
    omit = qdt == torch.int32 and zero is not None and not bool(torch.as_tensor(zero).any())
    values = _compact_int32(ctx, q) if qdt == torch.int32 else ctx.value(q)
    scale_name = (_bias_scale_product(ctx, node) if qdt == torch.int32 else None) \
        or _qparam(ctx, scale, torch.float32, per_tensor)
    return ctx.emit("DequantizeLinear", [values, scale_name] + ([] if omit else [_qparam(ctx, zp, qdt, per_tensor)]),
                    axis=None if axis is None else _axis(int(axis), rank))


# An int32 bias is stored compactly: with int8 weights, biases and their scales become a large part of a
# small model's file. Both forms below are constant subgraphs that onnxruntime folds
# when it loads the model, before its QDQ fusion, so QLinearConv/QGemm fusion and results are unchanged.
# Each is used only where the bytes it saves exceed the bytes of the node it adds (not for a few channels).

def _node_bytes(op_type: str, inputs: list[str], outputs: list[str], **attrs: Any) -> int:
    return helper.make_node(op_type, inputs, outputs, **attrs).ByteSize()


def _compact_int32(ctx: EmitContext, q: Any) -> str:
    """An int32 constant whose values fit in int16, stored as int16 and cast back (half the bytes)."""
    if not isinstance(q, Param):
        return ctx.value(q)
    t = ctx.param_tensor(q)
    cast = {"to": onnx_dtype(torch.int32)}  # the Cast's output takes the stored constant's name
    if t.abs().max() > torch.iinfo(torch.int16).max \
            or 2 * t.numel() <= _node_bytes("Cast", [f"{q.name}.i16"], [q.name], **cast) + len(".i16"):
        return ctx.value(q)
    return ctx.emit("Cast", [ctx.param(q, key="i16", dtype=torch.int16)], name=q.name, **cast)


def _bias_scale_product(ctx: EmitContext, node: Node) -> str | None:
    """A per-channel int32 bias scale as Mul(input scale, weight scale), which is its definition for
    integer kernels, instead of a stored vector; None unless the stored scale is exactly that product."""
    scale = node.inputs[1]
    if not isinstance(scale, Param) or ctx.param_tensor(scale).dim() != 1 or ctx.param_tensor(scale).numel() < 2:
        return None
    for layer in node.users:
        if trait(layer.op, "quant") != "weight" or len(layer.inputs) < 3 or layer.inputs[2] is not node:
            continue
        x, w = layer.inputs[0], layer.inputs[1]
        while isinstance(x, Node) and x.op in ("identity", "dropout") and x.inputs:
            x = x.inputs[0]
        if not (isinstance(x, Node) and x.op == "dequantize" and isinstance(w, Node) and w.op == "dequantize"):
            return None
        s_x, s_w = x.inputs[1], w.inputs[1]
        if not (isinstance(s_x, Param) and isinstance(s_w, Param)) or x.attrs.get("axis") is not None:
            return None
        tx, tw = ctx.param_tensor(s_x), ctx.param_tensor(s_w)
        if tx.numel() != 1 or tw.dtype != torch.float32 or tw.shape != ctx.param_tensor(scale).shape \
                or not torch.equal(tx.float().reshape(()) * tw, ctx.param_tensor(scale)):
            return None
        factors = [_qparam(ctx, s_x, torch.float32, True), _qparam(ctx, s_w, torch.float32, w.attrs.get("axis") is None)]
        stored = numpy_helper.from_array(to_numpy(ctx.param_tensor(scale)), scale.name).ByteSize()
        if stored <= _node_bytes("Mul", factors, [scale.name]):  # the product takes the vector's name
            return None
        return ctx.emit("Mul", factors, name=scale.name)
    return None



@register_emitter("dynamic_quantize")
def _dynamic_quantize(ctx: EmitContext, node: Node) -> list[str]:
    """DynamicQuantizeLinear: (uint8 values, scale, zero point), read with getitem."""
    return ctx.emit("DynamicQuantizeLinear", [ctx.value(node.inputs[0])], outputs=3)


@register_emitter("matmul_nbits")
def _matmul_nbits(ctx: EmitContext, node: Node) -> str:
    """onnxruntime's MatMulNBits (com.microsoft): x @ dequantize(B)^T (+ bias), B's 4/8-bit codes packed
    low bits first into uint8 [N, K blocks, block bytes], one scale (and zero point) per block."""
    x, qweight, scales, zero_points, bias = node.inputs
    a = node.attrs
    ins = [ctx.value(x), ctx.value(qweight), ctx.value(scales),
           ctx.value(zero_points) if zero_points is not None else None]
    if bias is not None:
        ins += [None, ctx.value(bias)]  # g_idx (absent), bias
    return ctx.emit("MatMulNBits", ins, domain="com.microsoft", K=int(a["k"]), N=int(a["n"]), bits=int(a["bits"]),
                    block_size=int(a["block_size"]), accuracy_level=int(a.get("accuracy_level") or 0) or None)
