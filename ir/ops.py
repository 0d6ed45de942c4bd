"""The canonical op table: each op's torch implementation, used by lowering.

A node `%y = op(inputs...) {attrs...}` lowers to `impl(*inputs, **attrs)`. The
implementations call exactly the kernels that torch's own modules call, so a
lowered graph is bit-exact with the model it was captured from.

Ops marked `training_flag` take `training=` from the lowered module's mode when
their `training` attr is None (batch_norm, dropout).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class OpDef:
    """What the IR knows of one canonical op."""

    name: str
    impl: Callable
    kind: str = "other"  # conv | linear | matmul | norm | activation | elementwise | pool | shape | reduce | quant | other
    training_flag: bool = False
    doc: str = ""
    attr_defaults: dict = field(default_factory=dict)


OPS: dict[str, OpDef] = {}


def register_op(name: str, impl: Callable, kind: str = "other", *, training_flag: bool = False,
                doc: str = "", **attr_defaults) -> OpDef:
    """Add (or replace) a canonical op. Later packages use this for ops of their own."""
    op = OpDef(name, impl, kind, training_flag, doc, attr_defaults)
    OPS[name] = op
    return op


def get_op(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"unknown canonical op {name!r}; known: {', '.join(sorted(OPS))}") from None


# --- implementations ------------------------------------------------------------------------------

def _conv1d(x, weight, bias=None, *, stride=(1,), padding=(0,), dilation=(1,), groups=1):
    return F.conv1d(x, weight, bias, stride, padding, dilation, groups)


def _conv2d(x, weight, bias=None, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _linear(x, weight, bias=None):
    return F.linear(x, weight, bias)


def _batch_norm(x, running_mean, running_var, weight=None, bias=None, num_batches_tracked=None, *,
                eps=1e-5, momentum=0.1, training=False):
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            momentum = 1.0 / float(num_batches_tracked)
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum or 0.0, eps)


def _layer_norm(x, weight=None, bias=None, *, normalized_shape, eps=1e-5):
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def _group_norm(x, weight=None, bias=None, *, num_groups, eps=1e-5):
    return F.group_norm(x, num_groups, weight, bias, eps)


def _embedding(ids, weight, *, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
               sparse=False):
    return F.embedding(ids, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)


def _dropout(x, *, p=0.5, training=False):
    return F.dropout(x, p, training)


def _identity(x):
    return x


def _max_pool2d(x, *, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)


def _max_pool1d(x, *, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    return F.max_pool1d(x, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)


def _avg_pool2d(x, *, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                divisor_override=None):
    return F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def _avg_pool1d(x, *, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    return F.avg_pool1d(x, kernel_size, stride, padding, ceil_mode, count_include_pad)


def _reshape(x, *, shape):
    return x.reshape(shape)


def _flatten(x, *, start_dim=0, end_dim=-1):
    return x.flatten(start_dim, end_dim)


def _permute(x, *, dims):
    return x.permute(dims)


def _transpose(x, *, dim0, dim1):
    return x.transpose(dim0, dim1)


def _contiguous(x):
    return x.contiguous()


def _expand(x, *, size):
    return x.expand(size)


def _cat(*xs, dim=0):
    return torch.cat(xs, dim)


def _stack(*xs, dim=0):
    return torch.stack(xs, dim)


def _split(x, *, split_size, dim=0):
    return torch.split(x, split_size, dim)


def _chunk(x, *, chunks, dim=0):
    return torch.chunk(x, chunks, dim)


def _getitem(x, *, index):
    return x[index]


def _slice(x, *, index):
    return x[index]


def _unsqueeze(x, *, dim):
    return x.unsqueeze(dim)


def _squeeze(x, *, dim=None):
    return x.squeeze() if dim is None else x.squeeze(dim)


def _mean(x, *, dim=None, keepdim=False):
    return x.mean() if dim is None else x.mean(dim, keepdim)


def _sum(x, *, dim=None, keepdim=False):
    return x.sum() if dim is None else x.sum(dim, keepdim)


def _size(x, *, dim=None):
    return x.size() if dim is None else x.size(dim)


def _shape(x):
    return x.shape


def _sdpa(q, k, v, attn_mask=None, *, dropout_p=0.0, is_causal=False, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale)


def _interpolate(x, *, size=None, scale_factor=None, mode="nearest", align_corners=None,
                 recompute_scale_factor=None, antialias=False):
    return F.interpolate(x, size, scale_factor, mode, align_corners, recompute_scale_factor, antialias)


def _softmax(x, *, dim):
    return F.softmax(x, dim)


def _log_softmax(x, *, dim):
    return F.log_softmax(x, dim)


def _gelu(x, *, approximate="none"):
    return F.gelu(x, approximate=approximate)


def _leaky_relu(x, *, negative_slope=0.01):
    return F.leaky_relu(x, negative_slope)


def _relu6(x):
    return F.hardtanh(x, 0.0, 6.0)


def _clamp(x, *, min=None, max=None):  # noqa: A002
    return torch.clamp(x, min, max)


def _cast(x, *, dtype):
    return x.to(dtype)


def _mask(weight, mask):
    """W ⊙ M: an explicit pruning mask on a weight (unstructured sparsity); `mask` is 0/1, same shape."""
    return weight * mask


_QRANGE = {torch.int8: (-128, 127), torch.uint8: (0, 255), torch.int32: (-(2**31), 2**31 - 1)}


def _broadcast_qparam(p, x, axis):
    if axis is None or not isinstance(p, torch.Tensor) or p.dim() == 0:
        return p
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def _quantize(x, scale, zero_point, *, dtype=torch.int8, axis=None):
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point)."""
    lo, hi = _QRANGE[dtype]
    s = _broadcast_qparam(scale, x, axis)
    z = _broadcast_qparam(zero_point, x, axis)
    q = torch.round(x / s) + (z.to(x.dtype) if isinstance(z, torch.Tensor) else z)
    return q.clamp(lo, hi).to(dtype)


def _dequantize(q, scale, zero_point, *, axis=None):
    """ONNX DequantizeLinear: (q - zero_point) * scale, in float32."""
    s = _broadcast_qparam(scale, q, axis)
    z = _broadcast_qparam(zero_point, q, axis)
    zf = z.to(torch.float32) if isinstance(z, torch.Tensor) else float(z)
    return (q.to(torch.float32) - zf) * s


# --- the table --------------------------------------------------------------------------------------

for _name, _impl, _kind in [
    ("conv1d", _conv1d, "conv"), ("conv2d", _conv2d, "conv"),
    ("linear", _linear, "linear"), ("matmul", torch.matmul, "matmul"),
    ("layer_norm", _layer_norm, "norm"), ("group_norm", _group_norm, "norm"),
    ("embedding", _embedding, "other"), ("identity", _identity, "other"),
    ("relu", F.relu, "activation"), ("relu6", _relu6, "activation"), ("gelu", _gelu, "activation"),
    ("silu", F.silu, "activation"), ("sigmoid", torch.sigmoid, "activation"), ("tanh", torch.tanh, "activation"),
    ("hardswish", F.hardswish, "activation"), ("hardsigmoid", F.hardsigmoid, "activation"),
    ("leaky_relu", _leaky_relu, "activation"), ("clamp", _clamp, "activation"),
    ("softmax", _softmax, "activation"), ("log_softmax", _log_softmax, "activation"),
    ("add", operator.add, "elementwise"), ("sub", operator.sub, "elementwise"),
    ("mul", operator.mul, "elementwise"), ("div", operator.truediv, "elementwise"),
    ("pow", operator.pow, "elementwise"), ("neg", operator.neg, "elementwise"),
    ("sqrt", torch.sqrt, "elementwise"), ("rsqrt", torch.rsqrt, "elementwise"), ("exp", torch.exp, "elementwise"),
    ("log", torch.log, "elementwise"), ("abs", torch.abs, "elementwise"), ("erf", torch.erf, "elementwise"),
    ("reciprocal", torch.reciprocal, "elementwise"),
    ("max_pool1d", _max_pool1d, "pool"), ("max_pool2d", _max_pool2d, "pool"),
    ("avg_pool1d", _avg_pool1d, "pool"), ("avg_pool2d", _avg_pool2d, "pool"),
    ("adaptive_avg_pool1d", F.adaptive_avg_pool1d, "pool"), ("adaptive_avg_pool2d", F.adaptive_avg_pool2d, "pool"),
    ("adaptive_max_pool2d", F.adaptive_max_pool2d, "pool"),
    ("reshape", _reshape, "shape"), ("flatten", _flatten, "shape"), ("permute", _permute, "shape"),
    ("transpose", _transpose, "shape"), ("contiguous", _contiguous, "shape"), ("expand", _expand, "shape"),
    ("cat", _cat, "shape"), ("stack", _stack, "shape"), ("split", _split, "shape"), ("chunk", _chunk, "shape"),
    ("getitem", _getitem, "shape"), ("slice", _slice, "shape"), ("unsqueeze", _unsqueeze, "shape"),
    ("squeeze", _squeeze, "shape"), ("size", _size, "shape"), ("shape", _shape, "shape"), ("cast", _cast, "shape"),
    ("mean", _mean, "reduce"), ("sum", _sum, "reduce"),
    ("scaled_dot_product_attention", _sdpa, "matmul"), ("interpolate", _interpolate, "other"),
    ("quantize", _quantize, "quant"), ("dequantize", _dequantize, "quant"),
    ("mask", _mask, "other"),
]:
    register_op(_name, _impl, _kind)

register_op("batch_norm", _batch_norm, "norm", training_flag=True)
register_op("dropout", _dropout, "other", training_flag=True)

# Ops that are not canonical table entries but are structural parts of every graph.
STRUCTURAL_OPS = ("input", "output", "opaque")

# Ops whose result does not depend on the order of their first two inputs.
COMMUTATIVE_OPS = frozenset({"add", "mul"})
