"""Capture: torch.fx symbolic trace -> shape propagation -> canonical IR.

Each module class, function and tensor method that spells a canonical op has a
converter that returns `(op, inputs, attrs)`. Converters take the source API's
own signature, so Python binds the fx node's args and kwargs for us.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import logging
import math
import operator
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from slimfx.ir.errors import CaptureError
from slimfx.ir.graph import Graph, Node, Param, TensorMeta, iter_refs, meta_of
from slimfx.ir.ops import OPS, trait
from slimfx.ir.parametrizations import bake_parametrizations

_log = logging.getLogger(__name__)
Conv = tuple[str, tuple, dict]
_FUNCTIONS: dict[Any, Callable[..., Conv | None]] = {}
_METHODS: dict[str, Callable[..., Conv | None]] = {}
_MODULES: dict[type, Callable[..., Conv | None]] = {}


_WRAPPED: dict[int, Callable] = {}  # Python functions users registered: fx records one call (autowrap)


def register_converter(target: Any, fn: Callable[..., Conv | None] | None = None) -> Callable:
    """Teach capture a spelling of a canonical op: `fn` turns a call of `target` into
    `(op, inputs, attrs)`, or returns None to keep that call an `opaque` node. `op` must be in the op
    table (`ir.register_op`). Usable as a decorator: `@ir.register_converter(my_act)`.

    - a function (`torch.special.expit`, or the user's own `my_act`): `fn` takes the call's own
      arguments (`fn(x, alpha=0.1)`). A plain Python function is recorded as one call instead of being
      traced through, when `forward` calls it by a global name (`my_act(x)`, `from mylib import my_act`).
    - a tensor method name (`"my_method"`): `fn(self, *args, **kwargs)`.
    - an `nn.Module` subclass: `fn(module, path, *args, **kwargs)`, where `path` is the module's
      qualified name (`ir.Param(f"{path}.weight")` reads its weight); modules of exactly this class are
      not traced into.
    - a torch op (`torch.ops.mylib.my_op`, packet or overload): `fn(*args, **kwargs)`, on both front
      ends (torch.fx and torch.export, where custom ops stay one call).

    A later registration for the same target replaces the earlier one (built-in spellings included).
    """
    if fn is None:
        return lambda f: register_converter(target, f)
    if isinstance(target, str):
        _METHODS[target] = fn
    elif isinstance(target, type) and issubclass(target, nn.Module):
        _MODULES[target] = fn
    elif isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        from slimfx.ir import capture_export

        _FUNCTIONS[target] = fn
        capture_export.register_aten_converter(target, fn)
    elif callable(target):
        _FUNCTIONS[target] = fn
        if inspect.isfunction(target) and not is_internal_file(getattr(target.__code__, "co_filename", "")):
            _WRAPPED[id(target)] = target
    else:
        raise TypeError(f"register_converter: {target!r} is not a function, tensor method name, nn.Module "
                        "class or torch op")
    return fn


def _converts(*targets: Any) -> Callable:
    def deco(fn: Callable) -> Callable:
        for t in targets:
            if isinstance(t, str):
                _METHODS[t] = fn
            else:
                _FUNCTIONS[t] = fn
        return fn
    return deco


def _converts_module(*classes: type) -> Callable:
    def deco(fn: Callable) -> Callable:
        for c in classes:
            _MODULES[c] = fn
        return fn
    return deco


def _tuple(v: Any, n: int) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(v)
    if isinstance(v, str):
        return v
    return (v,) * n


def _dims(args: Sequence) -> tuple:
    """`x.view(2, 3)` and `x.view((2, 3))` both give (2, 3)."""
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return tuple(args[0])
    return tuple(args)


# --- functions and methods ------------------------------------------------------------------------

@_converts(F.conv2d, torch.conv2d)
def _f_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return "conv2d", (input, weight, bias), dict(stride=_tuple(stride, 2), padding=_tuple(padding, 2),
                                                  dilation=_tuple(dilation, 2), groups=groups)


@_converts(F.conv1d, torch.conv1d)
def _f_conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return "conv1d", (input, weight, bias), dict(stride=_tuple(stride, 1), padding=_tuple(padding, 1),
                                                  dilation=_tuple(dilation, 1), groups=groups)


@_converts(F.conv3d, torch.conv3d)
def _f_conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return "conv3d", (input, weight, bias), dict(stride=_tuple(stride, 3), padding=_tuple(padding, 3),
                                                  dilation=_tuple(dilation, 3), groups=groups)


@_converts(F.linear, torch._C._nn.linear)
def _f_linear(input, weight, bias=None):
    return "linear", (input, weight, bias), {}


@_converts(torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm")
def _f_matmul(input, other):
    return "matmul", (input, other), {}


@_converts(F.batch_norm)
def _f_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                  eps=1e-5):
    return "batch_norm", (input, running_mean, running_var, weight, bias, None), dict(
        eps=eps, momentum=momentum, training=bool(training))


@_converts(F.layer_norm)
def _f_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return "layer_norm", (input, weight, bias), dict(normalized_shape=_shape_arg(normalized_shape), eps=eps)


@_converts(F.group_norm)
def _f_group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    return "group_norm", (input, weight, bias), dict(num_groups=num_groups, eps=eps)


@_converts(F.embedding)
def _f_embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
                 sparse=False):
    return "embedding", (input, weight), dict(padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
                                              scale_grad_by_freq=scale_grad_by_freq, sparse=sparse)


def _unary(op: str) -> Callable:
    def conv(input, inplace=False):
        return op, (input,), {}
    return conv


for _op, _targets in {
    "relu": (F.relu, torch.relu, "relu"), "sigmoid": (torch.sigmoid, F.sigmoid, "sigmoid"),
    "tanh": (torch.tanh, F.tanh, "tanh"), "silu": (F.silu,), "hardswish": (F.hardswish,),
    "hardsigmoid": (F.hardsigmoid,), "relu6": (F.relu6,),
    "sqrt": (torch.sqrt, "sqrt"), "rsqrt": (torch.rsqrt, "rsqrt"), "exp": (torch.exp, "exp"),
    "log": (torch.log, "log"), "abs": (torch.abs, "abs", operator.abs), "erf": (torch.erf, "erf"),
    "sin": (torch.sin, "sin"), "cos": (torch.cos, "cos"),
    "reciprocal": (torch.reciprocal, "reciprocal"), "neg": (torch.neg, operator.neg, "neg"),
    "contiguous": ("contiguous",),
}.items():
    _converts(*_targets)(_unary(_op))


@_converts(F.gelu)
def _f_gelu(input, approximate="none"):
    return "gelu", (input,), dict(approximate=approximate)


@_converts(F.leaky_relu)
def _f_leaky_relu(input, negative_slope=0.01, inplace=False):
    return "leaky_relu", (input,), dict(negative_slope=negative_slope)


@_converts(F.hardtanh)
def _f_hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    if min_val == 0.0 and max_val == 6.0:
        return "relu6", (input,), {}
    return "clamp", (input,), dict(min=min_val, max=max_val)


@_converts(torch.clamp, "clamp", torch.clip, "clip")
def _f_clamp(input, min=None, max=None):  # noqa: A002
    if isinstance(min, (fx.Node, Node)) or isinstance(max, (fx.Node, Node)):
        return None
    return "clamp", (input,), dict(min=min, max=max)


@_converts(F.softmax, torch.softmax, "softmax")
def _f_softmax(input, dim=None, _stacklevel=3, dtype=None):
    if dtype is not None or dim is None:
        return None
    return "softmax", (input,), dict(dim=dim)


@_converts(F.log_softmax, torch.log_softmax, "log_softmax")
def _f_log_softmax(input, dim=None, _stacklevel=3, dtype=None):
    if dtype is not None or dim is None:
        return None
    return "log_softmax", (input,), dict(dim=dim)


def _binary(op: str) -> Callable:
    def conv(input, other, *, alpha=None, out=None, rounding_mode=None):
        if alpha is not None or out is not None or rounding_mode is not None:
            return None
        return op, (input, other), {}
    return conv


for _op, _targets in {
    "add": (operator.add, torch.add, "add"), "sub": (operator.sub, torch.sub, "sub"),
    "mul": (operator.mul, torch.mul, "mul"), "div": (operator.truediv, torch.div, "div"),
    "pow": (operator.pow, torch.pow, "pow"),
}.items():
    _converts(*_targets)(_binary(_op))


def _min_max(op: str) -> Callable:
    def conv(input, other=None, *rest, **kwargs):
        """Two tensors: elementwise (minimum); a dim: values and indices along it (min_dim); min(x) of all values
        is left alone."""
        if not isinstance(input, (Node, Param)):
            return None
        if other is None and not rest and not kwargs and op in ("min", "max"):  # of all values
            return f"a{op}", (input,), dict(dim=None, keepdim=False)
        dim = kwargs.pop("dim", other)
        if isinstance(dim, int) and not isinstance(dim, bool) and op in ("min", "max"):
            keepdim = kwargs.pop("keepdim", rest[0] if rest else False)
            return (None if kwargs or len(rest) > 1 or not isinstance(keepdim, bool)
                    else (f"{op}_dim", (input,), dict(dim=dim, keepdim=keepdim)))
        if rest or kwargs or not isinstance(other, (Node, Param)):
            return None
        return {"min": "minimum", "max": "maximum"}.get(op, op), (input, other), {}
    return conv


_converts(torch.minimum, "minimum")(_min_max("minimum"))
_converts(torch.maximum, "maximum")(_min_max("maximum"))
_converts(torch.min, "min")(_min_max("min"))
_converts(torch.max, "max")(_min_max("max"))


@_converts(F.dropout)
def _f_dropout(input, p=0.5, training=True, inplace=False):
    return "dropout", (input,), dict(p=p, training=bool(training))


def _max_pool(dims: int) -> Callable[..., Conv | None]:
    def conv(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
        if return_indices:
            return None
        return f"max_pool{dims}d", (input,), dict(kernel_size=_tuple(kernel_size, dims),
                                                  stride=_tuple(stride if stride else kernel_size, dims),
                                                  padding=_tuple(padding, dims), dilation=_tuple(dilation, dims),
                                                  ceil_mode=ceil_mode)
    return conv


_f_max_pool2d = _converts(F.max_pool2d, torch.max_pool2d)(_max_pool(2))
_f_max_pool1d = _converts(F.max_pool1d, torch.max_pool1d)(_max_pool(1))
_f_max_pool3d = _converts(F.max_pool3d, torch.max_pool3d)(_max_pool(3))


@_converts(F.avg_pool3d, torch._C._nn.avg_pool3d)
def _f_avg_pool3d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                  divisor_override=None):
    return "avg_pool3d", (input,), dict(kernel_size=_tuple(kernel_size, 3),
                                        stride=_tuple(stride if stride else kernel_size, 3),
                                        padding=_tuple(padding, 3), ceil_mode=ceil_mode,
                                        count_include_pad=count_include_pad, divisor_override=divisor_override)


@_converts(F.avg_pool2d, torch._C._nn.avg_pool2d)
def _f_avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                  divisor_override=None):
    return "avg_pool2d", (input,), dict(kernel_size=_tuple(kernel_size, 2),
                                        stride=_tuple(stride if stride else kernel_size, 2),
                                        padding=_tuple(padding, 2), ceil_mode=ceil_mode,
                                        count_include_pad=count_include_pad, divisor_override=divisor_override)


@_converts(F.avg_pool1d, torch.avg_pool1d)
def _f_avg_pool1d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    return "avg_pool1d", (input,), dict(kernel_size=_tuple(kernel_size, 1),
                                        stride=_tuple(stride if stride else kernel_size, 1),
                                        padding=_tuple(padding, 1), ceil_mode=ceil_mode,
                                        count_include_pad=count_include_pad)


def _adaptive_pool(kind: str, dims: int) -> Callable[..., Conv | None]:
    """The converter of adaptive_{kind}_pool{dims}d (a max pool that returns its indices stays a call)."""
    def conv(input, output_size, return_indices=False):
        if return_indices:
            return None
        return f"adaptive_{kind}_pool{dims}d", (input,), dict(output_size=_tuple(output_size, dims))
    return conv


_f_adaptive_avg_pool1d = _converts(F.adaptive_avg_pool1d, torch.adaptive_avg_pool1d)(_adaptive_pool("avg", 1))
_f_adaptive_avg_pool2d = _converts(F.adaptive_avg_pool2d)(_adaptive_pool("avg", 2))
_f_adaptive_avg_pool3d = _converts(F.adaptive_avg_pool3d)(_adaptive_pool("avg", 3))
_f_adaptive_max_pool2d = _converts(F.adaptive_max_pool2d)(_adaptive_pool("max", 2))
_f_adaptive_max_pool3d = _converts(F.adaptive_max_pool3d)(_adaptive_pool("max", 3))


@_converts("view", "reshape")
def _m_view(self, *shape):
    return "reshape", (self,), dict(shape=_dims(shape))


@_converts(torch.reshape)
def _f_reshape(input, shape):
    return "reshape", (input,), dict(shape=tuple(shape))


@_converts(torch.flatten, "flatten")
def _f_flatten(input, start_dim=0, end_dim=-1):
    return "flatten", (input,), dict(start_dim=start_dim, end_dim=end_dim)


@_converts(torch.permute, "permute")
def _f_permute(input, *dims):
    return "permute", (input,), dict(dims=_dims(dims))


@_converts(torch.transpose, "transpose", torch.swapaxes, "swapaxes", torch.swapdims, "swapdims")
def _f_transpose(input, dim0, dim1):
    return "transpose", (input,), dict(dim0=dim0, dim1=dim1)


@_converts("expand")
def _m_expand(self, *size):
    return "expand", (self,), dict(size=_dims(size))


@_converts(torch.cat, torch.concat, torch.concatenate)
def _f_cat(tensors, dim=0, axis=None):
    return "cat", tuple(tensors), dict(dim=dim if axis is None else axis)


@_converts(torch.stack)
def _f_stack(tensors, dim=0):
    return "stack", tuple(tensors), dict(dim=dim)


@_converts(torch.split, "split")
def _f_split(tensor, split_size_or_sections, dim=0):
    s = split_size_or_sections
    return "split", (tensor,), dict(split_size=tuple(s) if isinstance(s, (list, tuple)) else s, dim=dim)


@_converts(torch.chunk, "chunk")
def _f_chunk(input, chunks, dim=0):
    return "chunk", (input,), dict(chunks=chunks, dim=dim)


@_converts(torch.unsqueeze, "unsqueeze")
def _f_unsqueeze(input, dim):
    return "unsqueeze", (input,), dict(dim=dim)


@_converts(torch.squeeze, "squeeze")
def _f_squeeze(input, dim=None):
    return "squeeze", (input,), dict(dim=dim)


@_converts(torch.mean, "mean")
def _f_mean(input, dim=None, keepdim=False, *, dtype=None):
    if dtype is not None:
        return None
    return "mean", (input,), dict(dim=_tuple(dim, 1) if dim is not None else None, keepdim=keepdim)


@_converts(torch.sum, "sum")
def _f_sum(input, dim=None, keepdim=False, *, dtype=None):
    if dtype is not None:
        return None
    return "sum", (input,), dict(dim=_tuple(dim, 1) if dim is not None else None, keepdim=keepdim)


def _f_extreme(op: str) -> Callable:
    def conv(input, dim=(), keepdim=False):
        return op, (input,), dict(dim=_tuple(dim, 1) if dim not in ((), None) else None, keepdim=bool(keepdim))
    return conv


_converts(torch.amax, "amax")(_f_extreme("amax"))
_converts(torch.amin, "amin")(_f_extreme("amin"))


@_converts("size")
def _m_size(self, dim=None):
    return "size", (self,), dict(dim=dim)


@_converts(F.scaled_dot_product_attention)
def _f_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if enable_gqa:
        return None
    return "scaled_dot_product_attention", (query, key, value, attn_mask), dict(
        dropout_p=dropout_p, is_causal=is_causal, scale=scale)


@_converts(F.interpolate)
def _f_interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                   recompute_scale_factor=None, antialias=False):
    return "interpolate", (input,), dict(size=size, scale_factor=scale_factor, mode=mode,
                                         align_corners=align_corners, recompute_scale_factor=recompute_scale_factor,
                                         antialias=antialias)


@_converts("to", "type")
def _m_to(self, *args, **kwargs):
    dtypes = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.dtype)]
    others = [a for a in args if not isinstance(a, torch.dtype)]
    if len(dtypes) != 1 or others or set(kwargs) - {"dtype"}:
        return None
    return "cast", (self,), dict(dtype=dtypes[0])


for _meth, _dtype in {"float": torch.float32, "half": torch.float16, "double": torch.float64,
                      "long": torch.int64, "int": torch.int32, "bool": torch.bool}.items():
    _converts(_meth)(lambda self, _d=_dtype: ("cast", (self,), dict(dtype=_d)))


# --- ops real models use: transposed convs, einsum, norms, masks, indexing, recurrent layers ---------------

class _NotStatic(TypeError):
    """A size argument computed from tensor values: the converter declines (a TypeError keeps the call opaque)."""


def static_value(v: Any) -> Any:
    """The value of a size argument known at capture: Python values, and `size`/`shape` nodes (and items
    of them) of tensors with shapes (`F.layer_norm(x, x.shape[-1:])`, `(x.size(-1),)`). Raises
    _NotStatic for anything computed from tensor values."""
    if isinstance(v, (tuple, list, torch.Size)):
        return tuple(static_value(e) for e in v)
    if not isinstance(v, Node):
        if isinstance(v, (Param, torch.Tensor)):
            raise _NotStatic
        return v
    if v.op in ("size", "shape") and isinstance(getattr(v.inputs[0], "meta", None), TensorMeta):
        shape = v.inputs[0].meta.shape
        dim = v.attrs.get("dim") if v.op == "size" else None
        return tuple(shape) if dim is None else shape[dim]
    if v.op == "getitem" and trait(getattr(v.inputs[0], "op", None), "result") == "value":
        return static_value(v.inputs[0])[v.attrs["index"]]
    raise _NotStatic


def _shape_arg(v: Any) -> tuple:
    """normalized_shape and similar: an int or a sequence of ints, possibly read from sizes."""
    try:
        v = static_value(v)
    except _NotStatic:
        raise TypeError("a shape argument computed at run time") from None  # the converter declines
    return (int(v),) if isinstance(v, int) else tuple(int(e) for e in v)


def _is_tensor(v: Any) -> bool:
    return isinstance(v, Param) or (isinstance(v, Node) and isinstance(v.meta, TensorMeta))


def _dtype_of(v: Any) -> torch.dtype | None:
    return v.meta.dtype if isinstance(v, Node) and isinstance(v.meta, TensorMeta) else None


def _conv_transpose(n: int, input, weight, bias, stride, padding, output_padding, groups, dilation) -> Conv:
    return f"conv_transpose{n}d", (input, weight, bias), dict(
        stride=_tuple(stride, n), padding=_tuple(padding, n), output_padding=_tuple(output_padding, n),
        groups=groups, dilation=_tuple(dilation, n))


@_converts(F.conv_transpose2d, torch.conv_transpose2d)
def _f_conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return _conv_transpose(2, input, weight, bias, stride, padding, output_padding, groups, dilation)


@_converts(F.conv_transpose1d, torch.conv_transpose1d)
def _f_conv_transpose1d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return _conv_transpose(1, input, weight, bias, stride, padding, output_padding, groups, dilation)


@_converts(torch.einsum)
def _f_einsum(equation, *operands):
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(equation, str) or not all(_is_tensor(o) for o in operands):
        return None  # the sublist form einsum(a, [0, 1], b, [1, 2])
    return "einsum", tuple(operands), dict(equation=equation)


@_converts(F.rms_norm)
def _f_rms_norm(input, normalized_shape, weight=None, eps=None):
    return "rms_norm", (input, weight), dict(normalized_shape=_shape_arg(normalized_shape), eps=eps)


@_converts(F.instance_norm)
def _f_instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                     momentum=0.1, eps=1e-5):
    return "instance_norm", (input, running_mean, running_var, weight, bias), dict(
        use_input_stats=bool(use_input_stats), momentum=momentum, eps=eps, training=False)


@_converts(F.pixel_shuffle, torch.pixel_shuffle)
def _f_pixel_shuffle(input, upscale_factor):
    return "pixel_shuffle", (input,), dict(upscale_factor=int(upscale_factor))


@_converts(F.pixel_unshuffle, torch.pixel_unshuffle)
def _f_pixel_unshuffle(input, downscale_factor):
    return "pixel_unshuffle", (input,), dict(downscale_factor=int(downscale_factor))


def _compare(op: str) -> Callable:
    def conv(input, other, *, out=None):
        if out is not None or not (_is_tensor(input) or _is_tensor(other)):
            return None  # comparisons of sizes and other Python values
        return op, (input, other), {}
    return conv


for _op, _targets in {
    # "__eq__" ...: a tensor constant on the left (`mask_buffer == x`) records the tensor's own method
    "eq": (operator.eq, torch.eq, "eq", "__eq__"), "ne": (operator.ne, torch.ne, "ne", "__ne__"),
    "lt": (operator.lt, torch.lt, "lt", "__lt__"), "le": (operator.le, torch.le, "le", "__le__"),
    "gt": (operator.gt, torch.gt, "gt", "__gt__"), "ge": (operator.ge, torch.ge, "ge", "__ge__"),
}.items():
    _converts(*_targets)(_compare(_op))


def _logical(op: str) -> Callable:
    """torch.logical_and(a, b) (always bool); `a & b` and torch.bitwise_and (bool masks or integers)."""
    def conv(input, other, *, out=None):
        if out is not None or not (_is_tensor(input) or _is_tensor(other)):
            return None
        return op, (input, other), {}
    return conv


for _op, _targets in {
    "logical_and": (torch.logical_and, "logical_and"), "logical_or": (torch.logical_or, "logical_or"),
    "logical_xor": (torch.logical_xor, "logical_xor"),
    "bitwise_and": (operator.and_, torch.bitwise_and, "bitwise_and", "__and__", "__rand__"),
    "bitwise_or": (operator.or_, torch.bitwise_or, "bitwise_or", "__or__", "__ror__"),
    "bitwise_xor": (operator.xor, torch.bitwise_xor, "bitwise_xor", "__xor__", "__rxor__"),
}.items():
    _converts(*_targets)(_logical(_op))


@_converts(torch.logical_not, "logical_not")
def _f_logical_not(input, *, out=None):
    return ("logical_not", (input,), {}) if out is None and _is_tensor(input) else None


@_converts(operator.invert, torch.bitwise_not, "bitwise_not", "__invert__")
def _f_invert(input, *, out=None):
    return ("bitwise_not", (input,), {}) if out is None and _is_tensor(input) else None


@_converts(torch.where)
def _f_where(condition, input=None, other=None, *, out=None):
    if out is not None or input is None or other is None or not _is_tensor(condition):
        return None  # where(cond) is nonzero: its size depends on the data
    return "where", (condition, input, other), {}


@_converts("where")
def _m_where(self, condition, other):
    return _f_where(condition, self, other)


def _probe_tensor(v: Any) -> Any:
    if isinstance(v, Node):
        return torch.empty(v.meta.shape, dtype=v.meta.dtype, device="meta")
    return v


@_converts(torch.masked_fill, "masked_fill")
def _f_masked_fill(input, mask, value):
    """`x.masked_fill(mask, v)` is `where(mask, v, x)` when that keeps x's dtype (always for float x)."""
    if not (isinstance(input, Node) and isinstance(input.meta, TensorMeta) and _is_tensor(mask)):
        return None
    if isinstance(value, Node) and not (isinstance(value.meta, TensorMeta) and value.meta.shape == ()):
        return None
    try:
        kept = torch.where(torch.ones((), dtype=torch.bool, device="meta"), _probe_tensor(value),
                           _probe_tensor(input)).dtype == input.meta.dtype
    except Exception:  # noqa: BLE001 - a value torch.where does not take stays a masked_fill call
        kept = False
    return ("where", (mask, value, input), {}) if kept else None


@_converts(torch.cumsum, "cumsum")
def _f_cumsum(input, dim, *, dtype=None, out=None):
    if out is not None:
        return None
    return "cumsum", (input,), dict(dim=int(static_value(dim)), dtype=dtype)


@_converts(torch.unbind, "unbind")
def _f_unbind(input, dim=0):
    return "unbind", (input,), dict(dim=int(static_value(dim)))


@_converts(torch.addcmul, "addcmul")
def _f_addcmul(input, tensor1, tensor2, *, value=1, out=None):
    if out is not None or isinstance(value, (Node, Param)):
        return None
    return "addcmul", (input, tensor1, tensor2), dict(value=value)


def filled(size: Sequence, value: Any, dtype: Any) -> Conv | None:
    """`full` for a tensor of one value whose size follows the inputs (an entry is a node); None when the
    size is fixed (capture then folds the call into a constant, as any call that reads no input)."""
    size = tuple(size)
    if not any(isinstance(d, Node) for d in size) or isinstance(value, (Node, Param)):
        return None
    return "full", (), dict(size=size, value=value, dtype=dtype)


def _fill_kwargs(dtype=None, layout=None, device=None, pin_memory=None, requires_grad=False,
                 memory_format=None, out=None, names=None):
    """The dtype of a factory call's keywords; a layout, an `out=` or names decline (a TypeError)."""
    if out is not None or names is not None or layout not in (None, torch.strided):
        raise TypeError("not a plain dense tensor")
    return dtype


@_converts(torch.zeros)
def _f_zeros(*size, **kwargs):
    return filled(_dims(size), 0.0, _fill_kwargs(**kwargs))


@_converts(torch.ones)
def _f_ones(*size, **kwargs):
    return filled(_dims(size), 1.0, _fill_kwargs(**kwargs))


@_converts(torch.full)
def _f_full(size, fill_value, **kwargs):
    return filled(size, fill_value, _fill_kwargs(**kwargs))


def _like(value: Any) -> Callable:
    def conv(input, *rest, **kwargs):
        fill = value if value is not None else (rest[0] if rest else kwargs.pop("fill_value", None))
        if not isinstance(input, Node) or not isinstance(input.meta, TensorMeta) or isinstance(fill, (Node, Param)) \
                or fill is None:
            return None
        return "full_like", (input,), dict(value=fill, dtype=_fill_kwargs(**kwargs) or input.meta.dtype)
    return conv


for _fn, _value in ((torch.zeros_like, 0), (torch.ones_like, 1), (torch.full_like, None)):
    _converts(_fn)(_like(_value))


def _new_filled(value: Any) -> Callable:
    def conv(self, *size, **kwargs):
        if value is None:  # new_full(size, fill_value)
            size, fill = size[0], size[1] if len(size) > 1 else kwargs.pop("fill_value")
        else:
            size, fill = _dims(size), value
        dtype = _fill_kwargs(**kwargs)
        if dtype is None and isinstance(self, Node) and isinstance(self.meta, TensorMeta):
            dtype = self.meta.dtype
        return filled(size, fill, dtype) if dtype is not None else None
    return conv


for _name, _value in (("new_zeros", 0), ("new_ones", 1), ("new_full", None)):
    _converts(_name)(_new_filled(_value))


@_converts(F.pad, torch.constant_pad_nd)
def _f_pad(input, pad, mode="constant", value=None):
    try:
        pad = tuple(int(p) for p in static_value(pad))
    except _NotStatic:
        return None
    if torch.is_tensor(value) or isinstance(value, Node):
        return None
    return "pad", (input,), dict(pad=pad, mode=str(mode), value=None if value is None else float(value))


@_converts(torch.roll, "roll")
def _f_roll(input, shifts, dims=None):
    try:
        shifts, dims = static_value(shifts), static_value(dims)
    except _NotStatic:
        return None
    shifts = tuple(int(s) for s in shifts) if isinstance(shifts, tuple) else (int(shifts),)
    if dims is None or dims == ():
        return None  # a roll of the flattened tensor: left to decomposition
    dims = tuple(int(d) for d in dims) if isinstance(dims, tuple) else (int(dims),)
    return ("roll", (input,), dict(shifts=shifts, dims=dims)) if len(shifts) == len(dims) else None


@_converts(torch.topk, "topk")
def _f_topk(input, k, dim=-1, largest=True, sorted=True, *, out=None):  # noqa: A002
    if out is not None:
        return None
    return "topk", (input,), dict(k=int(static_value(k)), dim=int(dim), largest=bool(largest), sorted=bool(sorted))


def _arg_reduce(op: str) -> Callable:
    def conv(input, dim=None, keepdim=False, *, out=None):
        if out is not None:
            return None
        return op, (input,), dict(dim=None if dim is None else int(dim), keepdim=bool(keepdim))
    return conv


_converts(torch.argmax, "argmax")(_arg_reduce("argmax"))
_converts(torch.argmin, "argmin")(_arg_reduce("argmin"))


@_converts(torch.index_select, "index_select")
def _f_index_select(input, dim, index, *, out=None):
    if out is not None or not _is_tensor(index):
        return None
    return "index_select", (input, index), dict(dim=int(dim))


@_converts(torch.gather, "gather")
def _f_gather(input, dim, index, *, sparse_grad=False, out=None):
    if out is not None or sparse_grad or not _is_tensor(index):
        return None
    return "gather", (input, index), dict(dim=int(dim))


# torch results that nest what the canonical op returns flat: {op: {index into torch's result: index into
# the op's tuple}}. nn.LSTM returns (output, (h_n, c_n)); the canonical lstm returns (output, h_n, c_n).
NESTED_RESULTS: dict[str, dict[int, Any]] = {"lstm": {1: slice(1, 3)}}
# fields of torch's named results (torch.return_types): {op: {field: index into the op's tuple}}
RESULT_FIELDS: dict[str, dict[str, int]] = {op: {"values": 0, "indices": 1} for op in ("topk", "max_dim", "min_dim")}


@_converts(getattr)
def _f_result_field(obj, name, *default):
    """`torch.topk(x, k).values`: a field of a named result is an item of the op's tuple."""
    if isinstance(obj, Node) and name in RESULT_FIELDS.get(obj.op, {}):
        return "getitem", (obj,), dict(index=RESULT_FIELDS[obj.op][name])
    return None


# --- modules -----------------------------------------------------------------------------------------

def _p(path: str, name: str, module: nn.Module) -> Param | None:
    return Param(f"{path}.{name}") if getattr(module, name, None) is not None else None


@_converts_module(nn.Conv3d, nn.Conv2d, nn.Conv1d)
def _mod_conv(m: nn.Module, path: str, x):
    if m.padding_mode != "zeros":
        return None
    op = f"conv{len(m.kernel_size)}d"
    return op, (x, _p(path, "weight", m), _p(path, "bias", m)), dict(
        stride=tuple(m.stride), padding=m.padding if isinstance(m.padding, str) else tuple(m.padding),
        dilation=tuple(m.dilation), groups=m.groups)


@_converts_module(nn.Linear)
def _mod_linear(m: nn.Linear, path: str, x):
    return "linear", (x, _p(path, "weight", m), _p(path, "bias", m)), {}


@_converts_module(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _mod_bn(m: nn.modules.batchnorm._BatchNorm, path: str, x):
    tracked = m.track_running_stats and m.running_mean is not None
    return "batch_norm", (x, _p(path, "running_mean", m), _p(path, "running_var", m), _p(path, "weight", m),
                          _p(path, "bias", m), _p(path, "num_batches_tracked", m) if tracked else None), dict(
        eps=m.eps, momentum=m.momentum, training=None if tracked else True)


@_converts_module(nn.LayerNorm)
def _mod_ln(m: nn.LayerNorm, path: str, x):
    return "layer_norm", (x, _p(path, "weight", m), _p(path, "bias", m)), dict(
        normalized_shape=tuple(m.normalized_shape), eps=m.eps)


@_converts_module(nn.GroupNorm)
def _mod_gn(m: nn.GroupNorm, path: str, x):
    return "group_norm", (x, _p(path, "weight", m), _p(path, "bias", m)), dict(num_groups=m.num_groups, eps=m.eps)


@_converts_module(nn.Embedding)
def _mod_embedding(m: nn.Embedding, path: str, x):
    return "embedding", (x, Param(f"{path}.weight")), dict(
        padding_idx=m.padding_idx, max_norm=m.max_norm, norm_type=m.norm_type,
        scale_grad_by_freq=m.scale_grad_by_freq, sparse=m.sparse)


_SIMPLE_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
                   nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.Identity: "identity"}


@_converts_module(*_SIMPLE_MODULES)
def _mod_simple(m: nn.Module, path: str, x, *args, **kwargs):
    return _SIMPLE_MODULES[type(m)], (x,), {}


@_converts_module(nn.GELU)
def _mod_gelu(m: nn.GELU, path: str, x):
    return "gelu", (x,), dict(approximate=m.approximate)


@_converts_module(nn.LeakyReLU)
def _mod_leaky(m: nn.LeakyReLU, path: str, x):
    return "leaky_relu", (x,), dict(negative_slope=m.negative_slope)


@_converts_module(nn.Hardtanh)
def _mod_hardtanh(m: nn.Hardtanh, path: str, x):
    return _f_hardtanh(x, m.min_val, m.max_val)


@_converts_module(nn.Softmax, nn.LogSoftmax)
def _mod_softmax(m: nn.Module, path: str, x):
    if m.dim is None:
        return None
    return ("softmax" if isinstance(m, nn.Softmax) else "log_softmax"), (x,), dict(dim=m.dim)


@_converts_module(nn.Dropout, nn.Dropout1d, nn.Dropout2d)
def _mod_dropout(m: nn.Module, path: str, x):
    if type(m) is not nn.Dropout:
        return None
    return "dropout", (x,), dict(p=m.p, training=None)


@_converts_module(nn.MaxPool3d, nn.MaxPool2d, nn.MaxPool1d)
def _mod_maxpool(m: nn.Module, path: str, x):
    fn = {nn.MaxPool3d: _f_max_pool3d, nn.MaxPool2d: _f_max_pool2d}.get(type(m), _f_max_pool1d)
    return fn(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)


@_converts_module(nn.AvgPool2d)
def _mod_avgpool2d(m: nn.AvgPool2d, path: str, x):
    return _f_avg_pool2d(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                         m.divisor_override)


@_converts_module(nn.AvgPool3d)
def _mod_avgpool3d(m: nn.AvgPool3d, path: str, x):
    return _f_avg_pool3d(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                         m.divisor_override)


@_converts_module(nn.AvgPool1d)
def _mod_avgpool1d(m: nn.AvgPool1d, path: str, x):
    return _f_avg_pool1d(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad)


@_converts_module(nn.AdaptiveAvgPool2d)
def _mod_aap2d(m: nn.AdaptiveAvgPool2d, path: str, x):
    return _f_adaptive_avg_pool2d(x, m.output_size)


@_converts_module(nn.AdaptiveAvgPool1d)
def _mod_aap1d(m: nn.AdaptiveAvgPool1d, path: str, x):
    return _f_adaptive_avg_pool1d(x, m.output_size)


@_converts_module(nn.AdaptiveAvgPool3d)
def _mod_aap3d(m: nn.AdaptiveAvgPool3d, path: str, x):
    return _f_adaptive_avg_pool3d(x, m.output_size)


@_converts_module(nn.AdaptiveMaxPool3d)
def _mod_amp3d(m: nn.AdaptiveMaxPool3d, path: str, x):
    return _f_adaptive_max_pool3d(x, m.output_size, m.return_indices)


@_converts_module(nn.AdaptiveMaxPool2d)
def _mod_amp2d(m: nn.AdaptiveMaxPool2d, path: str, x):
    return _f_adaptive_max_pool2d(x, m.output_size, m.return_indices)


@_converts_module(nn.Flatten)
def _mod_flatten(m: nn.Flatten, path: str, x):
    return "flatten", (x,), dict(start_dim=m.start_dim, end_dim=m.end_dim)


@_converts_module(nn.Upsample)
def _mod_upsample(m: nn.Upsample, path: str, x):
    return _f_interpolate(x, m.size, m.scale_factor, m.mode, m.align_corners, m.recompute_scale_factor)


@_converts_module(nn.ConvTranspose1d, nn.ConvTranspose2d)
def _mod_conv_transpose(m: nn.Module, path: str, x, output_size=None):
    if m.padding_mode != "zeros" or not (isinstance(x, Node) and isinstance(x.meta, TensorMeta)):
        return None
    n = 2 if isinstance(m, nn.ConvTranspose2d) else 1
    output_padding = m.output_padding
    if output_size is not None:  # torch derives the output padding from the requested size
        output_padding = m._output_padding(torch.empty(x.meta.shape, device="meta"), list(static_value(output_size)),
                                           m.stride, m.padding, m.kernel_size, n, m.dilation)
    return _conv_transpose(n, x, _p(path, "weight", m), _p(path, "bias", m), m.stride, m.padding, output_padding,
                           m.groups, m.dilation)


@_converts_module(nn.RMSNorm)
def _mod_rms_norm(m: nn.RMSNorm, path: str, x):
    return "rms_norm", (x, _p(path, "weight", m)), dict(normalized_shape=tuple(m.normalized_shape), eps=m.eps)


@_converts_module(nn.InstanceNorm1d, nn.InstanceNorm2d)
def _mod_instance_norm(m: nn.modules.instancenorm._InstanceNorm, path: str, x):
    if not (isinstance(x, Node) and isinstance(x.meta, TensorMeta)) or len(x.meta.shape) != m._get_no_batch_dim() + 1:
        return None  # unbatched input: the module adds and removes a batch dim around the call
    tracked = m.track_running_stats and m.running_mean is not None
    return "instance_norm", (x, _p(path, "running_mean", m) if tracked else None,
                             _p(path, "running_var", m) if tracked else None, _p(path, "weight", m),
                             _p(path, "bias", m)), dict(use_input_stats=None, momentum=m.momentum, eps=m.eps,
                                                        training=None)


@_converts_module(nn.PixelShuffle)
def _mod_pixel_shuffle(m: nn.PixelShuffle, path: str, x):
    return _f_pixel_shuffle(x, m.upscale_factor)


@_converts_module(nn.PixelUnshuffle)
def _mod_pixel_unshuffle(m: nn.PixelUnshuffle, path: str, x):
    return _f_pixel_unshuffle(x, m.downscale_factor)


@_converts_module(nn.LSTM, nn.GRU)
def _mod_rnn(m: nn.LSTM | nn.GRU, path: str, input, hx=None):
    """Batched tensor input only (a PackedSequence or an unbatched sequence keeps the module opaque)."""
    if not (isinstance(input, Node) and isinstance(input.meta, TensorMeta) and len(input.meta.shape) == 3):
        return None
    weights = tuple(Param(f"{path}.{name}") for name in m._flat_weights_names)
    attrs = dict(hidden_size=m.hidden_size, num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first,
                 bidirectional=m.bidirectional, dropout=float(m.dropout), training=None)
    if isinstance(m, nn.LSTM):
        return "lstm", (input, tuple(hx) if isinstance(hx, list) else hx, *weights), dict(attrs, proj_size=m.proj_size)
    return "gru", (input, hx, *weights), attrs


# --- the tracer -----------------------------------------------------------------------------------------

def _autocast_state() -> tuple:
    return tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))


class _Tracer(fx.Tracer):
    """fx tracer that records the module path and user source line of every node."""

    def __init__(self, leaf_modules: Sequence[Any], *, inner: nn.Module | None = None,
                 qual: Callable[[str], str] = str):
        super().__init__(autowrap_functions=tuple(_WRAPPED.values()))
        # fx's own record_stack_traces symbolizes the whole stack per node (about a second a node
        # here); one walk up the frames to the first user frame is all we need.
        self._leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self._leaf_names = {t for t in leaf_modules if isinstance(t, str)}
        self._leaf_ids = {id(t) for t in leaf_modules if isinstance(t, nn.Module)}
        self._path_stack: list[tuple[str, nn.Module]] = []
        self.failed_in: tuple[str, nn.Module] | None = None
        self._inner = inner  # a call traced on its own (ir.decompose): the module called, traced into
        self._qual = qual  # its qualified names -> the model's
        # `with torch.autocast(...)` in forward switches a global mode fx does not record: the graph would
        # compute in the model's dtype what the model computes in another one (the first frame it began at)
        self._autocast_outside = _autocast_state()
        self.autocast_at: Any = None

    def is_user_leaf(self, m: nn.Module, qualname: str) -> bool:
        """A module the user asked to keep as one call (`leaf_modules`): never traced into or decomposed."""
        return (isinstance(m, self._leaf_types) if self._leaf_types else False) or \
            self._qual(qualname) in self._leaf_names or id(m) in self._leaf_ids

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if m is self._inner:
            return False
        if self.is_user_leaf(m, qualname) or type(m) in _MODULES:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self._path_stack.append((path, m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module is the one to blame
                self.failed_in = (path, m)
            raise
        finally:
            self._path_stack.pop()

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        if self.autocast_at is None and _autocast_state() != self._autocast_outside:
            self.autocast_at = _user_frame(traceback.extract_stack(sys._getframe(1)))
        if self._path_stack:
            node.meta["slimfx_module_path"] = self._path_stack[-1][0]
        frame = sys._getframe(1)
        # Nodes fx makes itself (placeholders, the output) have no user line: the walk stops where tracing
        # started, before it reaches capture()'s caller (the driver, the CLI), which says nothing of the model.
        while frame is not None and is_internal_file(frame.f_code.co_filename) and frame.f_code not in TRACE_ENTRIES:
            frame = frame.f_back
        if frame is not None and frame.f_code not in TRACE_ENTRIES:
            node.meta["slimfx_source"] = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
        return node


# Functions that start a trace: a node's source-line walk stops at them (ir.decompose adds its own).
TRACE_ENTRIES: set[Any] = set()


# torch's own files and slimfx.ir's. A directory prefix ends with a separator: torch's directory
# `.../site-packages/torch` is also a prefix of `.../site-packages/torchvision` (issue #15 item 10).
_INTERNAL_DIRS = tuple(os.path.join(os.path.dirname(f), "") for f in (torch.__file__, __file__))


def is_internal_file(filename: str) -> bool:
    """True for files of torch itself and of slimfx.ir (never the model's: torchvision, timm, the user's).
    torch.export writes some of its own frames relative to site-packages (`torch/fx/passes/...`)."""
    return filename.startswith(_INTERNAL_DIRS) or (not os.path.isabs(filename)
                                                   and filename.split(os.sep, 1)[0] == "torch")


def _user_frame(tb_frames: list[traceback.FrameSummary]) -> traceback.FrameSummary | None:
    user = [f for f in tb_frames if not is_internal_file(f.filename)]
    return user[-1] if user else None


def _format_frame(f: traceback.FrameSummary | None) -> str:
    if f is None:
        return "unknown location"
    line = (f.line or linecache.getline(f.filename, f.lineno or 0)).strip()
    return f"{f.filename}:{f.lineno} (`{line}`)"


def _source_of(fx_node: fx.Node) -> str | None:
    return fx_node.meta.get("slimfx_source")


@contextlib.contextmanager
def no_trace_residue(model: nn.Module) -> Iterator[None]:
    """Leave the model's own state as it was before a trace: a forward that caches what it computes in a
    module attribute (timm's levit: `self.attention_bias_cache[str(device)] = ...` in eval mode) would keep a
    torch.fx Proxy there, and the next trace (a second capture, a decomposed call) would read a node of the
    old graph. Restores each module's public attributes and the contents of its dicts and lists."""
    modules = list(model.modules()) if isinstance(model, nn.Module) else []  # (a pattern is a function)
    saved = []
    for m in modules:
        for k, v in m.__dict__.items():
            if not k.startswith("_"):
                saved.append((m, k, v, dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else None))
    keys = {id(m): set(m.__dict__) for m in modules}
    try:
        yield
    finally:
        for m, k, v, content in saved:
            m.__dict__[k] = v
            if isinstance(v, dict):
                v.clear()
                v.update(content)
            elif isinstance(v, list):
                v[:] = content
        for m in modules:
            for k in set(m.__dict__) - keys.get(id(m), set()):
                if not k.startswith("_"):  # set during the trace
                    del m.__dict__[k]


def _trace(model: nn.Module, leaf_modules: Sequence[Any], concrete_args: dict | None) -> fx.GraphModule:
    tracer = _Tracer(leaf_modules)
    try:
        with no_trace_residue(model):
            fx_graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as e:  # noqa: BLE001 - any tracing failure is reported as a CaptureError
        frames = traceback.extract_tb(e.__traceback__)
        frame = _user_frame(frames)
        path, mod = tracer.failed_in or ("", model)
        mod_desc = f"{type(mod).__name__}" + (f" at '{path}'" if path else " (the top-level model)")
        if path or not isinstance(mod, nn.Module):
            how = (f"keeping that module opaque with ir.capture(..., leaf_modules=[{type(mod).__name__}]) (it still "
                   "runs, but passes cannot look inside it) or ")
            tail = ""
        else:  # the top-level forward itself (a detector's per-image loops, box decoding, NMS): no module to keep
            children = [k for k, _ in mod.named_children()]
            here = f"{', '.join(children[:8])}{', ...' if len(children) > 8 else ''}"
            how = ""
            tail = (" Or compile only the part that computes on tensors alone, such as a detector's backbone: return "
                    f"that submodule (here: {here}) and an input for it from your model file, and keep the rest of "
                    "the forward in Python around the compiled file.") if children else ""
        raise CaptureError(
            f"torch.fx cannot trace {mod_desc}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
            f"  at {_format_frame(frame)}\n"
            "  Where that is Python control flow or indexing that depends on tensor values (symbolic tracing "
            "cannot follow those), compute both branches in the model's code and pick with torch.where (or use "
            f"torch.cond). From Python you can also capture it yourself, {how}fixing the argument that drives "
            "the branch with ir.capture(..., concrete_args={'name': value}), and pass the graph to slimfx.compile."
            + tail
        ) from e
    if tracer.autocast_at is not None:
        raise CaptureError(
            f"{type(model).__name__} computes under torch.autocast (at {_format_frame(tracer.autocast_at)}), which "
            "torch.fx does not record: the graph would compute in the weights' dtype what the model computes in the "
            "autocast dtype. Remove the autocast region from forward (slimfx compiles float32 and float16 models: "
            "for float16, convert the model with .half() in your model factory).")
    return fx.GraphModule(tracer.root, fx_graph, type(model).__name__)


TRACE_ENTRIES.add(_trace.__code__)


def _record(gm: fx.GraphModule, inputs: Sequence[Any], current: list[fx.Node] | None = None,
            values: dict[fx.Node, Any] | None = None) -> dict[fx.Node, Any]:
    """Run the traced module (in eval mode, without gradients) recording every node's value (into
    `values`) and the node running (in `current`)."""
    values = {} if values is None else values
    current = current if current is not None else []

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            current[:] = [n]
            values[n] = out = super().run_node(n)
            return out

    modes = {m: m.training for m in gm.modules()}
    gm.eval()  # shapes are the same in either mode, and eval never updates the model's statistics
    try:
        with torch.no_grad():
            _Recorder(gm).run(*inputs)
    finally:
        for m, mode in modes.items():  # restore each module's own mode (users may mix them)
            m.training = mode
    return values


def _run_shape_prop(gm: fx.GraphModule, inputs: tuple, model: nn.Module,
                    names: Sequence[str] = ()) -> dict[fx.Node, Any]:
    """Run the traced module on the example inputs, recording every node's value."""
    current: list[fx.Node] = []
    values: dict[fx.Node, Any] = {}
    try:
        return _record(gm, inputs, current, values)
    except Exception as e:  # noqa: BLE001 - any failure here means the inputs do not fit
        raise CaptureError(_misfit_message(model, current[0], values, e, inputs, names, gm)) from None


def _prober(gm: fx.GraphModule, inputs: Sequence[Any], dims: Sequence[dict[int, str]] | None,
            optional: set[str] = frozenset()) -> Callable[[], dict | None]:
    """The values of every node at other sizes of the symbolic dims `dims` (one {dim: symbol} per input; None:
    batch, and sequence for token inputs), to tell shape values that follow those sizes from fixed ones; the
    `optional` symbols are left at their size when the model does not run at another; None when the model runs
    at no other size (all of its shapes are fixed)."""
    from slimfx.ir.symdims import at_sizes, default_dims, step_sizes

    if dims is None:
        dims = [default_dims(x) for x in inputs]
        optional = {"seq"}

    def run() -> dict[fx.Node, Any] | None:
        attempts = [list(dims)]
        if any(s in optional for d in dims for s in d.values()):
            attempts.append([{i: s for i, s in d.items() if s not in optional} for d in dims])
        for attempt in attempts:
            if not any(attempt):
                continue
            try:
                return _record(gm, list(at_sizes(inputs, attempt, step_sizes(inputs, attempt))))
            except Exception as e:  # noqa: BLE001 - the model fixes that size; try the next, else none
                _log.debug("capture: %s does not run at other sizes of %s (%s: %s)", gm.__class__.__name__,
                           attempt, type(e).__name__, e)
        return None
    return run


def _misfit_message(model: nn.Module, n: fx.Node, values: dict[fx.Node, Any], error: Exception, inputs: tuple,
                    names: Sequence[str], gm: fx.GraphModule) -> str:
    """The example inputs do not fit: name the layer that failed, what it got, and the inputs given."""
    where = n.meta.get("slimfx_module_path") or (n.target if n.op == "call_module" else "")
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        what = f"layer '{n.target}' ({_short_repr(mod)})"
    else:
        what = f"'{n.name}' ({getattr(n.target, '__name__', n.target)}{f' in module {where!r}' if where else ''})"
    src = _source_of(n)
    got = [describe_value(values[a]) for a in n.all_input_nodes if isinstance(values.get(a), torch.Tensor)]
    first = str(error).splitlines()[0] if str(error) else ""
    hint = ""
    zero_d = [nm for nm, v in zip(names, inputs) if isinstance(v, torch.Tensor) and v.dim() == 0]
    if zero_d:
        hint = (f" Example input '{zero_d[0]}' is a 0-d tensor (a single number), but slimfx takes dim 0 of "
                "each input as the batch: give it a batch dimension (e.g. shape [1, features]).")
    return (f"the example inputs do not fit {type(model).__name__}: {what}"
            f"{', ' + src if src else ''} fails{' on ' + ', '.join(got) if got else ''}: "
            f"{type(error).__name__}: {first}.{hint} Example inputs given: {describe_inputs(inputs, names)}. "
            "Give example inputs of the shape and dtype forward expects (the example inputs your model "
            "factory returns, or example_inputs= in Python).")


def _short_repr(mod: nn.Module) -> str:
    text = repr(mod).splitlines()[0]
    return text if len(text) <= 80 else text[:77] + "..."


def describe_value(v: Any) -> str:
    """`float32[1, 64]` for a tensor (with its device when not the CPU), a short repr otherwise."""
    if isinstance(v, torch.Tensor):
        dev = "" if v.device.type == "cpu" else f" on {v.device}"
        return f"{str(v.dtype).replace('torch.', '')}[{', '.join(map(str, v.shape))}]{dev}"
    text = "None" if v is None else f"{type(v).__name__} {v!r}"
    return text if len(text) <= 60 else text[:57] + "..."


def describe_inputs(inputs: Sequence[Any], names: Sequence[str] = ()) -> str:
    names = list(names) + [f"#{i}" for i in range(len(names), len(inputs))]
    return "(" + ", ".join(f"{nm}: {describe_value(v)}" for nm, v in zip(names, inputs)) + ")" if inputs \
        else "()"


# --- what the user gave, checked before any work ----------------------------------------------------------

_FLOAT_DTYPES = (torch.float32, torch.float16)
_DTYPE_WHY = {
    torch.float64: "onnxruntime's CPU provider has no float64 kernels for Conv and pooling, and quantization "
                   "works from float32",
    torch.bfloat16: "ONNX Conv and onnxruntime's CPU kernels do not take bfloat16",
}


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def materialize_lazy(model: nn.Module, inputs: tuple, kwargs: dict[str, Any] | None = None) -> None:
    """Give lazy modules (nn.LazyLinear, LazyConv2d) never called yet their shapes, as torch documents: one call of
    the model on the example inputs (eval mode, no gradients; the mode is restored). A trace makes no real call,
    and a parameter without a shape can be neither counted, hooked past nor exported."""
    from torch.nn.parameter import is_lazy

    lazy = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if is_lazy(t)]
    if not lazy:
        return
    _log.info("capture: %s has uninitialized lazy parameters (%s); running it once on the example inputs to "
              "shape them", type(model).__name__, lazy[0])
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(*inputs, **(kwargs or {}))
    except Exception as e:  # noqa: BLE001 - reported with what to do
        raise CaptureError(
            f"{type(model).__name__} has uninitialized lazy parameters ('{lazy[0]}'), which get their shapes on "
            f"the model's first call, and that call on the example inputs failed ({type(e).__name__}: {e}). Give "
            "example inputs the model runs on, or call it once in your model factory.") from e
    finally:
        model.train(training)


def _check_model(model: nn.Module) -> torch.dtype | None:
    """Refuse what cannot be compiled before any work: weights without values (meta device) or off the CPU,
    float64/bfloat16 or mixed float dtypes. Returns the model's float dtype (None: no float state)."""
    name = type(model).__name__
    state = list(model.named_parameters()) + list(model.named_buffers())
    meta = [k for k, t in state if t.device.type == "meta"]
    if meta:
        raise CaptureError(
            f"{name} has {len(meta)} parameter(s)/buffer(s) on the 'meta' device (e.g. '{meta[0]}'): they have "
            "shapes but no values, so there is nothing to compile. Load real weights first: build the model on "
            "the CPU, or materialize it (model.to_empty(device='cpu')) and load its state dict, in your model "
            "factory or before calling slimfx.")
    off = [(k, t.device) for k, t in state if t.device.type != "cpu"]
    if off:
        raise CaptureError(
            f"{name} has parameter(s)/buffer(s) on {off[0][1]} (e.g. '{off[0][0]}'); slimfx captures, compiles "
            "and validates on the CPU. Move the model to the CPU first (return model.cpu() from your model "
            "factory, or call model.cpu() before slimfx).")
    floats: dict[torch.dtype, str] = {}
    for k, t in state:
        if t.is_floating_point():
            floats.setdefault(t.dtype, k)
    for dt, k in floats.items():
        if dt not in _FLOAT_DTYPES:
            others = [d for d in floats if d in _FLOAT_DTYPES]  # a float32 model with a float64 buffer, say
            what = (f"is {_dtype_name(others[0])} but holds {_dtype_name(dt)} tensors" if others
                    else f"is {_dtype_name(dt)}")
            raise CaptureError(
                f"{name} {what} (e.g. '{k}'); slimfx compiles float32 and float16 models "
                f"({_DTYPE_WHY.get(dt, 'ONNX export and quantization need them')}). Convert the model with "
                ".float() in your model factory (or before calling slimfx), with float32 example inputs.")
    if len(floats) > 1:
        parts = " and ".join(f"{_dtype_name(dt)} ('{k}')" for dt, k in floats.items())
        raise CaptureError(
            f"{name} mixes float dtypes: {parts}. slimfx compiles a model in one float dtype; convert the whole "
            "model with .float() (or .half()) in your model factory or before calling slimfx.")
    return next(iter(floats), None)


def _check_examples(model: nn.Module, inputs: tuple, kwargs: dict[str, Any], model_dtype: torch.dtype | None,
                    names: Sequence[str]) -> None:
    """Refuse example inputs that cannot describe the model: off the CPU, an empty batch, a float dtype
    slimfx does not compile or that differs from the model's."""
    name = type(model).__name__
    named = list(zip(list(names) + [f"#{i}" for i in range(len(names), len(inputs))], inputs)) + list(kwargs.items())
    for arg, v in named:
        if not isinstance(v, torch.Tensor):
            continue
        if v.device.type != "cpu":
            raise CaptureError(
                f"example input '{arg}' of {name} is on {v.device}"
                f"{' (no values)' if v.device.type == 'meta' else ''}; give real example tensors on the CPU "
                "(the example inputs your model factory returns, or example_inputs= in Python).")
        if v.dim() >= 1 and v.shape[0] == 0:
            raise CaptureError(
                f"example input '{arg}' of {name} has batch size 0 ({describe_value(v)}): capture runs the model "
                "on its example inputs to learn every shape, and an empty batch shows nothing. Give at least "
                "one sample (the example inputs your model factory returns, or example_inputs= in Python).")
        if v.is_floating_point():
            if v.dtype not in _FLOAT_DTYPES:
                raise CaptureError(
                    f"example input '{arg}' of {name} is {_dtype_name(v.dtype)}; slimfx compiles float32 and "
                    f"float16 models ({_DTYPE_WHY.get(v.dtype, 'ONNX export needs them')}). Give float32 example "
                    "inputs (x.float()) and a float32 model (model.float()) from your model factory.")
            if model_dtype is not None and v.dtype != model_dtype:
                raise CaptureError(
                    f"example input '{arg}' of {name} is {_dtype_name(v.dtype)} but the model's weights are "
                    f"{_dtype_name(model_dtype)}; give example inputs in the model's dtype "
                    f"(x.to(torch.{_dtype_name(model_dtype)})) from your model factory or in example_inputs.")


def _mode_dependent(model: nn.Module) -> list[str]:
    """Modules of `model` that compute something else in training mode than in eval mode."""
    found = []
    for path, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            found.append(f"dropout '{path}'")
        elif isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            found.append(f"{type(m).__name__} '{path}' (batch statistics)")
        elif not type(m).__module__.startswith("torch.") and _reads_training(type(m)):
            found.append(f"{type(m).__name__} '{path or '(the model)'}' (its forward reads self.training)")
    return found


def _reads_training(cls: type) -> bool:
    try:
        return "self.training" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _check_mode(model: nn.Module) -> None:
    """For an inference capture: refuse a model left in training mode where that changes its outputs."""
    if not model.training:
        return
    found = _mode_dependent(model)
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise CaptureError(
            f"{type(model).__name__} is in training mode, where {', '.join(found[:3])}{more} compute something "
            "else than at inference. slimfx compiles the model's inference behaviour: call model.eval() before "
            "compiling (a model factory given to the CLI may return either; the CLI calls eval()).")


def _check_outputs(graph: Graph, model: nn.Module) -> None:
    """Every output leaf must be a tensor: ONNX, TorchScript and the validation compare tensors."""
    name = type(model).__name__
    if graph.outputs is None:
        raise CaptureError(
            f"{name}.forward returns None; slimfx compiles models that return tensors (a tensor, or nested "
            "tuples/lists/dicts of tensors). Make forward return its result (in your model factory, return a "
            "model whose forward does).")
    leaves = list(output_leaves(graph.outputs))
    if not leaves:
        raise CaptureError(f"{name}.forward returns no tensors ({graph.outputs!r}); slimfx compiles models that "
                           "return tensors (a tensor, or nested tuples/lists/dicts of tensors).")
    bad = [(path, v) for path, v in leaves if not (isinstance(v, Node) and isinstance(v.meta, TensorMeta))]
    if bad:
        def what(v: Any) -> str:
            if isinstance(v, Node):
                return f"a non-tensor value (%{v.name}, op '{v.op}', {v.where()})"
            if isinstance(v, Param):
                return f"the parameter '{v.name}' itself"
            return "None" if v is None else f"the constant {type(v).__name__} {v!r}"[:80]
        listed = "; ".join(f"{path} is {what(v)}" for path, v in bad[:4])
        raise CaptureError(
            f"{name}.forward returns values that are not tensors: {listed}. slimfx compiles models that return "
            "tensors (a tensor, or nested tuples/lists/dicts of tensors) and does not drop outputs, which would "
            "change the model's interface. Return only the tensors (in your model factory, return a wrapper "
            "module whose forward returns them).")


def output_leaves(outputs: Any, path: str = "output") -> Iterator[tuple[str, Any]]:
    """(path, leaf) for every leaf of an output structure: `output`, `output[1]`, `output['logits']`...
    (ir.metrics.named_leaves: the one naming of outputs that exporters, validation and metrics share)."""
    from slimfx.ir.metrics import named_leaves

    return named_leaves(outputs, path)


def output_names(outputs: Any) -> list[str]:
    """The path of each output leaf, in the flattened order the exporters and validation use."""
    return [path for path, _ in output_leaves(outputs)]


CAPTURE_METHODS = ("auto", "fx", "export")


def unwrap(model: nn.Module) -> nn.Module:
    """The model a wrapper that computes exactly what it wraps stands for: `torch.compile(model)` (an
    OptimizedModule, whose forward neither front end can trace), `nn.DataParallel` / DistributedDataParallel
    (which scatter the batch over devices and gather it back)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def capture(model: nn.Module, example_inputs: Any = (), *, example_kwargs: dict[str, Any] | None = None,
            method: str = "auto", leaf_modules: Sequence[Any] = (),
            concrete_args: dict[str, Any] | None = None, for_inference: bool = False,
            dynamic_dims: Any = None) -> Graph:
    """Capture `model` into the canonical IR, with shapes from the example inputs.

    `method="fx"` traces with torch.fx (`leaf_modules`, classes, instances or qualified names, stay
    opaque; `concrete_args` fixes forward arguments); `"export"` uses torch.export (ATen ops mapped
    onto the same canonical ops, see ir.capture_export); `"auto"` tries fx, falls back to export and
    records which one worked in `graph.capture_method`. `example_kwargs` are keyword inputs
    (`input_ids=`, `attention_mask=`): graph inputs keep their names.

    Before any tracing, what cannot be compiled is refused with a CaptureError that says what to do:
    weights on the meta device or off the CPU, float64/bfloat16 or mixed float dtypes, example inputs
    of the wrong number, dtype or device, or with an empty batch; after it, outputs that are not
    tensors (None, constants). The graph keeps the model's mode (`graph.training`; shapes are always
    propagated in eval mode). `for_inference=True` (a compiler's capture) also refuses a model left in
    training mode where dropout, batch statistics or a `self.training` branch change its outputs.

    `dynamic_dims` says which input dims stay symbolic (ir.symdims: None = batch, and sequence for token
    inputs; names like "batch,height,width"; or {input: {dim: name}}); they are recorded on the graph
    inputs' `TensorMeta.sym`, and every node's meta names the symbolic dims it has.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture() needs a torch.nn.Module, got {type(model).__name__}")
    if method not in CAPTURE_METHODS:
        raise CaptureError(f"capture(method={method!r}) is not a capture method; use one of {CAPTURE_METHODS}")
    model = unwrap(model)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    model_dtype = _check_model(model)
    if for_inference:
        _check_mode(model)
    names = _input_names(model, inputs, kwargs, concrete_args)
    _check_examples(model, inputs, kwargs, model_dtype, names)
    materialize_lazy(model, inputs, kwargs)
    plan = _plan(model, inputs, kwargs, names, dynamic_dims)
    if method == "export":
        if leaf_modules or concrete_args:
            raise CaptureError("leaf_modules and concrete_args steer the torch.fx tracer; method='export' "
                               "takes neither (pass fixed arguments in example_kwargs instead)")
        from slimfx.ir.capture_export import capture_export

        graph = capture_export(model, inputs, kwargs, dims=plan.dims)
        return _finish(graph, model, plan)
    try:
        graph = _capture_fx(model, inputs, kwargs, leaf_modules, concrete_args, plan)
    except _FxTraceError as fx_error:
        if method == "fx":
            raise
        from slimfx.ir.capture_export import capture_export

        try:
            graph = capture_export(model, inputs, kwargs, dims=plan.dims)
        except CaptureError as export_error:
            raise CaptureError(f"neither capture front-end can capture {type(model).__name__}.\n"
                               f"- torch.fx: {fx_error}\n- torch.export: {export_error}") from export_error
        _log.info("capture: torch.fx could not trace %s (%s); captured it with torch.export instead",
                  type(model).__name__, str(fx_error).splitlines()[0])
    return _finish(graph, model, plan)


def _finish(graph: Graph, model: nn.Module, plan: Any) -> Graph:
    baked = bake_parametrizations(graph)
    if baked:
        _log.info("capture: parametrized weights computed once, for inference: %s", ", ".join(baked))
    _check_outputs(graph, model)
    return _settle_dims(graph, plan)


def _plan(model: nn.Module, inputs: tuple, kwargs: dict[str, Any], names: list[str], dynamic_dims: Any) -> Any:
    """The resolved symbolic dims (ir.symdims.DimPlan) of the graph inputs, keyed by name in graph order
    (positional inputs, then keyword ones in forward's order)."""
    from slimfx.ir.symdims import DimPlan, resolve_dynamic_dims

    order = list(inspect.signature(model.forward).parameters)
    kw = sorted(kwargs, key=lambda k: order.index(k) if k in order else len(order))
    all_names = list(names) + kw
    values = list(inputs) + [kwargs[k] for k in kw]
    if isinstance(dynamic_dims, DimPlan):
        return DimPlan({n: dynamic_dims.dims.get(n, {}) for n in all_names}, dynamic_dims.optional, values)
    return resolve_dynamic_dims(dynamic_dims, all_names, values)


def _settle_dims(graph: Graph, plan: Any) -> Graph:
    """Record the plan's symbolic dims on the graph inputs, without the optional ones (the default sequence
    dim) where the graph runs at no other size of them, and name the symbolic dims of every node."""
    from slimfx.ir.symdims import propagate_symbols, set_graph_dims

    dims = [plan.dims.get(n, {}) for n in plan.dims][:len(graph.inputs)]
    set_graph_dims(graph, dims)
    inputs = plan.examples[:len(graph.inputs)]
    for sym in plan.optional_symbols():
        if not propagate_symbols(graph, inputs, only=sym, check=True):
            _log.info("capture: %s does not run at another %s size; that dim stays fixed", graph.name, sym)
            dims = [{d: s for d, s in per.items() if s != sym} for per in dims]
            set_graph_dims(graph, dims)
    propagate_symbols(graph, inputs)
    return graph


def _input_names(model: nn.Module, inputs: tuple, kwargs: dict[str, Any],
                 concrete_args: dict[str, Any] | None) -> list[str]:
    """forward's parameter name for each positional example input; checks their number first."""
    params = inspect.signature(model.forward).parameters.values()
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    given, _ = _bind(model, inputs, kwargs, concrete_args)
    return list(given)[:len(inputs)]


class _FxTraceError(CaptureError):
    """torch.fx could not trace the model (as opposed to: the example inputs do not fit it)."""


def _bind(model: nn.Module, inputs: tuple, kwargs: dict[str, Any],
          concrete_args: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Map positional and keyword example inputs onto forward's parameters.

    Returns (given, concrete): the inputs by parameter name in signature order, and the fixed
    arguments: the user's concrete_args plus the default of every optional argument not given.
    """
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    concrete = dict(concrete_args or {})
    free = [p for p in params if p.kind != p.KEYWORD_ONLY and p.name not in concrete]
    required = [p for p in free if p.default is p.empty]
    kw_only = [p.name for p in params if p.kind == p.KEYWORD_ONLY and p.name not in concrete]
    if len(inputs) > len(free) or (not kwargs and len(inputs) < len(required)):
        names = ", ".join([p.name for p in free] + (["*", *kw_only] if kw_only else []))
        n_takes = f"{len(required)}" + ("" if len(required) == len(free) else f" to {len(free)}")
        raise CaptureError(
            f"{type(model).__name__}.forward({names}) takes {n_takes} input{'' if n_takes == '1' else 's'}"
            f"{' by position' if kw_only else ''}, "
            f"but {len(inputs)} example input{'' if len(inputs) == 1 else 's'} "
            f"{'was' if len(inputs) == 1 else 'were'} given: {describe_inputs(inputs, [p.name for p in free])}. "
            "Give one example input "
            "per argument of forward (the example inputs your model factory returns, or example_inputs= in "
            "Python)." + (f" {', '.join(map(repr, kw_only))} {'is' if len(kw_only) == 1 else 'are'} keyword-only: "
                          f"{_by_name(free, kw_only)}." if kw_only else ""))
    given = {p.name: v for p, v in zip(free, inputs)}
    for name, v in kwargs.items():
        if name in given or name in concrete or name not in {p.name for p in params}:
            why = ("is also given by position" if name in given else "is also in concrete_args" if name in concrete
                   else "is not a parameter of forward(" + ", ".join(p.name for p in params) + ")")
            raise CaptureError(f"example_kwargs[{name!r}] {why}; give each forward argument once")
        given[name] = v
    for p in params:
        if p.name not in given and p.name not in concrete:
            if p.default is p.empty and p.kind == p.KEYWORD_ONLY:
                raise CaptureError(f"{type(model).__name__}.forward needs its keyword-only argument {p.name!r}, "
                                   f"which no example input by position can give: {_by_name(free, [p.name])}")
            if p.default is p.empty:
                raise CaptureError(f"{type(model).__name__}.forward needs argument {p.name!r}; "
                                   "give it in example_inputs, example_kwargs or concrete_args")
            concrete[p.name] = p.default
    return {p.name: given[p.name] for p in params if p.name in given}, concrete


def _by_name(positional: list[inspect.Parameter], names: list[str]) -> str:
    """How to give forward's keyword-only arguments `names` from a model factory and from Python."""
    args = "(" + ", ".join(p.name for p in positional) + ("," if len(positional) == 1 else "") + ")"
    kw = "{" + ", ".join(f"{n!r}: ..." for n in names) + "}"
    return (f"give {'it' if len(names) == 1 else 'them'} by name: return (model, {args}, {kw}) from your model "
            f"factory, or pass example_kwargs={kw} in Python")


# Library hooks that only refresh a module attribute from the module's own tensors (`weight = weight_orig *
# weight_mask`): in eval mode the attribute fx reads is what the hook would compute, once refreshed.
def _refresh_hooks() -> tuple[type, ...]:
    from torch.nn.utils import prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return prune.BasePruningMethod, WeightNorm, SpectralNorm


def _hook_where(fn: Any) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial
    call = vars(type(fn)).get("__call__")  # a hook object (a class with __call__)
    code = getattr(fn, "__code__", None) or getattr(call, "__code__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{name} ({os.path.basename(code.co_filename)}:{code.co_firstlineno})" if code else name


def _forward_hooks(model: nn.Module) -> list[str]:
    """The forward hooks and pre-hooks torch.fx does not capture faithfully: symbolic tracing calls the top
    module's forward directly and records a leaf module (nn.Linear, a converter's class) as one call, so their
    hooks (and global ones, which apply to every module) never run; the hooks of other modules run on Proxies,
    where a hook's own checks (`isinstance(out, torch.Tensor)`) take another branch than on tensors. A graph
    captured without them computes something else than the model. Refresh-only library hooks (pruning, the old
    weight_norm / spectral_norm) are run once instead, in eval mode."""
    from torch.nn.modules import module as torch_module

    refresh = _refresh_hooks()
    found = []
    for fn in list(torch_module._global_forward_pre_hooks.values()) + list(torch_module._global_forward_hooks.values()):
        found.append(f"a global forward hook {_hook_where(fn)} (torch.nn.modules.module.register_module_forward_hook)")
    for path, m in model.named_modules():
        for kind, hooks in (("forward pre-hook", m._forward_pre_hooks), ("forward hook", m._forward_hooks)):
            for fn in list(hooks.values()):
                if isinstance(fn, refresh):
                    if not m.training:
                        with torch.no_grad():
                            fn(m, ())
                    continue
                where = f"'{path}' ({type(m).__name__})" if path else f"the model ({type(m).__name__})"
                found.append(f"a {kind} {_hook_where(fn)} on {where}")
    return found


def _capture_fx(model: nn.Module, inputs: tuple, kwargs: dict[str, Any], leaf_modules: Sequence[Any],
                concrete_args: dict[str, Any] | None, plan: Any = None) -> Graph:
    """The torch.fx front end: trace, propagate shapes on the example inputs, convert."""
    hooks = _forward_hooks(model)
    if hooks:
        raise _FxTraceError(
            f"torch.fx does not capture {'; '.join(hooks[:3])}{f' and {len(hooks) - 3} more' if len(hooks) > 3 else ''}, "
            "which may change what the model computes. torch.export runs them (ir.capture(..., method='export'), "
            "the automatic fallback); else apply what the hook does in forward, or remove it (handle.remove()) "
            "in your model factory.")
    user_leaf = _Tracer(leaf_modules).is_user_leaf
    if any(p.kind == p.VAR_POSITIONAL for p in inspect.signature(model.forward).parameters.values()):
        if kwargs:
            raise CaptureError(f"{type(model).__name__}.forward takes *args; pass example inputs by position")
        gm = _trace(model, leaf_modules, concrete_args)
        values = _run_shape_prop(gm, inputs, model)
        dims = list(plan.dims.values()) if plan is not None else None
        return _convert(gm, model, values, n_inputs=len(inputs), user_leaf=user_leaf,
                        probe=_prober(gm, inputs, dims, plan.optional_symbols() if plan is not None else set()))
    given, concrete = _bind(model, inputs, kwargs, concrete_args)
    try:
        gm = _trace(model, leaf_modules, concrete)
    except CaptureError as e:
        raise _FxTraceError(str(e)) from e.__cause__
    names = [p.name for p in inspect.signature(model.forward).parameters.values()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # fx makes one placeholder per forward parameter, in order (it may rename the concrete ones)
    baked = {ph: concrete[name] for ph, name in zip(placeholders, names) if name not in given}
    run_inputs = [baked[ph] if ph in baked else given[name] for ph, name in zip(placeholders, names)]
    values = _run_shape_prop(gm, tuple(run_inputs), model, names)
    graph = _convert(gm, model, values, n_inputs=len(given), baked=baked, user_leaf=user_leaf,
                     probe=_prober(gm, run_inputs, None if plan is None else
                                   [{} if ph in baked else plan.dims.get(name, {}) for ph, name in zip(placeholders, names)],
                                   plan.optional_symbols() if plan is not None else set()))
    graph.capture_method = "fx"
    return graph


def _convert(gm: fx.GraphModule, model: nn.Module, values: dict[fx.Node, Any], n_inputs: int,
             baked: dict[fx.Node, Any] | None = None, *, probe: Callable[[], dict[fx.Node, Any] | None] | None = None,
             user_leaf: Callable[[nn.Module, str], bool] | None = None) -> Graph:
    """The canonical IR of a traced module. With `values` (each fx node's value on the example inputs),
    shape values that do not change with the batch (or sequence) size are folded to constants and calls
    that have no converter are decomposed (ir.decompose); `probe()` gives the values at another size."""
    cv = _Converter(model, values, probe=probe, user_leaf=user_leaf)
    graph = cv.graph
    graph.name = type(model).__name__
    graph.training = model.training
    env: dict[fx.Node, Any] = {}
    placeholders_seen = 0
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        placeholders_seen += 1
        if baked is not None and n in baked:
            env[n] = baked[n]
        elif baked is None and placeholders_seen > n_inputs:
            # A defaulted forward argument that was not given: bake in its default value.
            env[n] = n.args[0] if n.args else None
        else:
            # The placeholder's target is forward's own argument name (fx renames `input` to `input_1`).
            env[n] = cv.record(graph.create_node("input", (), {}, name=str(n.target).lstrip("*"),
                                                 meta=meta_of(values.get(n))), n)
    graph.set_outputs(_tuple_results_as_tensors(graph, cv.convert(gm, env, _Scope())))
    if cv.folded:  # the constants a folded chain was made from (arange, then .to(float32), ...): only its end is read
        used = {p.name for n in graph for p in (*n.params(), *(r for r in iter_refs(n.attrs) if isinstance(r, Param)))}
        for name in cv.folded - used:
            del graph.params[name]
            graph.buffers.discard(name)
    return graph


# Calls whose result is not the same on every run: capture never folds them into constants.
NOT_FOLDED = ("rand", "dropout", "bernoulli", "normal", "uniform", "multinomial", "assert", "sym_")


def rebind(env: dict[fx.Node, Any], old: Node, new: Node) -> None:
    """After an in-place write captured as its functional op: every fx node that held the written tensor (the
    operand, and what aliases it: earlier in-place results, no-op calls) reads the new value from here on."""
    for k, v in env.items():
        if v is old:
            env[k] = new


class _Scope:
    """How the names of one traced (sub)module map onto the model's: the top level maps them as they
    are; a call traced on its own (ir.decompose) maps its root's `inner` to the called module's path."""

    def __init__(self, path: str | None = None, *, module_path: str | None = None, source: str | None = None,
                 name: str = "", gm: fx.GraphModule | None = None):
        self.path = path  # the called module's path (None: a function call, or the top level)
        self.module_path = module_path  # for nodes outside any module of the call
        self.source = source  # for nodes without a user line of their own
        self.name = name  # node-name prefix ("" at the top level)
        self.gm = gm

    def qual(self, target: str) -> str:
        """A qualified name of the traced root (`inner.out_proj.weight`) as the model's."""
        if not self.name:
            return target
        if target == "inner" or target.startswith("inner."):
            return (self.path or "") + target[len("inner"):]
        return f"{self.module_path + '.' if self.module_path else ''}{self.name}.{target}"

    def where(self, path: str | None) -> str | None:
        """The module path of a node recorded in module `path` of the traced root."""
        if not self.name:
            return path
        if path is None or path == "":
            return self.module_path
        return self.qual(path)


def is_plain_value(v: Any) -> bool:
    """A Python value that a shape computation makes (a number, torch.Size, dtype, ...), not a tensor."""
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format,
                                   torch.layout, type(Ellipsis))):
        return True
    if isinstance(v, slice):
        return all(is_plain_value(x) for x in (v.start, v.stop, v.step))
    if isinstance(v, (tuple, list)):
        return all(is_plain_value(x) for x in v)
    return False


# What a tensor tells of its shape (not of its values): capture folds these when they do not follow the batch.
_SHAPE_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "element_size", "is_floating_point",
                  "is_complex", "is_contiguous", "get_device"}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "is_quantized", "is_sparse"}

# Python arithmetic on shape values, as `scalar` fns (the same targets appear in torch.export programs).
SCALAR_TARGETS: dict[Any, str] = {
    operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "truediv",
    operator.floordiv: "floordiv", operator.mod: "mod", operator.pow: "pow", operator.neg: "neg", abs: "abs",
    operator.abs: "abs", math.sqrt: "sqrt", math.floor: "floor", math.ceil: "ceil", int: "int", float: "float",
    max: "max", min: "min", torch.sym_int: "int", torch.sym_float: "float", torch.sym_max: "max",
    torch.sym_min: "min", torch._sym_sqrt: "sqrt",
}


class _Converter:
    """fx nodes -> canonical IR nodes in one graph (the model's, and every call decomposed into it)."""

    def __init__(self, model: nn.Module, values: dict[fx.Node, Any], *,
                 probe: Callable[[], dict[fx.Node, Any] | None] | None = None,
                 user_leaf: Callable[[nn.Module, str], bool] | None = None):
        self.model = model
        self.graph = Graph()
        self.values = values  # fx node -> value on the example inputs (empty: tracing without running)
        self._probe_fn = probe
        self._probe: dict[fx.Node, Any] | None = None
        self._probed = probe is None
        self.user_leaf = user_leaf or (lambda m, q: False)
        self.named_params = dict(model.named_parameters(remove_duplicate=False))
        self.named_buffers = dict(model.named_buffers(remove_duplicate=False))
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self._shape_values: dict[fx.Node, bool] = {}
        self.fx_of: dict[Node, fx.Node] = {}  # IR node -> the fx node it was made from
        self.spliced: dict[Node, tuple[Any, Any]] = {}  # IR node made from a torch.export program -> values
        self.depth = 0
        self.decomposer: Any = None
        self.folded: set[str] = set()  # buffers capture made from calls that read no input (fold_constant)

    # -- values ------------------------------------------------------------------------------------
    @property
    def probe(self) -> dict[fx.Node, Any] | None:
        """fx node -> value at another batch (and sequence) size; None: there is none (every shape
        value is fixed). Run once, when a shape value or a decomposition first needs it."""
        if not self._probed:
            self._probed = True
            self._probe = self._probe_fn() if self._probe_fn is not None else None
        return self._probe

    def record(self, node: Node, fx_node: fx.Node) -> Node:
        self.fx_of[node] = fx_node
        return node

    def value_of(self, r: Node | Param, *, at_probe: bool = False) -> Any:
        """The value of an IR operand on the example inputs (or at the probe size; None: unknown)."""
        if isinstance(r, Param):
            return self.graph.params[r.name]
        if r in self.spliced:
            return self.spliced[r][1 if at_probe else 0]
        fx_node = self.fx_of.get(r)
        if at_probe:
            probe = self.probe
            return probe.get(fx_node) if probe is not None else None
        return self.values.get(fx_node)

    def shape_value(self, n: fx.Node) -> bool:
        """True when `n` computes a Python value from shapes only (a size, a rank, a dtype, arithmetic and
        comparisons of them), never from tensor data (`x.item()`, `int(x)`, `torch.equal(a, b)`)."""
        if n in self._shape_values:
            return self._shape_values[n]
        ok = n.op in ("call_function", "call_method") and n in self.values and is_plain_value(self.values[n])
        if ok:
            tensors = [a for a in n.all_input_nodes if not is_plain_value(self.values.get(a))]
            if n.op == "call_method" and n.target in _SHAPE_METHODS:
                ok = True
            elif n.op == "call_function" and n.target is getattr and n.args[1] in _SHAPE_ATTRS:
                ok = True
            elif n.op == "call_function" and n.target is len and tensors:
                ok = True
            else:  # Python on shape values only
                ok = not tensors and all(self.shape_value(a) for a in n.all_input_nodes
                                         if a.op in ("call_function", "call_method", "call_module"))
        self._shape_values[n] = ok
        return ok

    def static_value(self, n: fx.Node) -> tuple[bool, Any]:
        """(True, value) when `n` computes a Python value from shapes (a size, a rank, a dtype, a comparison
        of them) that is the same at every batch and sequence size: capture folds it into a constant."""
        if not self.shape_value(n):
            return False, None
        v = self.values[n]
        probe = self.probe
        if probe is None or n not in probe:
            return True, v
        p = probe[n]
        return (type(p) is type(v) and p == v), v

    def add_state(self, name: str, gm: fx.GraphModule, local: str) -> Param:
        if name not in self.graph.params:
            if name in self.named_params:
                self.graph.add_param(name, self.named_params[name].detach(), unique=False)
            elif name in self.named_buffers:
                self.graph.add_param(name, self.named_buffers[name].detach(), buffer=True, unique=False)
            else:
                obj = gm
                for part in local.split("."):
                    obj = getattr(obj, part)
                if not isinstance(obj, torch.Tensor):
                    raise CaptureError(f"attribute '{name}' read by the model is a {type(obj).__name__}, "
                                       "not a tensor; slimfx can only hold tensors in the params table")
                self.graph.add_param(name, obj.detach(), buffer=not isinstance(obj, nn.Parameter), unique=False)
        return Param(name)

    # -- conversion --------------------------------------------------------------------------------
    def convert(self, gm: fx.GraphModule, env: dict[fx.Node, Any], scope: _Scope) -> Any:
        """Convert the nodes of `gm` (its placeholders already in `env`); returns its output structure."""
        def lookup(a: Any) -> Any:
            return env[a] if isinstance(a, fx.Node) else a

        for n in gm.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                return fx.node.map_aggregate(n.args[0], lookup)
            if n.op == "get_attr":
                env[n] = self.add_state(scope.qual(n.target), gm, n.target)
                continue
            env[n] = self.node(n, fx.node.map_aggregate(n.args, lookup), fx.node.map_aggregate(n.kwargs, lookup),
                               scope)
            written = self.written_operand(n, scope)
            if written is not None and isinstance(env[n], Node) and env[n].op != "opaque" \
                    and isinstance(env.get(written), Node):
                rebind(env, env[written], env[n])
        return None

    def foldable(self, n: fx.Node, args: Any, kwargs: Any, value: Any) -> bool:
        """A call that makes a tensor from constants alone (no input, no model parameter: `torch.arange(d,
        device=w.device)`, a frequency table computed from it), not a random one: its value is the same on every
        run, so capture keeps the value (as the export front end folds such ATen ops)."""
        if not self.values or not isinstance(value, torch.Tensor) or n.op not in ("call_function", "call_method"):
            return False
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if any(k in name for k in NOT_FOLDED) or name == "empty":
            return False
        return all(isinstance(r, Param) and r.name in self.folded for r in iter_refs((args, kwargs)))

    def fold_constant(self, n: fx.Node, value: torch.Tensor, mpath: str | None, scope: _Scope) -> Param:
        name = (f"{mpath}." if mpath else "") + (f"{scope.name}_" if scope.name else "") + n.name
        p = self.graph.add_param(name, value.detach().clone(), buffer=True)
        self.folded.add(p.name)
        return p

    def written_operand(self, n: fx.Node, scope: _Scope) -> fx.Node | None:
        """The fx node an in-place call writes (`x.mul_(g)`, `F.relu(x, inplace=True)`, `nn.SiLU(inplace=True)`
        and the like): its first operand; None for any other call."""
        if not n.args or not isinstance(n.args[0], fx.Node):
            return None
        if n.op == "call_method":
            inplace = n.target.endswith("_") and not n.target.startswith("_")
        elif n.op == "call_module":
            inplace = getattr(self.modules.get(scope.qual(n.target)), "inplace", False) is True
        elif n.op == "call_function":
            name = getattr(n.target, "__name__", "")  # torch.relu_, F.relu_ (not operator.and_: `a & b`)
            inplace = n.kwargs.get("inplace") is True or (name.endswith("_") and not name.startswith("_")
                                                          and getattr(n.target, "__module__", None) != "_operator")
        else:
            inplace = False
        return n.args[0] if inplace else None

    def node(self, n: fx.Node, args: Any, kwargs: Any, scope: _Scope) -> Any:
        """The IR value of one call: a new node, an existing value (a no-op), or a constant."""
        static, value = self.static_value(n)
        if static:
            return value
        value = self.values.get(n)
        refs = any(isinstance(r, (Node, Param)) for r in iter_refs((args, kwargs)))
        if n.op != "call_module" and not refs and not isinstance(value, torch.Tensor):
            # Pure Python on constants (e.g. fx's checks of concrete_args): its value is known now.
            return value
        if n.op == "call_function" and n.target is operator.getitem and isinstance(args[0], (tuple, list, dict)):
            return args[0][args[1]]  # an item of a decomposed call's result
        src = _source_of(n) or scope.source
        mpath = scope.where(n.meta.get("slimfx_module_path"))
        if self.foldable(n, args, kwargs, value):
            return self.fold_constant(n, value, mpath, scope)
        converted = None
        if n.op == "call_module":
            qual = scope.qual(n.target)
            mod = self.modules[qual]
            mpath = qual
            conv = _MODULES.get(type(mod))
            if conv is not None:
                try:
                    converted = conv(mod, qual, *args, **kwargs)
                except TypeError:
                    converted = None
                if converted is not None:
                    for r in converted[1]:
                        if isinstance(r, Param):
                            self.add_state(r.name, scope.gm or self.model, r.name)
        elif n.op == "call_function" and n.target is operator.getitem:
            converted = _convert_getitem(args[0], args[1], self.values.get(n.args[0]) if
                                         isinstance(n.args[0], fx.Node) else None)
        elif n.op == "call_function" and n.target is getattr and args[1] == "shape":
            converted = ("shape", (args[0],), {})
        else:
            conv = converter_for(n)
            if conv is not None:
                try:
                    converted = conv(*args, **kwargs)
                except TypeError:
                    converted = None
        if converted is not None and converted[0] not in OPS:
            raise CaptureError(f"the capture converter for {n.target!r} returned op {converted[0]!r}, which is not in "
                               f"the op table; register it first: ir.register_op({converted[0]!r}, impl, ...)")
        plain = bool(self.values) and is_plain_value(value)  # a Python value: no tensor to decompose
        if plain and (converted is None or trait(converted[0], "elementwise")) \
                and n.op == "call_function" and n.target in SCALAR_TARGETS and not kwargs:
            # Python arithmetic (batch * heads; or on a value read from data, x.item() * 2): never a tensor op
            converted = ("scalar", tuple(args), dict(fn=SCALAR_TARGETS[n.target]))
        attrs: dict[str, Any]
        if converted is None:
            why = None
            if self.values and not plain:
                from slimfx.ir import decompose

                try:
                    return decompose.decompose_call(self, n, args, kwargs, scope)
                except decompose.NotDecomposed as e:
                    why = str(e)
            attrs = {"kind": n.op, "target": n.target, "kwargs": kwargs}
            if n.op == "call_module":
                attrs["module"] = self.modules[scope.qual(n.target)]
                attrs["target"] = scope.qual(n.target)
            if why:
                attrs["why"] = why
            op, ins = "opaque", args
        else:
            op, ins, attrs = converted
        name = n.name if not scope.name else f"{scope.name}_{n.name}"
        if op in NESTED_RESULTS:  # the module's nested result, flattened as the canonical op returns it
            value = tuple(torch.utils._pytree.tree_leaves(value))
        node = self.graph.create_node(op, ins, attrs, name=name, meta=meta_of(value), source=src, module_path=mpath)
        return self.record(node, n)


def _tuple_results_as_tensors(graph: Graph, outputs: Any) -> Any:
    """A tuple-valued node returned whole (`return x.topk(3)`, `return torch.max(x, 1)`: torch's named tuples) is
    the tuple of its items, read with `getitem` as when forward unpacks it."""
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(_tuple_results_as_tensors(graph, v) for v in outputs)
    if isinstance(outputs, dict):
        return {k: _tuple_results_as_tensors(graph, v) for k, v in outputs.items()}
    if isinstance(outputs, Node) and isinstance(outputs.meta, tuple) and outputs.meta \
            and all(isinstance(m, TensorMeta) for m in outputs.meta):
        items = []
        for i, m in enumerate(outputs.meta):
            conv = _convert_getitem(outputs, i)
            if conv is None:
                return outputs
            items.append(graph.create_node(conv[0], conv[1], conv[2], name=f"{outputs.name}_{i}", meta=m,
                                           source=outputs.source, module_path=outputs.module_path))
        return tuple(items)
    return outputs


def _convert_getitem(obj: Any, index: Any, obj_value: Any = None) -> Conv | None:
    if isinstance(obj, Node) and isinstance(index, int) and index in NESTED_RESULTS.get(obj.op, {}):
        return "getitem", (obj,), dict(index=NESTED_RESULTS[obj.op][index])
    if isinstance(obj, Node) and isinstance(obj_value, (tuple, list)) and not is_plain_value(obj_value):
        return "getitem", (obj,), dict(index=index)  # an item of a call's tuple result (an opaque module's)
    if isinstance(obj, Node) and trait(obj.op, "result") == "tuple" and isinstance(index, int):
        return "getitem", (obj,), dict(index=index)
    if isinstance(obj, Node) and isinstance(obj.meta, tuple) and isinstance(index, int):
        return "getitem", (obj,), dict(index=index)
    if isinstance(obj, Node) and trait(obj.op, "result") == "value":
        return "getitem", (obj,), dict(index=index)
    if isinstance(obj, Node):
        idx = index if isinstance(index, tuple) else (index,)
        if all(isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in idx):
            if any(isinstance(r, Node) for r in _slice_refs(idx)):
                return None
            return "slice", (obj,), dict(index=index)
    return None


def _slice_refs(idx: tuple):
    for i in idx:
        if isinstance(i, slice):
            yield from (i.start, i.stop, i.step)


def trace_function(fn: Callable) -> tuple[Graph, dict[str, fx.Node]]:
    """Trace a plain function of torch ops into canonical IR without running it: every argument
    becomes an `input` node and metas are None. Also returns the fx node each IR node came from (by
    name), so callers can see how each call was spelled. The pattern rewriter's front end."""
    gm = _trace(fn, (), None)  # type: ignore[arg-type] - fx traces plain functions too
    n_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    graph = _convert(gm, gm, {}, n_inputs=n_inputs)
    graph.name = getattr(fn, "__name__", "function")
    graph.training = False
    return graph, {n.name: n for n in gm.graph.nodes}


def converter_for(fx_node: fx.Node) -> Callable[..., Conv | None] | None:
    """The converter capture uses for a call_function / call_method fx node (None: kept opaque)."""
    if fx_node.op == "call_function":
        conv = _FUNCTIONS.get(fx_node.target)
        if conv is None and isinstance(fx_node.target, torch._ops.OpOverload):
            conv = _FUNCTIONS.get(fx_node.target.overloadpacket)
        return conv
    if fx_node.op == "call_method":
        conv = _METHODS.get(fx_node.target)
        name = fx_node.target
        if conv is None and name.endswith("_") and not name.startswith("_"):
            conv = _METHODS.get(name[:-1])  # x.mul_(g) computes x.mul(g); capture rebinds x's later readers
        return conv
    return None


def module_converters() -> dict[type, Callable]:
    """Module classes that capture turns into canonical ops (for docs and tests)."""
    return dict(_MODULES)


__all__ = ["capture", "module_converters", "register_converter"]
