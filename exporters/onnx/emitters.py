"""One ONNX emitter per canonical IR op.

Each emitter reads its node's operands through the context and returns the ONNX name of its
output (a list of names for tuple-valued ops). Emitters keep the graph lean: static shapes are
constants, aliases (contiguous, identity, dropout) emit nothing, 2-D linear is one Gemm.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from slimfx.exporters.onnx.context import (
    FIXED_BATCH_ADVICE,
    TORCH_TO_NUMPY,
    Dyn,
    EmitContext,
    is_static,
    onnx_dtype,
    register_emitter,
    to_numpy,
)
from slimfx.ir.errors import ExportError
from slimfx.ir.graph import Node, Param
from slimfx.ir.ops import unpack_codes

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

def _nd(op: str) -> int:
    """Spatial dims of an N-d op by its name: conv3d, max_pool1d, adaptive_avg_pool2d -> 3, 1, 2."""
    return int(op[-2])


@register_emitter("conv1d", "conv2d", "conv3d")
def _conv(ctx: EmitContext, node: Node) -> str:
    x, w, b = node.inputs
    k = _nd(node.op)
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
    if isinstance(w, Param) and w.name not in ctx.shared_params:
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
    # back to x's shape: what is reshaped is the grouped (N, G, -1) tensor, so no dim can be copied from it by
    # position (a 0); one dynamic dim is the -1, several (height and width) are x's run-time shape
    if sum(map(bool, ctx.dynamic_dims(node))) > 1:
        back = ctx.emit("Shape", [ctx.value(x)], name="shape")
    else:
        back = _reshape_target(ctx, None, node)
    y = ctx.emit("Reshape", [y, back])
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
          "sqrt": "Sqrt", "exp": "Exp", "log": "Log", "abs": "Abs", "erf": "Erf", "reciprocal": "Reciprocal",
          "sin": "Sin", "cos": "Cos"}


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

_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "minimum": "Min", "maximum": "Max"}


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

@register_emitter("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d")
def _pool(ctx: EmitContext, node: Node) -> str:
    k = _nd(node.op)
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


@register_emitter("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool2d",
                  "adaptive_max_pool3d")
def _adaptive_pool(ctx: EmitContext, node: Node) -> str:
    x = node.inputs[0]
    spatial = ctx.meta(x).shape[2:]
    out = node.tensor_meta.shape[2:]
    is_max = node.op.startswith("adaptive_max")
    if not is_max:
        return _adaptive_avg(ctx, node, x)
    xv = ctx.value(x)
    if tuple(spatial) == tuple(out):
        return xv
    if all(o == 1 for o in out):
        return ctx.emit("GlobalMaxPool", [xv])
    if any(i % o for i, o in zip(spatial, out)):
        raise _err(node, f"adaptive max pooling from {tuple(spatial)} to {tuple(out)}: the input size is not a "
                         "multiple of the output size, so the windows differ in size and no single ONNX "
                         "pooling op matches. Choose an output size that divides the input size.")
    kernel = [i // o for i, o in zip(spatial, out)]
    return ctx.emit("MaxPool", [xv], kernel_shape=kernel, strides=kernel)


def _adaptive_avg(ctx: EmitContext, node: Node, x: Any) -> str:
    """Adaptive average pooling of `x` to the node's spatial size (also interpolate mode 'area'): global or
    plain average pooling when the windows are equal, else one MatMul per resized dim with the matrix of
    window means (window i spans floor(i*in/out) to ceil((i+1)*in/out), as torch computes it)."""
    spatial = tuple(ctx.meta(x).shape[2:])
    out = tuple(node.tensor_meta.shape[2:])
    xv = ctx.value(x)
    if spatial == out:
        return xv
    if all(o == 1 for o in out):
        return ctx.emit("GlobalAveragePool", [xv])
    if not any(i % o for i, o in zip(spatial, out)):
        kernel = [i // o for i, o in zip(spatial, out)]
        return ctx.emit("AveragePool", [xv], kernel_shape=kernel, strides=kernel)
    dt = _out_dtype(node)
    rank = len(spatial) + 2
    y = xv
    for d in reversed(range(len(spatial))):
        n_in, n_out = spatial[d], out[d]
        if n_in == n_out:
            continue
        a = np.zeros((n_out, n_in), dtype=np.float64)
        for i in range(n_out):
            lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
            a[i, lo:hi] = 1.0 / (hi - lo)
        if d == len(spatial) - 1:  # the last dim: x @ A^T
            y = ctx.emit("MatMul", [y, ctx.const(a.T, dt, name=f"{node.name}_avg")])
        else:  # an inner dim: move it last, multiply, move it back
            perm = list(range(rank))
            perm[d + 2], perm[-1] = perm[-1], perm[d + 2]
            y = ctx.emit("Transpose", [y], perm=perm)
            y = ctx.emit("MatMul", [y, ctx.const(a.T, dt, name=f"{node.name}_avg")])
            y = ctx.emit("Transpose", [y], perm=perm)
    return y


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
        raise _err(node, f"several batch-dependent dims in the output shape; {FIXED_BATCH_ADVICE}")
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
    # torch.cat skips 1-D empty tensors (a KV cache's first, empty state: a node or a param), ONNX's Concat refuses
    xs = [x for x in node.inputs if not (isinstance(x, Node) and ctx.meta(x).numel == 0 and ctx.rank(x) == 1
                                         or isinstance(x, Param) and tuple(ctx.param_tensor(x).shape) == (0,))]
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
    sizes: list[Any] = [m.shape[axis] for m in metas]
    if len(sizes) == 1:
        return [ctx.value(x)]
    if ctx.dynamic_dims(x)[axis]:
        sizes = _dynamic_split_sizes(ctx, node, x, axis, len(sizes))
    return ctx.emit("Split", [ctx.value(x), ctx.sym_tensor(sizes)], outputs=len(sizes), axis=axis)


def _dynamic_split_sizes(ctx: EmitContext, node: Node, x: Any, axis: int, k: int) -> list[Any]:
    """Piece sizes of a split/chunk along a symbolic dim (seq, batch): torch's rule at run time. chunk:
    pieces of ceil(n / chunks), the last one the rest; split by an int: pieces of that size, the last the
    rest."""
    n = ctx.dim(x, axis)
    if node.op == "chunk":
        chunks = int(node.attrs["chunks"])
        piece = Dyn(ctx.emit("Div", [ctx.emit("Add", [n.name, ctx.ints([chunks - 1])]), ctx.ints([chunks])]))
    elif isinstance(node.attrs.get("split_size"), int):
        piece = int(node.attrs["split_size"])
    else:
        raise _err(node, "split into a list of sizes along a dim whose size is symbolic (batch, seq, ...); "
                         "split along a fixed dim, or keep that dim fixed (`--dynamic-dims` on the command line, "
                         "dynamic_dims= in Python)")
    before = ctx.emit("Mul", [ctx.sym_tensor(piece), ctx.ints([k - 1])]) if isinstance(piece, Dyn) else \
        ctx.ints([piece * (k - 1)])
    last = Dyn(ctx.emit("Sub", [n.name, before]))
    return [piece] * (k - 1) + [last]


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


_REDUCE = {"mean": "ReduceMean", "sum": "ReduceSum", "amax": "ReduceMax", "amin": "ReduceMin"}


def reduce_over(ctx: EmitContext, op: str, xv: str, axes: list[int] | None, keepdims: int = 1) -> str:
    """A Reduce* node over `axes` (None: all): axes as an input from opset 18 (ReduceSum from 13), before that
    as an attribute."""
    if op != "ReduceSum" and ctx.opset < 18:
        return ctx.emit(op, [xv], axes=axes, keepdims=keepdims)
    return ctx.emit(op, [xv] + ([ctx.ints(axes)] if axes is not None else []), keepdims=keepdims)


@register_emitter(*_REDUCE)
def _reduce(ctx: EmitContext, node: Node) -> str:
    x = node.inputs[0]
    rank = ctx.rank(x)
    dim = node.attrs.get("dim")
    keep = int(bool(node.attrs.get("keepdim", False)))
    axes = None if dim is None else sorted(_axis(int(d), rank) for d in (dim if isinstance(dim, (tuple, list)) else [dim]))
    return reduce_over(ctx, _REDUCE[node.op], ctx.value(x, dtype=_out_dtype(node)), axes, keep)


# --- attention, resize --------------------------------------------------------------------------------

@register_emitter("scaled_dot_product_attention")
def _sdpa(ctx: EmitContext, node: Node) -> str:
    """softmax(q k^T * scale + mask) v, decomposed into MatMul, Mul, Add, Softmax, MatMul; a query whose keys
    are all masked attends to nothing (zeros), as in torch."""
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
        if ctx.dynamic_dims(q)[-2] or ctx.dynamic_dims(k)[-2]:  # a symbolic length: the mask made at run time
            shape = ctx.sym_tensor([ctx.dim(q, -2), ctx.dim(k, -2)])
            fill = helper.make_tensor("value", onnx_dtype(dt), [1], [float("-inf")])
            full = ctx.emit("ConstantOfShape", [shape], value=fill)
            causal_v = ctx.emit("Trilu", [full, ctx.const(1, torch.int64)], upper=1)
        else:
            causal_v = ctx.const(np.triu(np.full((L, S), -np.inf, dtype=np.float32), k=1), dt, name="causal_mask")
        scores = ctx.emit("Add", [scores, causal_v])
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
    if mask is not None or a.get("is_causal"):  # a row masked everywhere: torch gives 0, Softmax NaN
        probs = ctx.emit("Where", [ctx.emit("IsNaN", [probs]), ctx.const(0.0, dt), probs])
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
    if mode == "area":  # torch computes it as adaptive average pooling to the output size
        return _adaptive_avg(ctx, node, x)
    if mode == "nearest":
        kw = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    elif mode == "nearest-exact":  # source index floor((i + 0.5) * in / out)
        kw = dict(mode="nearest", coordinate_transformation_mode="half_pixel", nearest_mode="round_prefer_ceil")
    elif mode in ("linear", "bilinear", "trilinear"):
        kw = dict(mode="linear",
                  coordinate_transformation_mode="align_corners" if a.get("align_corners") else "pytorch_half_pixel")
    elif mode == "bicubic":
        kw = dict(mode="cubic", cubic_coeff_a=-0.75,
                  coordinate_transformation_mode="align_corners" if a.get("align_corners") else "pytorch_half_pixel")
    else:
        raise _err(node, f"interpolate mode {mode!r} (supported: nearest, nearest-exact, linear, bilinear, "
                         "trilinear, bicubic, area)")
    sf = a.get("scale_factor")
    xv = ctx.value(x)
    if sf is not None and not a.get("recompute_scale_factor"):
        sfs = _pairs(sf, rank - 2) if not isinstance(sf, float) else [sf] * (rank - 2)
        scales = ctx.const([1.0, 1.0] + [float(s) for s in sfs], np.float32)
        return ctx.emit("Resize", [xv, "", scales], **kw)
    dyn = ctx.dynamic_dims(node)
    lead = [ctx.dim(x, 0) if dyn[0] else node.tensor_meta.shape[0], node.tensor_meta.shape[1]]
    spatial: list[Any] = list(out_sp)
    if any(dyn[2:]):  # an output size that follows a symbolic dim (height, width): from the IR's size entries
        size = a.get("size")
        if size is None:
            raise _err(node, "interpolate by a recomputed scale factor along a symbolic dim (height, width); "
                             "give size= or scale_factor= without recompute_scale_factor")
        given = ctx.sym(size)
        given = list(given) if isinstance(given, (tuple, list)) else [given] * (rank - 2)
        spatial = [g if d else o for g, d, o in zip(given, dyn[2:], out_sp)]
    sizes = ctx.sym_tensor(lead + spatial)
    del in_sp
    return ctx.emit("Resize", [xv, "", "", sizes], **kw)


# --- transposed convolution, einsum, norms -------------------------------------------------------------

@register_emitter("conv_transpose1d", "conv_transpose2d")
def _conv_transpose(ctx: EmitContext, node: Node) -> str:
    """ConvTranspose: same weight layout as torch ([in, out/groups, k...]); pads as torch's padding."""
    x, w, b = node.inputs
    k = 1 if node.op == "conv_transpose1d" else 2
    a = node.attrs
    kernel = list(ctx.meta(w).shape[2:])
    stride, dilation = _pairs(a.get("stride", 1), k), _pairs(a.get("dilation", 1), k)
    pad, out_pad = _pairs(a.get("padding", 0), k), _pairs(a.get("output_padding", 0), k)
    group = int(a.get("groups", 1))
    attrs = dict(kernel_shape=kernel, strides=None if set(stride) == {1} else stride,
                 dilations=None if set(dilation) == {1} else dilation, group=None if group == 1 else group)
    xv, wv = ctx.value(x), ctx.value(w)
    if all(o < st for o, st in zip(out_pad, stride)):
        ins = [xv, wv] + ([ctx.value(b)] if b is not None else [])
        return ctx.emit("ConvTranspose", ins, pads=pad + pad if any(pad) else None,
                        output_padding=out_pad if any(out_pad) else None, **attrs)
    # torch also allows output_padding < dilation, onnxruntime only < stride: crop less at the end instead
    # (pads end = padding - output_padding), and where that is negative, pad with zeros (+ the bias)
    end = [p - o for p, o in zip(pad, out_pad)]
    extra = [max(0, -e) for e in end]
    ins = [xv, wv] + ([ctx.value(b)] if b is not None and not any(extra) else [])
    y = ctx.emit("ConvTranspose", ins, pads=pad + [max(0, e) for e in end], **attrs)
    if any(extra):
        y = ctx.emit("Pad", [y, ctx.ints([0] * (2 + k) + [0, 0] + extra)])
        if b is not None:
            y = ctx.emit("Add", [y, ctx.param(b, key="bc", transform=lambda t: t.reshape([-1] + [1] * k))])
    return y


@register_emitter("einsum")
def _einsum(ctx: EmitContext, node: Node) -> str:
    dt = _out_dtype(node)
    return ctx.emit("Einsum", [ctx.value(v, dtype=dt) for v in node.inputs],
                    equation=str(node.attrs["equation"]).replace(" ", ""))


@register_emitter("rms_norm")
def _rms_norm(ctx: EmitContext, node: Node) -> str:
    """x / sqrt(mean(x^2) + eps) * weight over the last len(normalized_shape) dims (RMSNormalization from
    opset 23)."""
    x, w = node.inputs[:2]
    dt = _out_dtype(node)
    k = len(node.attrs["normalized_shape"])
    eps = node.attrs.get("eps")
    eps = float(torch.finfo(dt).eps if eps is None else eps)
    xv = ctx.value(x)
    if ctx.opset >= 23:
        scale = ctx.value(w) if w is not None else ctx.const(np.ones(node.attrs["normalized_shape"]), dt)
        return ctx.emit("RMSNormalization", [xv, scale], axis=-k, epsilon=eps)
    rank = ctx.rank(x)
    ms = reduce_over(ctx, "ReduceMean", ctx.emit("Mul", [xv, xv]), list(range(rank - k, rank)))
    y = ctx.emit("Div", [xv, ctx.emit("Sqrt", [ctx.emit("Add", [ms, ctx.const(eps, dt)])])])
    return ctx.emit("Mul", [y, ctx.value(w)]) if w is not None else y


@register_emitter("instance_norm")
def _instance_norm(ctx: EmitContext, node: Node) -> str:
    """InstanceNormalization with the input's statistics; BatchNormalization with tracked running ones."""
    x, mean, var, w, b = node.inputs[:5]
    a = node.attrs
    training = a.get("training")
    if training is None:
        training = ctx.graph.training
    use_input_stats = a.get("use_input_stats")
    if use_input_stats is None:
        use_input_stats = bool(training) or mean is None
    if use_input_stats and training and mean is not None:
        raise _err(node, "instance_norm in training mode updates its running statistics, which an inference "
                         "export cannot do. Put the model in eval mode before capture.")
    c = ctx.meta(x).shape[1]
    dt = _out_dtype(node)
    scale = ctx.value(w) if w is not None else ctx.const(np.ones(c), dt)
    bias = ctx.value(b) if b is not None else ctx.const(np.zeros(c), dt)
    eps = float(a.get("eps", 1e-5))
    if not use_input_stats:
        return ctx.emit("BatchNormalization", [ctx.value(x), scale, bias, ctx.value(mean), ctx.value(var)],
                        epsilon=eps)
    return ctx.emit("InstanceNormalization", [ctx.value(x), scale, bias], epsilon=eps)


# --- data movement: pixel (un)shuffle, indexing ----------------------------------------------------------

@register_emitter("pixel_shuffle", "pixel_unshuffle")
def _pixel_shuffle(ctx: EmitContext, node: Node) -> str:
    """pixel_shuffle is DepthToSpace in CRD mode; pixel_unshuffle (channel c*r*r + i*r + j) is not
    SpaceToDepth's order ((i*r + j)*C + c), so it is a Reshape, Transpose, Reshape at fixed height and width,
    and SpaceToDepth then a Gather of torch's channel order where they are dynamic (the Reshapes would need them)."""
    x = node.inputs[0]
    shape = ctx.meta(x).shape
    if len(shape) != 4:
        raise _err(node, f"{node.op} of a rank-{len(shape)} tensor (ONNX has it for [N, C, H, W] only); "
                         "reshape to 4 dims around it")
    xv = ctx.value(x)
    if node.op == "pixel_shuffle":
        return ctx.emit("DepthToSpace", [xv], blocksize=int(node.attrs["upscale_factor"]), mode="CRD")
    r = int(node.attrs["downscale_factor"])
    _, c, h, w = shape
    if any(ctx.dynamic_dims(x)[2:]):
        y = ctx.emit("SpaceToDepth", [xv], blocksize=r)
        order = [(k % (r * r)) * c + k // (r * r) for k in range(c * r * r)]  # torch's channel k = ch*r*r + i*r + j
        return ctx.emit("Gather", [y, ctx.ints(order)], axis=1)
    y = ctx.emit("Reshape", [xv, ctx.ints([0, c, h // r, r, w // r, r])])
    y = ctx.emit("Transpose", [y], perm=[0, 1, 3, 5, 2, 4])
    return ctx.emit("Reshape", [y, ctx.ints([0, c * r * r, h // r, w // r])])


@register_emitter("index_select")
def _index_select(ctx: EmitContext, node: Node) -> str:
    x, index = node.inputs[:2]
    idx = ctx.value(index, dtype=torch.int64)
    if ctx.rank(index) == 0:  # a 0-d index keeps the dim (size 1); Gather's would drop it
        idx = ctx.emit("Unsqueeze", [idx, ctx.ints([0])])
    return ctx.emit("Gather", [ctx.value(x), idx], axis=_axis(int(node.attrs["dim"]), ctx.rank(x)))


@register_emitter("gather")
def _gather_elements(ctx: EmitContext, node: Node) -> str:
    x, index = node.inputs[:2]
    return ctx.emit("GatherElements", [ctx.value(x), ctx.value(index, dtype=torch.int64)],
                    axis=_axis(int(node.attrs["dim"]), ctx.rank(x)))


# --- masks: comparisons, logic, where ------------------------------------------------------------------

def _probe(ctx: EmitContext, v: Any) -> Any:
    """A stand-in for an operand in torch's type promotion (a 0-d tensor promotes differently)."""
    if isinstance(v, (Node, Param)):
        m = ctx.meta(v)
        return torch.empty((1,) * len(m.shape) if m.shape else (), dtype=m.dtype)
    return v


_COMPARE = {"eq": "Equal", "ne": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual"}
# dtypes onnxruntime compares natively; others are compared exactly in float32 (8/16-bit ints, float16, bool)
_COMPARE_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64)


@register_emitter(*_COMPARE)
def _compare(ctx: EmitContext, node: Node) -> str:
    a, b = node.inputs[:2]
    dt = torch.result_type(_probe(ctx, a), _probe(ctx, b))
    if dt not in _COMPARE_DTYPES and not (dt == torch.bool and node.op in ("eq", "ne")):
        dt = torch.float32
    out = ctx.emit(_COMPARE[node.op], [ctx.value(a, dtype=dt), ctx.value(b, dtype=dt)])
    return ctx.emit("Not", [out]) if node.op == "ne" else out


_LOGICAL = {"logical_and": "And", "logical_or": "Or", "logical_xor": "Xor"}
_BITWISE = {"bitwise_and": "And", "bitwise_or": "Or", "bitwise_xor": "Xor", "bitwise_not": "Not"}


@register_emitter(*_LOGICAL)
def _logical(ctx: EmitContext, node: Node) -> str:
    a, b = node.inputs[:2]
    return ctx.emit(_LOGICAL[node.op], [ctx.value(a, dtype=torch.bool), ctx.value(b, dtype=torch.bool)])


@register_emitter("logical_not")
def _logical_not(ctx: EmitContext, node: Node) -> str:
    return ctx.emit("Not", [ctx.value(node.inputs[0], dtype=torch.bool)])


@register_emitter(*_BITWISE)
def _bitwise(ctx: EmitContext, node: Node) -> str:
    """And/Or/Xor/Not on bool masks; BitwiseAnd/... (opset 18) on integers."""
    dt = _out_dtype(node)
    ins = [ctx.value(v, dtype=dt) for v in node.inputs[:1 if node.op == "bitwise_not" else 2]]
    if dt == torch.bool:
        return ctx.emit(_BITWISE[node.op], ins)
    if ctx.opset < 18:
        raise _err(node, f"{node.op} of {dt} tensors needs ONNX opset 18 (Bitwise{_BITWISE[node.op]}): export "
                         "with `slimfx export --opset 18`, `opset = 18` under [export] in a recipe, or "
                         "export_onnx(..., opset=18) in Python")
    return ctx.emit("Bitwise" + _BITWISE[node.op], ins)


@register_emitter("where")
def _where(ctx: EmitContext, node: Node) -> str:
    cond, a, b = node.inputs[:3]
    dt = _out_dtype(node)
    return ctx.emit("Where", [ctx.value(cond, dtype=torch.bool), ctx.value(a, dtype=dt), ctx.value(b, dtype=dt)])


# --- pad, roll ----------------------------------------------------------------------------------------------

_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


@register_emitter("pad")
def _pad(ctx: EmitContext, node: Node) -> str:
    """torch's pad list runs from the last dim, (begin, end) pairs; ONNX Pad takes every dim's begins, then
    every dim's ends. Negative amounts crop, in both."""
    x = node.inputs[0]
    a = node.attrs
    rank = ctx.rank(x)
    pad = [int(p) for p in a["pad"]]
    mode = a.get("mode", "constant")
    if mode not in _PAD_MODES or len(pad) % 2 or len(pad) // 2 > rank:
        raise _err(node, f"pad mode {mode!r} with {len(pad)} amounts on a rank-{rank} tensor has no ONNX Pad form "
                         f"(modes: {', '.join(_PAD_MODES)}); pad with mode='constant' in the model")
    if mode == "circular" and ctx.opset < 19:
        raise _err(node, "pad mode 'circular' needs ONNX opset 19 (Pad's wrap mode): export with `slimfx export "
                         "--opset 19`, `opset = 19` under [export] in a recipe, or export_onnx(..., opset=19)")
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):
        begins[rank - 1 - i], ends[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    ins = [ctx.value(x), ctx.ints(begins + ends)]
    if mode == "constant" and a.get("value"):
        ins.append(ctx.const(float(a["value"]), _out_dtype(node)))
    return ctx.emit("Pad", ins, mode=_PAD_MODES[mode])


@register_emitter("roll")
def _roll(ctx: EmitContext, node: Node) -> str:
    """Each rolled dim is two Slices put back together in the other order (ONNX has no Roll)."""
    x = node.inputs[0]
    shape = ctx.meta(x).shape
    y = xv = ctx.value(x)
    for shift, dim in zip(node.attrs["shifts"], node.attrs["dims"]):
        axis = _axis(int(dim), len(shape))
        size = shape[axis]
        if not isinstance(size, int):
            raise _err(node, f"roll along dim {dim}, whose size is not fixed at export; roll along a fixed dim")
        s = int(shift) % size if size else 0
        if s == 0:
            continue
        tail = ctx.emit("Slice", [y, ctx.ints([size - s]), ctx.ints([size]), ctx.ints([axis])])
        head = ctx.emit("Slice", [y, ctx.ints([0]), ctx.ints([size - s]), ctx.ints([axis])])
        y = ctx.emit("Concat", [tail, head], axis=axis)
    return y if y != xv else ctx.emit("Identity", [y])


# --- cumsum, topk, argmax ---------------------------------------------------------------------------------

@register_emitter("cumsum")
def _cumsum(ctx: EmitContext, node: Node) -> str:
    x = node.inputs[0]
    dt = _out_dtype(node)
    work = dt if dt in (torch.float32, torch.float64, torch.int32, torch.int64) else torch.float32
    y = ctx.emit("CumSum", [ctx.value(x, dtype=work), ctx.const(_axis(int(node.attrs["dim"]), ctx.rank(x)), np.int64)])
    return y if work == dt else ctx.cast(y, dt)


@register_emitter("unbind")
def _unbind(ctx: EmitContext, node: Node) -> list[str]:
    """Split into pieces of 1 along the dim, each squeezed."""
    x = node.inputs[0]
    axis = _axis(int(node.attrs.get("dim", 0)), ctx.rank(x))
    if ctx.dynamic_dims(x)[axis]:
        raise _err(node, f"unbind along dim {node.attrs.get('dim', 0)}, whose size is symbolic (batch, seq, ...): "
                         "the number of results would change with it; unbind along a fixed dim")
    k = len(node.meta)
    parts = [ctx.value(x)] if k == 1 else ctx.emit("Split", [ctx.value(x), ctx.ints([1] * k)], outputs=k, axis=axis)
    axes = ctx.ints([axis])
    return [ctx.emit("Squeeze", [p, axes]) for p in parts]


@register_emitter("addcmul")
def _addcmul(ctx: EmitContext, node: Node) -> str:
    x, t1, t2 = node.inputs[:3]
    dt = _out_dtype(node)
    prod = ctx.emit("Mul", [ctx.value(t1, dtype=dt), ctx.value(t2, dtype=dt)])
    value = node.attrs.get("value", 1)
    if value != 1:
        prod = ctx.emit("Mul", [prod, ctx.const(value, dt)])
    return ctx.emit("Add", [ctx.value(x, dtype=dt), prod])


def filled(ctx: EmitContext, node: Node, size: Any, value: Any) -> str:
    """A tensor of one value: a constant when its size is fixed, else ConstantOfShape of the run-time size."""
    dtype = _out_dtype(node)
    shape = ctx.sym(list(size))
    if is_static(shape):
        return ctx.const(np.full(shape, value), dtype, name=node.name)
    fill = numpy_helper.from_array(np.asarray([value], dtype=TORCH_TO_NUMPY[dtype]), "value")
    return ctx.emit("ConstantOfShape", [ctx.sym_tensor(shape)], value=fill)


@register_emitter("full")
def _full(ctx: EmitContext, node: Node) -> str:
    if isinstance(node.attrs["value"], (Node, Param)):
        raise _err(node, "full() with a fill value computed at run time")
    return filled(ctx, node, node.attrs["size"], node.attrs["value"])


@register_emitter("full_like")
def _full_like(ctx: EmitContext, node: Node) -> str:
    """ConstantOfShape of the input's run-time shape (a dim that looks fixed may follow the batch: batch * heads)."""
    x = node.inputs[0]
    fill = numpy_helper.from_array(np.asarray([node.attrs["value"]], dtype=TORCH_TO_NUMPY[_out_dtype(node)]), "value")
    return ctx.emit("ConstantOfShape", [ctx.emit("Shape", [ctx.value(x)], name="shape")], value=fill)


@register_emitter("topk")
def _topk(ctx: EmitContext, node: Node) -> list[str]:
    x = node.inputs[0]
    a = node.attrs
    if not a.get("sorted", True):
        raise _err(node, "topk with sorted=False returns its k values in an order torch leaves unspecified "
                         "(onnxruntime orders them otherwise), so the export cannot be checked against the model; "
                         "pass sorted=True")
    dt = ctx.meta(x).dtype
    work = dt if dt in (torch.float32, torch.float64, torch.int32, torch.int64) else torch.float32
    values, indices = ctx.emit("TopK", [ctx.value(x, dtype=work), ctx.ints([int(a["k"])])], outputs=2,
                               axis=_axis(int(a.get("dim", -1)), ctx.rank(x)),
                               largest=int(bool(a.get("largest", True))), sorted=1)
    return [values if work == dt else ctx.cast(values, dt), indices]


@register_emitter("max_dim", "min_dim")
def _min_max_dim(ctx: EmitContext, node: Node) -> list[str]:
    """(values, indices) along `dim`: ReduceMax/ReduceMin and ArgMax/ArgMin (the first extreme index, as torch)."""
    x = node.inputs[0]
    axis = _axis(int(node.attrs["dim"]), ctx.rank(x))
    keep = int(bool(node.attrs.get("keepdim", False)))
    big = node.op == "max_dim"
    xv = ctx.value(x)
    values = reduce_over(ctx, "ReduceMax" if big else "ReduceMin", xv, [axis], keep)
    indices = ctx.emit("ArgMax" if big else "ArgMin", [xv], name=f"{node.name}_indices", axis=axis, keepdims=keep)
    return [values, indices]


@register_emitter("argmax", "argmin")
def _arg_reduce(ctx: EmitContext, node: Node) -> str:
    """ArgMax/ArgMin pick the first extreme index, as torch does; dim None flattens first."""
    x = node.inputs[0]
    dt = ctx.meta(x).dtype
    xv = ctx.value(x, dtype=dt if dt in (torch.float32, torch.float64, torch.int32) else torch.float32)
    dim, keep = node.attrs.get("dim"), int(bool(node.attrs.get("keepdim", False)))
    op = "ArgMax" if node.op == "argmax" else "ArgMin"
    if dim is None:
        y = ctx.emit(op, [ctx.emit("Reshape", [xv, ctx.ints([-1])])], axis=0, keepdims=0)
        return ctx.emit("Reshape", [y, ctx.ints(list(node.tensor_meta.shape))]) if node.tensor_meta.shape else y
    return ctx.emit(op, [xv], axis=_axis(int(dim), ctx.rank(x)), keepdims=keep)


# --- recurrent layers ---------------------------------------------------------------------------------------

# torch's gate blocks (rows of w_ih, w_hh, b_ih, b_hh) in ONNX's order: LSTM i,f,g,o -> i,o,f,c; GRU r,z,n -> z,r,h
_GATE_ORDER = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2)}


def _rnn_weights(ctx: EmitContext, node: Node, layer: int, dirs: int) -> tuple[str, str, str | None]:
    """ONNX W [dirs, G*h, in], R [dirs, G*h, h] and B [dirs, 2*G*h] of one layer, gates in ONNX's order."""
    a = node.attrs
    weights = node.inputs[2:]
    per = len(weights) // (a.get("num_layers", 1) * dirs)
    h = int(a["hidden_size"])
    order = _GATE_ORDER[node.op]

    def tensor(v: Any) -> torch.Tensor:
        if not isinstance(v, Param):
            raise _err(node, "a recurrent layer whose weights are computed (not params of the model)")
        t = ctx.param_tensor(v).detach()
        if not t.is_floating_point():
            raise _err(node, f"a recurrent layer with {t.dtype} weights (recurrent layers export in float)")
        return torch.cat([t[g * h:(g + 1) * h] for g in order])

    ws, rs, bs = [], [], []
    for d in range(dirs):
        base = (layer * dirs + d) * per
        ws.append(tensor(weights[base]))
        rs.append(tensor(weights[base + 1]))
        if a.get("bias", True):
            bs.append(torch.cat([tensor(weights[base + 2]), tensor(weights[base + 3])]))
    dt = _out_dtype_of(node)
    name = f"{node.name}_l{layer}"
    w = ctx.const(to_numpy(torch.stack(ws)), dt, name=f"{name}_W")
    r = ctx.const(to_numpy(torch.stack(rs)), dt, name=f"{name}_R")
    b = ctx.const(to_numpy(torch.stack(bs)), dt, name=f"{name}_B") if bs else None
    return w, r, b


def _out_dtype_of(node: Node) -> torch.dtype:
    return node.meta[0].dtype


def _state(ctx: EmitContext, hx: Any, i: int) -> str | None:
    """Initial state i (h_0: 0, c_0: 1) of an LSTM's hx (None | (h_0, c_0) | a node holding the pair), or
    the GRU's h_0 (i = 0)."""
    if hx is None:
        return None
    if isinstance(hx, (tuple, list)):
        return ctx.value(hx[i])
    names = ctx._env.get(hx) if isinstance(hx, Node) else None
    if isinstance(names, list):
        return names[i]
    return ctx.value(hx)


@register_emitter("lstm", "gru")
def _rnn(ctx: EmitContext, node: Node) -> list[str]:
    """One ONNX LSTM/GRU per layer (ONNX's are single-layer), sequence-major, states sliced per layer.
    PyTorch's GRU applies the reset gate after the recurrent matmul: linear_before_reset=1."""
    a = node.attrs
    training = a.get("training")
    if (ctx.graph.training if training is None else training) and float(a.get("dropout", 0.0)) > 0:
        raise _err(node, "a recurrent layer with dropout in training mode is random; put the model in eval mode")
    if a.get("proj_size", 0):
        raise _err(node, "nn.LSTM with proj_size > 0: ONNX's LSTM has no output projection. Export TorchScript "
                         "instead (`--format torchscript` on the command line, formats=(\"torchscript\",) in "
                         "slimfx.compile), or use an LSTM without proj_size")
    x, hx = node.inputs[:2]
    dirs = 2 if a.get("bidirectional") else 1
    layers, h = int(a.get("num_layers", 1)), int(a["hidden_size"])
    batch_first = bool(a.get("batch_first"))
    dt = _out_dtype_of(node)
    y = ctx.value(x, dtype=dt)
    if batch_first:
        y = ctx.emit("Transpose", [y], perm=[1, 0, 2])
    hs, cs = [], []
    onnx_op = "LSTM" if node.op == "lstm" else "GRU"
    for layer in range(layers):
        w, r, b = _rnn_weights(ctx, node, layer, dirs)
        states = []
        for i in range(2 if node.op == "lstm" else 1):
            s = _state(ctx, hx, i)
            if s is not None and layers > 1:
                s = ctx.emit("Slice", [s, ctx.ints([layer * dirs]), ctx.ints([(layer + 1) * dirs]), ctx.ints([0])])
            states.append(s)
        ins = [y, w, r, b, None] + states
        while ins and ins[-1] is None:
            ins.pop()
        outs = ctx.emit(onnx_op, ins, outputs=3 if node.op == "lstm" else 2, hidden_size=h,
                        direction="bidirectional" if dirs == 2 else None,
                        linear_before_reset=1 if node.op == "gru" else None)
        y_all = outs[0]  # [seq, dirs, batch, h]
        hs.append(outs[1])
        if node.op == "lstm":
            cs.append(outs[2])
        if dirs == 1:
            y = ctx.emit("Squeeze", [y_all, ctx.ints([1])])
        else:
            y = ctx.emit("Reshape", [ctx.emit("Transpose", [y_all], perm=[0, 2, 1, 3]), ctx.ints([0, 0, -1])])
    if batch_first:
        y = ctx.emit("Transpose", [y], perm=[1, 0, 2])
    h_n = hs[0] if layers == 1 else ctx.emit("Concat", hs, axis=0)
    if node.op == "gru":
        return [y, h_n]
    return [y, h_n, cs[0] if layers == 1 else ctx.emit("Concat", cs, axis=0)]


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


def _int4_param(ctx: EmitContext, node: Node, v: Any, per_tensor: bool) -> str:
    """An int8 param holding values in [-8, 7] as an ONNX INT4 initializer (two values a byte, low nibble
    first)."""
    if not isinstance(v, Param):
        raise _err(node, "4-bit values must be a param (a stored weight or zero point), not a computed value")
    t = ctx.param_tensor(v)
    if per_tensor and t.numel() == 1:
        t = t.reshape(())
    if t.dtype != torch.int8 or (t.numel() and not (-8 <= int(t.min()) and int(t.max()) <= 7)):
        raise _err(node, f"@{v.name} is not 4-bit: dtype {t.dtype}, values in [{int(t.min())}, {int(t.max())}]")
    key = ("int4", v.name, tuple(t.shape))
    if key not in ctx._param_cache:
        nibbles = (to_numpy(t).reshape(-1).astype(np.uint8) & 0x0F)
        if nibbles.size % 2:
            nibbles = np.concatenate([nibbles, np.zeros(1, np.uint8)])
        packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)
        nm = ctx.fresh(v.name)
        ctx.initializers[nm] = onnx.helper.make_tensor(nm, onnx.TensorProto.INT4, list(t.shape), packed.tobytes(),
                                                       raw=True)
        ctx._param_cache[key] = nm
    return ctx._param_cache[key]


#: ops that only pass a value through (they vanish on export or move no arithmetic)
_PASS_THROUGH = ("identity", "dropout", "contiguous")


def _runtime_dequantize(v: Any) -> bool:
    """Whether `v` (past identity/dropout) is a dequantize of a run-time value (an activation), the operand
    that makes onnxruntime fuse its reader into an integer kernel."""
    while isinstance(v, Node) and v.op in _PASS_THROUGH:
        v = v.inputs[0]
    return isinstance(v, Node) and v.op == "dequantize" and not isinstance(v.inputs[0], Param)


def _flat(values: Any) -> list[Any]:
    out: list[Any] = []
    for v in values:
        out.extend(_flat(v) if isinstance(v, (list, tuple)) else [v])
    return out


def dequantize_runs_in_float(node: Node) -> bool:
    """A dequantize of a stored integer constant (a weight or a bias) whose every reader computes in float:
    none of the readers' operands is a dequantized activation (weight-only layers, a storage scheme's layers
    computed in float). onnxruntime fuses no integer kernel around such a DequantizeLinear and, with its QDQ
    optimizations on (the default), never constant-folds a DequantizeLinear either: it would dequantize the
    weight at every inference. Such a dequantize is emitted as Cast + Mul (+ Sub) instead, which onnxruntime
    folds into the float weight when it loads the model (`_foldable_dequantize`)."""
    if not isinstance(node.inputs[0], Param) or node.attrs.get("block_size") or not node.users:
        return False
    return not any(_runtime_dequantize(a) for u in node.users for a in _flat(u.inputs) if a is not node)


def _foldable_dequantize(ctx: EmitContext, node: Node) -> str:
    """DequantizeLinear's arithmetic, (float(q) - float(zero point)) * scale in float32 (the same values: the
    integers are exact in float32), as Cast + Sub + Mul on initializers: a constant subgraph onnxruntime folds
    at session load, so the file keeps the integers and the run time is float's."""
    q, scale, zp = node.inputs
    axis = node.attrs.get("axis")
    rank = ctx.rank(q)
    shape = [1] * rank
    if axis is not None and rank > 1:
        shape[_axis(int(axis), rank)] = -1

    def bcast(v: Any, dtype: torch.dtype) -> str:
        t = _qtensor(ctx, v)
        if axis is None or rank <= 1 or t is None or t.dim() == 0 or t.numel() == 1:
            return _qparam(ctx, v, dtype, axis is None or (t is not None and t.numel() == 1 and rank > 1))
        # the stored vector (one initializer, which an int32 bias's scale s_x * s_w may read as well), reshaped
        # to broadcast over the weight's other axes by a node onnxruntime folds with the rest
        return ctx.emit("Reshape", [_qparam(ctx, v, dtype, False), ctx.ints(shape)], name=f"{node.name}_bcast")

    bits4 = (node.attrs.get("bits") or 8) <= 4
    stored = _int4_param(ctx, node, q, False) if bits4 else ctx.value(q)
    x = ctx.emit("Cast", [stored], name=f"{node.name}_float", to=onnx.TensorProto.FLOAT)
    zero = _qtensor(ctx, zp)
    if zero is None or bool(torch.as_tensor(zero).any()):
        x = ctx.emit("Sub", [x, bcast(zp, torch.float32)], name=f"{node.name}_centered")
    return ctx.emit("Mul", [x, bcast(scale, torch.float32)])


@register_emitter("dequantize")
def _dequantize(ctx: EmitContext, node: Node) -> str:
    q, scale, zp = node.inputs
    axis = node.attrs.get("axis")
    block = node.attrs.get("block_size")
    qdt = ctx.meta(q).dtype
    per_tensor = axis is None
    rank = ctx.rank(q)
    if dequantize_runs_in_float(node) and not ((node.attrs.get("bits") or 8) <= 4 and ctx.opset < 21):
        return _foldable_dequantize(ctx, node)
    if (node.attrs.get("bits") or 8) <= 4 or block:
        # INT4 storage and blocked scales are ONNX opset 21 (onnxruntime runs both on CPU)
        if ctx.opset < 21:
            what = "4-bit weights (ONNX INT4)" if node.attrs.get("bits") else "blocked weight scales"
            raise _err(node, f"{what} need ONNX opset 21: export with `slimfx export --opset 21`, `opset = 21` "
                             "under [export] in a recipe (the w4a8 recipe sets it), or export_onnx(..., opset=21)")
    if (node.attrs.get("bits") or 8) <= 4 and not block:
        # INT4 in the file, Cast to int8 before the DequantizeLinear: onnxruntime folds the Cast of the
        # initializer when it loads the model and then fuses int8 QLinearConv / QGemm as for int8 weights
        # (its DequantizeLinear of INT4 feeding a float Conv ran mobilenetv2 at 10x the fp32 time)
        return ctx.emit("DequantizeLinear", [ctx.emit("Cast", [_int4_param(ctx, node, q, False)],
                                                      name=f"{node.name}_int8", to=onnx.TensorProto.INT8),
                                             _qparam(ctx, scale, torch.float32, per_tensor),
                                             _qparam(ctx, zp, torch.int8, per_tensor)],
                        axis=None if axis is None else _axis(int(axis), rank))
    if (node.attrs.get("bits") or 8) <= 4:  # blocked: onnxruntime runs DequantizeLinear + a float Conv/Gemm
        return ctx.emit("DequantizeLinear", [_int4_param(ctx, node, q, False),
                                             _qparam(ctx, scale, torch.float32, per_tensor),
                                             _int4_param(ctx, node, zp, per_tensor)],
                        axis=None if axis is None else _axis(int(axis), rank), block_size=block or None)
    # int8/uint8 zero points stay explicit even when 0: onnxruntime's QDQ fusion (QGemm, NhwcMaxPool)
    # needs them. An int32 (bias) zero point of 0 is left out: it is the default, and fusion ignores it.
    zero = _qtensor(ctx, zp)
    omit = qdt == torch.int32 and zero is not None and not bool(torch.as_tensor(zero).any())
    return ctx.emit("DequantizeLinear", [ctx.value(q), _qparam(ctx, scale, torch.float32, per_tensor)]
                    + ([] if omit else [_qparam(ctx, zp, qdt, per_tensor)]),
                    axis=None if axis is None else _axis(int(axis), rank), block_size=block or None)


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
    if a.get("form") == "folded":
        shared = isinstance(qweight, Param) and qweight.name in ctx.shared_params
        return (_matmul_nbits_folded_shared if shared else _matmul_nbits_folded)(ctx, node)
    ins = [ctx.value(x), ctx.value(qweight), ctx.value(scales),
           ctx.value(zero_points) if zero_points is not None else None]
    if bias is not None:
        ins += [None, ctx.value(bias)]  # g_idx (absent), bias
    return ctx.emit("MatMulNBits", ins, domain="com.microsoft", K=int(a["k"]), N=int(a["n"]), bits=int(a["bits"]),
                    block_size=int(a["block_size"]), accuracy_level=int(a.get("accuracy_level") or 0) or None)


def _code_blocks(ctx: EmitContext, scales: Param) -> tuple[int, int]:
    """(rows, blocks along K) of block codes, read off their scales [N, K blocks]."""
    sc = ctx.param_tensor(scales)
    return int(sc.shape[0]), int(sc.reshape(sc.shape[0], -1).shape[1])


def _dequantized_codes(ctx: EmitContext, qweight: Param, scales: Param, zero_points: Param | None, *, bits: int,
                       block: int, k: int) -> str:
    """The float weight [N, K] that block codes (matmul_nbits' and gather_nbits' packed initializer, [N, K blocks,
    block bytes]) stand for, computed from that one initializer by ops onnxruntime constant-folds at load (Cast; at
    4 bits the two codes of a byte split by Floor and Sub; minus the zero point, times the scales; Reshape, Slice
    off the padding), once per export however many nodes read it."""
    key = ("dequantized", qweight.name)
    if key in ctx.memo:
        return ctx.memo[key]
    n, blocks = _code_blocks(ctx, scales)
    packed = ctx.emit("Cast", [ctx.value(qweight)], name="nb", to=onnx.TensorProto.FLOAT)
    if bits == 8:
        codes = packed
    else:  # low nibble first: byte = lo + 16 * hi
        sixteen = ctx.const(16.0, np.float32)
        hi = ctx.emit("Floor", [ctx.emit("Div", [packed, sixteen], name="nb")], name="nb")
        lo = ctx.emit("Sub", [packed, ctx.emit("Mul", [hi, sixteen], name="nb")], name="nb")
        pair = [ctx.emit("Unsqueeze", [v, ctx.ints([-1])], name="nb") for v in (lo, hi)]
        codes = ctx.emit("Reshape", [ctx.emit("Concat", pair, name="nb", axis=-1), ctx.ints([n, blocks, block])],
                         name="nb")
    zp = ctx.const(float(2 ** (bits - 1)), np.float32) if zero_points is None else ctx.param(
        zero_points, key="folded", transform=lambda z: unpack_codes(z, bits, blocks).float().reshape(n, blocks, 1))
    scale = ctx.emit("Reshape", [ctx.value(scales), ctx.ints([n, blocks, 1])], name="nb")
    w = ctx.emit("Mul", [ctx.emit("Sub", [codes, zp], name="nb"), scale], name="nb")
    w = ctx.emit("Reshape", [w, ctx.ints([n, blocks * block])], name="nb")
    if blocks * block != k:
        w = ctx.emit("Slice", [w, ctx.ints([0]), ctx.ints([k]), ctx.ints([1])], name="nb")
    ctx.memo[key] = w
    return w


def _matmul_nbits_folded_shared(ctx: EmitContext, node: Node) -> str:
    """The folded form of a matmul_nbits whose codes another node reads too (an LM head tied to a table a
    gather_nbits looks up): MatMul with the weight `_dequantized_codes` computes from the one packed initializer,
    transposed (folded at load too), so the file keeps the codes once and the run time is fp32's."""
    x, qweight, scales, zero_points, bias = node.inputs
    a = node.attrs
    w = _dequantized_codes(ctx, qweight, scales, zero_points, bits=int(a["bits"]), block=int(a["block_size"]),
                           k=int(a["k"]))
    w = ctx.emit("Transpose", [w], name="nb", perm=[1, 0])
    if bias is None:
        return ctx.emit("MatMul", [ctx.value(x), w])
    return ctx.emit("Add", [ctx.emit("MatMul", [ctx.value(x), w], name="nb"), ctx.value(bias)])


@register_emitter("gather_nbits")
def _gather_nbits(ctx: EmitContext, node: Node) -> str:
    """onnxruntime's GatherBlockQuantized (com.microsoft) on the very initializer MatMulNBits reads (a table tied
    to an LM head is stored once): the codes [N, K blocks, block bytes] are looked up as 3-D data, quantized
    along their last axis in one block each, so the rows come out [..., K blocks, block]; then Reshape (and Slice
    when K is not a whole number of blocks) to [..., K]. Scales (and zero points, one code a byte) get the
    trailing 1 of that layout: the scales by a Reshape onnxruntime folds at load. In the folded form (`form =
    "folded"`, as its head's): a Gather on the table `_dequantized_codes` computes at load, fp32's lookup."""
    ids, qweight, scales, zero_points = node.inputs
    a = node.attrs
    bits, block, k = int(a["bits"]), int(a["block_size"]), int(a["k"])
    if a.get("form") == "folded":
        table = _dequantized_codes(ctx, qweight, scales, zero_points, bits=bits, block=block, k=k)
        return ctx.emit("Gather", [table, ctx.value(ids)], axis=0)
    n, blocks = _code_blocks(ctx, scales)
    ins = [ctx.value(qweight), ctx.value(ids), ctx.emit("Reshape", [ctx.value(scales), ctx.ints([n, blocks, 1])],
                                                        name="gbq")]
    if zero_points is not None:
        ins.append(ctx.param(zero_points, key="gather", transform=lambda z: unpack_codes(z, bits, blocks).to(
            torch.uint8).reshape(n, blocks, 1)))
    rows = ctx.emit("GatherBlockQuantized", ins, domain="com.microsoft", bits=bits, block_size=block,
                    gather_axis=0, quantize_axis=2, name="gbq")
    rank = len(node.meta.shape) - 1  # the ids' rank
    out = ctx.emit("Reshape", [rows, ctx.ints([0] * rank + [blocks * block])],
                   name="gbq" if blocks * block != k else None)
    if blocks * block != k:
        out = ctx.emit("Slice", [out, ctx.ints([0]), ctx.ints([k]), ctx.ints([-1])])
    return out


def _int_initializer(ctx: EmitContext, base: str, arr: np.ndarray, dt: int) -> str:
    """An integer initializer; INT4/UINT4 packed two a byte, low nibble first."""
    nm = ctx.fresh(base)
    if dt in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        nib = arr.reshape(-1).astype(np.uint8) & 0x0F
        if nib.size % 2:
            nib = np.concatenate([nib, np.zeros(1, np.uint8)])
        ctx.initializers[nm] = onnx.helper.make_tensor(nm, dt, list(arr.shape),
                                                       (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes(),
                                                       raw=True)
    else:
        ctx.initializers[nm] = onnx.numpy_helper.from_array(arr.astype(onnx.helper.tensor_dtype_to_np_dtype(dt)), nm)
    return nm


def _folded_codes(ctx: EmitContext, node: Node) -> tuple[str, str | None, str]:
    """matmul_nbits' weight as initializers for the folded form, transposed to W^T blocked along K: the codes
    [blocks, block, N] (one block: [K, N], its padding left out; 4 bits: two a byte, as many bytes as
    MatMulNBits' packed codes; symmetric ones stored minus their zero point 2^(bits-1), as signed INT4/INT8, so
    no zero point is needed), the zero points [blocks, 1, N] (asymmetric only, else None) and the scales
    [blocks, 1, N] float32 (one block: [1, N])."""
    x, qweight, scales, zero_points, bias = node.inputs
    a = node.attrs
    bits, block, n = int(a["bits"]), int(a["block_size"]), int(a["n"])
    sc = ctx.param_tensor(scales).reshape(n, -1).float()
    blocks = sc.shape[1]
    k = int(a["k"])
    codes = unpack_codes(ctx.param_tensor(qweight), bits, blocks * block).reshape(n, blocks, block)
    codes = to_numpy(codes.permute(1, 2, 0).contiguous())  # [blocks, block, N]
    per_block = (blocks, 1, n)  # the shape of the scales and zero points
    if blocks == 1:  # one block: [K, N] without the padding codes, a scale per output column
        codes, per_block = codes[0, :k], (1, n)
    signed = onnx.TensorProto.INT4 if bits == 4 else onnx.TensorProto.INT8
    unsigned = onnx.TensorProto.UINT4 if bits == 4 else onnx.TensorProto.UINT8
    if zero_points is None:
        cn, zn = _int_initializer(ctx, qweight.name, codes - 2 ** (bits - 1), signed), None
    else:
        zp = unpack_codes(ctx.param_tensor(zero_points), bits, blocks).reshape(n, blocks)
        cn = _int_initializer(ctx, qweight.name, codes, unsigned)
        zn = _int_initializer(ctx, zero_points.name, to_numpy(zp.t().reshape(*per_block)), unsigned)
    sn = ctx.fresh(scales.name)
    ctx.initializers[sn] = onnx.numpy_helper.from_array(to_numpy(sc.t().reshape(*per_block).contiguous()), sn)
    return cn, zn, sn


def _matmul_nbits_folded(ctx: EmitContext, node: Node) -> str:
    """matmul_nbits with `form = folded`: the stored codes (4-bit, as many bytes as in MatMulNBits) and scales
    dequantized by Cast and Mul (Sub for zero points) on initializers (then Reshape, and Slice when K is not a
    whole number of blocks), which onnxruntime constant-folds when it loads the model, then a float MatMul
    (+ Add): the file is as small as MatMulNBits', the run time fp32's. (A DequantizeLinear would not be folded: see
    `dequantize_runs_in_float`.) Inner values get short names: with a layer's name on each they cost bytes."""
    x, qweight, scales, zero_points, bias = node.inputs
    a = node.attrs
    bits, block, k, n = int(a["bits"]), int(a["block_size"]), int(a["k"]), int(a["n"])
    if bits == 4 and ctx.opset < 21:
        raise _err(node, "the folded form stores 4-bit codes as ONNX INT4, which needs opset 21: export with "
                         "opset 21 or keep form = 'nbits' (MatMulNBits)")
    codes, zp, scale = _folded_codes(ctx, node)
    blocks = ctx.param_tensor(scales).reshape(n, -1).shape[1]
    w = ctx.emit("Cast", [codes], name="nb", to=onnx.TensorProto.FLOAT)
    if zp is not None:
        w = ctx.emit("Sub", [w, ctx.emit("Cast", [zp], name="nb", to=onnx.TensorProto.FLOAT)], name="nb")
    w = ctx.emit("Mul", [w, scale], name="nb")
    if blocks > 1:
        w = ctx.emit("Reshape", [w, ctx.ints([blocks * block, n])], name="nb")
    if blocks > 1 and blocks * block != k:
        w = ctx.emit("Slice", [w, ctx.ints([0]), ctx.ints([k]), ctx.ints([0])], name="nb")
    if bias is None:
        return ctx.emit("MatMul", [ctx.value(x), w])
    return ctx.emit("Add", [ctx.emit("MatMul", [ctx.value(x), w], name="nb"), ctx.value(bias)])
