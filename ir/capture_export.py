"""Capture through torch.export: the ATen graph of `torch.export.export(..., strict=False)` mapped onto
the same canonical ops as the torch.fx front end (ir.capture), so passes see the ops they know. The few
ATen calls with no canonical op (mask-building helpers of Hugging Face models: arange, advanced indexing,
new_ones, full) stay `opaque` nodes with their OpOverload as target; the ONNX exporter has emitters for
those (exporters/onnx/aten.py), and any other is refused by name.

torch.export handles what symbolic tracing cannot (Hugging Face transformers, data-dependent Python
on shapes), at the price of a lower-level graph: `aten.addmm(b, x, w.t())`, `aten.view`,
`aten._native_batch_norm_legit_no_training`... Each ATen op that spells a canonical op has a converter
below; anything else becomes an `opaque` node whose target is the ATen OpOverload, which still lowers
and runs. Lifted parameters, buffers and tensor constants go back into the params table under their
module paths; node module paths come from the export node's `nn_module_stack`; shapes from running the
exported graph on the example inputs. Batch (and, for integer token inputs, sequence) dimensions are
exported as dynamic when the model allows it, so reshape/expand sizes that depend on them are `size`
nodes and the ONNX export takes any batch size.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import operator
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from slimfx.ir.capture import (
    NOT_FOLDED,
    SCALAR_TARGETS,
    _conv_transpose,
    _f_adaptive_avg_pool1d,
    _f_adaptive_avg_pool2d,
    _f_adaptive_avg_pool3d,
    _f_avg_pool1d,
    _f_avg_pool2d,
    _f_avg_pool3d,
    _f_hardtanh,
    _f_interpolate,
    _f_masked_fill,
    _f_max_pool1d,
    _f_max_pool2d,
    _f_max_pool3d,
    _fill_kwargs,
    filled,
    is_internal_file,
    rebind,
)
from slimfx.ir.errors import CaptureError
from slimfx.ir.graph import Graph, Node, Param, meta_of
from slimfx.ir.ops import OPS
from slimfx.ir.verify import infer_meta

_log = logging.getLogger(__name__)
aten = torch.ops.aten

Conv = tuple[str, tuple, dict]
_CONVERTERS: dict[Any, Callable[..., Any]] = {}
_DROP = object()  # converter result: the node is a runtime check with no value (e.g. _assert_scalar)
_INT_MAX = 2**62


class _Alias:
    """Converter result: the ATen node computes nothing new; it *is* this value (alias, to(same dtype)...)."""

    def __init__(self, value: Any):
        self.value = value


def _converts(*targets: Any) -> Callable:
    """Register a converter for ATen op packets (every overload) or single overloads."""
    def deco(fn: Callable) -> Callable:
        for t in targets:
            _CONVERTERS[t] = fn
        return fn
    return deco


def register_aten_converter(target: Any, fn: Callable[..., Any]) -> None:
    """A converter for a torch op (packet or overload) that takes the op's own arguments and returns
    `(op, inputs, attrs)` or None; `ir.register_converter` calls this for torch ops."""
    _CONVERTERS[target] = lambda cx, *args, **kwargs: fn(*args, **kwargs)


def _converter(target: Any) -> Callable | None:
    conv = _CONVERTERS.get(target)
    if conv is None and isinstance(target, torch._ops.OpOverload):
        conv = _CONVERTERS.get(target.overloadpacket)
    return conv


class _Ctx:
    """What a converter may need beyond its operands: the node being converted and the graph so far."""

    def __init__(self, graph: Graph, modules: dict[str, nn.Module], values: dict[fx.Node, Any],
                 transposed_ok: set[str], state: dict[str, torch.Tensor], model_training: bool,
                 qual: Callable[[str], str] = str):
        self.graph = graph
        self.qual = qual  # the program's state name -> the graph's param name (a spliced call's differ)
        self.local: dict[str, str] = {}  # and back, for the names seen
        self.modules = modules
        self.values = values
        self.transposed_ok = transposed_ok
        self.state = state
        self.model_training = model_training
        self.node: fx.Node | None = None
        self.module_path: str | None = None
        self.source: str | None = None
        self.maybe_dead: list[Node] = []
        self.transposed: set[str] = set()

    @property
    def value(self) -> Any:
        return self.values.get(self.node)

    def state_param(self, fqn: str, buffer: bool) -> Param:
        """The graph's param for the program's lifted tensor `fqn` (added on first use)."""
        name = self.qual(fqn)
        self.local[name] = fqn
        if name not in self.graph.params:
            self.graph.add_param(name, self.state[fqn].detach(), buffer=buffer, unique=False)
        return Param(name)

    def module(self) -> nn.Module | None:
        return self.modules.get(self.module_path) if self.module_path is not None else None

    def rank(self, x: Any) -> int | None:
        if isinstance(x, Node) and hasattr(x.meta, "shape"):
            return len(x.meta.shape)
        if isinstance(x, Param):
            return self.graph.params[x.name].dim()
        return None

    def emit(self, op: str, inputs: tuple, attrs: dict, meta: Any) -> Node:
        """An extra node for an ATen op that takes two canonical ops (e.g. addmm of two activations)."""
        return self.graph.create_node(op, inputs, attrs, name=f"{self.node.name}_{op}", meta=meta,
                                      source=self.source, module_path=self.module_path)

    def weight_of(self, mat2: Any) -> Param | None:
        """The [out, in] weight param for `x @ mat2`: `mat2 = t(@w)` gives @w, and a param used only as a
        right-hand matmul operand ([in, out], GPT-2's Conv1D) is held as its transposed view."""
        if isinstance(mat2, Node) and mat2.op in ("transpose", "permute") and isinstance(mat2.inputs[0], Param) \
                and self.rank(mat2.inputs[0]) == 2:
            self.maybe_dead.append(mat2)
            return mat2.inputs[0]
        if isinstance(mat2, Param) and mat2.name in self.transposed_ok and self.rank(mat2) == 2:
            if mat2.name not in self.transposed:
                # a view of the model's tensor: F.linear(x, w.t()) runs x @ w, so lowering stays bit-exact
                self.graph.params[mat2.name] = self.state[mat2.name].detach().t()
                self.transposed.add(mat2.name)
            return mat2
        return None


def _index_for(dim: int, rank: int | None, item: Any) -> tuple:
    if dim < 0:
        if rank is None:
            raise _NoConversion
        dim += rank
    return (slice(None),) * dim + (item,)


class _NoConversion(Exception):
    pass


# --- converters: each takes the ATen schema's own arguments -----------------------------------------------

@_converts(aten.linear)
def _linear(cx, input, weight, bias=None):
    return "linear", (input, weight, bias), {}


@_converts(aten.addmm)
def _addmm(cx, bias, mat1, mat2, *, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        return None
    w = cx.weight_of(mat2)
    if w is not None:
        return "linear", (mat1, w, bias), {}
    mm = cx.emit("matmul", (mat1, mat2), {}, meta_of(cx.value))
    return "add", (bias, mm), {}


@_converts(aten.mm)
def _mm(cx, input, mat2):
    w = cx.weight_of(mat2)
    if w is not None:
        return "linear", (input, w, None), {}
    return "matmul", (input, mat2), {}


@_converts(aten.matmul, aten.bmm)
def _matmul(cx, input, other):
    return "matmul", (input, other), {}


@_converts(aten.conv3d, aten.conv2d, aten.conv1d)
def _conv(cx, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    n = {aten.conv3d: 3, aten.conv2d: 2}.get(cx.node.target.overloadpacket, 1)
    return _conv_nd(n, input, weight, bias, stride, padding, dilation, groups)


def _conv_nd(n, input, weight, bias, stride, padding, dilation, groups):
    def tup(v):
        return v if isinstance(v, str) else tuple(v) if isinstance(v, (list, tuple)) else (v,) * n
    return f"conv{n}d", (input, weight, bias), dict(stride=tup(stride), padding=tup(padding),
                                                    dilation=tup(dilation), groups=groups)


@_converts(aten.convolution)
def _convolution(cx, input, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    n = cx.rank(weight)
    if n not in (3, 4, 5) or (transposed and n == 5):  # conv_transpose3d has no canonical op
        return None
    if transposed:
        return _conv_transpose(n - 2, input, weight, bias, stride, padding, output_padding, groups, dilation)
    return _conv_nd(n - 2, input, weight, bias, stride, padding, dilation, groups)


@_converts(aten.conv_transpose1d, aten.conv_transpose2d)
def _conv_transpose_aten(cx, input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    n = 2 if cx.node.target.overloadpacket is aten.conv_transpose2d else 1
    return _conv_transpose(n, input, weight, bias, stride, padding, output_padding, groups, dilation)


def _bn(cx, x, weight, bias, running_mean, running_var, training, momentum, eps):
    mod = cx.module()
    if isinstance(mod, nn.modules.batchnorm._BatchNorm) and isinstance(running_mean, Param) \
            and running_mean.name == cx.qual(f"{cx.module_path}.running_mean"):
        # the module's own batch norm: same operands and attrs as the fx front end gives it
        tracked = mod.track_running_stats and mod.running_mean is not None
        nbt = None
        if tracked and mod.num_batches_tracked is not None:
            nbt = Param(cx.qual(f"{cx.module_path}.num_batches_tracked"))
            if nbt.name not in cx.graph.params:
                cx.graph.add_param(nbt.name, mod.num_batches_tracked.detach(), buffer=True, unique=False)
        return "batch_norm", (x, running_mean, running_var, weight, bias, nbt), dict(
            eps=mod.eps, momentum=mod.momentum, training=None if tracked else True)
    return "batch_norm", (x, running_mean, running_var, weight, bias, None), dict(
        eps=eps, momentum=momentum, training=bool(training))


@_converts(aten.add_)
def _add_inplace(cx, input, other, *, alpha=1):
    # A training-mode batch norm module counts its batches with `num_batches_tracked.add_(1)`; the
    # canonical batch_norm does that itself (see ir.ops), so the separate update is dropped.
    local = cx.local.get(input.name, "") if isinstance(input, Param) else ""
    if local.endswith(".num_batches_tracked") and \
            isinstance(cx.modules.get(local.rsplit(".", 1)[0]), nn.modules.batchnorm._BatchNorm):
        return _DROP
    return None


@_converts(aten.batch_norm)
def _batch_norm(cx, input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled=True):
    return _bn(cx, input, weight, bias, running_mean, running_var, training, momentum, eps)


@_converts(aten._native_batch_norm_legit_no_training)
def _bn_no_training(cx, input, weight, bias, running_mean, running_var, momentum, eps):
    return _bn(cx, input, weight, bias, running_mean, running_var, False, momentum, eps)


@_converts(aten.layer_norm)
def _layer_norm(cx, input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return "layer_norm", (input, weight, bias), dict(normalized_shape=tuple(normalized_shape), eps=eps)


@_converts(aten.native_layer_norm)
def _native_layer_norm(cx, input, normalized_shape, weight, bias, eps):
    return _layer_norm(cx, input, normalized_shape, weight, bias, eps)


@_converts(aten.group_norm)
def _group_norm(cx, input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    return "group_norm", (input, weight, bias), dict(num_groups=num_groups, eps=eps)


@_converts(aten.embedding)
def _embedding(cx, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    mod = cx.module()
    if isinstance(mod, nn.Embedding):
        return "embedding", (indices, weight), dict(
            padding_idx=mod.padding_idx, max_norm=mod.max_norm, norm_type=mod.norm_type,
            scale_grad_by_freq=mod.scale_grad_by_freq, sparse=mod.sparse)
    return "embedding", (indices, weight), dict(
        padding_idx=None if padding_idx < 0 else padding_idx, max_norm=None, norm_type=2.0,
        scale_grad_by_freq=scale_grad_by_freq, sparse=sparse)


def _unary(op: str) -> Callable:
    def conv(cx, input):
        return op, (input,), {}
    return conv


for _op, _targets in {
    "relu": (aten.relu,), "relu6": (aten.relu6,), "silu": (aten.silu,), "sigmoid": (aten.sigmoid,),
    "tanh": (aten.tanh,), "hardswish": (aten.hardswish,), "hardsigmoid": (aten.hardsigmoid,),
    "neg": (aten.neg,), "sqrt": (aten.sqrt,), "rsqrt": (aten.rsqrt,), "exp": (aten.exp,),
    "log": (aten.log,), "abs": (aten.abs,), "erf": (aten.erf,), "reciprocal": (aten.reciprocal,),
    "sin": (aten.sin,), "cos": (aten.cos,),
}.items():
    _converts(*_targets)(_unary(_op))


@_converts(aten.gelu)
def _gelu(cx, input, *, approximate="none"):
    return "gelu", (input,), dict(approximate=approximate)


@_converts(aten.leaky_relu)
def _leaky_relu(cx, input, negative_slope=0.01):
    return "leaky_relu", (input,), dict(negative_slope=negative_slope)


@_converts(aten.hardtanh)
def _hardtanh(cx, input, min_val=-1.0, max_val=1.0):
    return _f_hardtanh(input, min_val, max_val)


@_converts(aten.clamp)
def _clamp(cx, input, min=None, max=None):  # noqa: A002
    if any(isinstance(v, (Node, Param)) for v in (min, max)):
        return None
    return "clamp", (input,), dict(min=min, max=max)


@_converts(aten.clamp_min)
def _clamp_min(cx, input, min):  # noqa: A002
    return _clamp(cx, input, min, None)


@_converts(aten.clamp_max)
def _clamp_max(cx, input, max):  # noqa: A002
    return _clamp(cx, input, None, max)


@_converts(aten.softmax, aten.log_softmax)
def _softmax(cx, input, dim, dtype=None):
    if dtype is not None:
        return None
    return cx.node.target.overloadpacket.__name__, (input,), dict(dim=dim)


@_converts(aten._softmax, aten._log_softmax)
def _softmax_internal(cx, input, dim, half_to_float):
    if half_to_float:
        return None
    return cx.node.target.overloadpacket.__name__.lstrip("_"), (input,), dict(dim=dim)


def _binary(op: str) -> Callable:
    def conv(cx, input, other, *, alpha=1, rounding_mode=None):
        if alpha != 1 or rounding_mode is not None:
            return None
        return op, (input, other), {}
    return conv


for _op, _targets in {
    "add": (aten.add,), "sub": (aten.sub,), "mul": (aten.mul,), "div": (aten.div,), "pow": (aten.pow,),
}.items():
    _converts(*_targets)(_binary(_op))


@_converts(aten.minimum, aten.maximum, aten.min, aten.max)
def _min_max(cx, input, *rest):
    """Elementwise minimum/maximum of two tensors (aten.min.other too); min.dim: values and indices (min_dim); the
    minimum of all values (min.default) is left alone."""
    name, overload = cx.node.target.overloadpacket.__name__, cx.node.target._overloadname
    if name in ("min", "max") and overload == "dim":
        return f"{name}_dim", (input,), dict(dim=int(rest[0]), keepdim=bool(rest[1]) if len(rest) > 1 else False)
    if name in ("min", "max") and overload == "default":  # of all values
        return f"a{name}", (input,), dict(dim=None, keepdim=False)
    if name in ("min", "max") and overload != "other":
        return None
    return {"min": "minimum", "max": "maximum"}.get(name, name), (input, rest[0]), {}


def _python_arith(fn: str) -> Callable:
    """Python arithmetic in the program: on symbolic sizes (`s0 * 4`) a `scalar` node."""
    def conv(cx, *args):
        if isinstance(cx.value, torch.Tensor):  # a Python operator on tensors: the canonical tensor op
            tensor_op = {"add": "add", "sub": "sub", "mul": "mul", "truediv": "div", "pow": "pow", "neg": "neg"}
            return (tensor_op[fn], args, {}) if fn in tensor_op else None
        return "scalar", args, dict(fn=fn)
    return conv


for _target, _fn in SCALAR_TARGETS.items():
    _converts(_target)(_python_arith(_fn))


@_converts(aten.rsub)
def _rsub(cx, input, other, alpha=1):
    if alpha != 1:
        return None
    return "sub", (other, input), {}


@_converts(aten.dropout)
def _dropout(cx, input, p, train):
    if type(cx.module()) is nn.Dropout and bool(train) == cx.model_training:
        return "dropout", (input,), dict(p=p, training=None)  # nn.Dropout follows the module's mode
    return "dropout", (input,), dict(p=p, training=bool(train))


@_converts(aten.max_pool3d, aten.max_pool2d, aten.max_pool1d)
def _max_pool(cx, input, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    fn = {aten.max_pool3d: _f_max_pool3d, aten.max_pool2d: _f_max_pool2d}.get(cx.node.target.overloadpacket,
                                                                             _f_max_pool1d)
    return fn(input, kernel_size, tuple(stride) or None, padding, dilation, ceil_mode)


@_converts(aten.max_pool2d_with_indices, aten.max_pool3d_with_indices)
def _max_pool_indices(cx, input, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    fn = _f_max_pool3d if cx.node.target.overloadpacket is aten.max_pool3d_with_indices else _f_max_pool2d
    return fn(input, kernel_size, tuple(stride) or None, padding, dilation, ceil_mode)


@_converts(aten.avg_pool2d)
def _avg_pool2d(cx, input, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True,
                divisor_override=None):
    return _f_avg_pool2d(input, kernel_size, tuple(stride) or None, padding, ceil_mode, count_include_pad,
                         divisor_override)


@_converts(aten.avg_pool3d)
def _avg_pool3d(cx, input, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True,
                divisor_override=None):
    return _f_avg_pool3d(input, kernel_size, tuple(stride) or None, padding, ceil_mode, count_include_pad,
                         divisor_override)


@_converts(aten.avg_pool1d)
def _avg_pool1d(cx, input, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True):
    return _f_avg_pool1d(input, kernel_size, tuple(stride) or None, padding, ceil_mode, count_include_pad)


@_converts(aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d)
def _aap2d(cx, input, output_size):
    return _f_adaptive_avg_pool2d(input, output_size)


@_converts(aten.adaptive_avg_pool1d)
def _aap1d(cx, input, output_size):
    return _f_adaptive_avg_pool1d(input, output_size)


@_converts(aten.adaptive_max_pool2d)
def _amp2d(cx, input, output_size):
    return "adaptive_max_pool2d", (input,), dict(output_size=tuple(output_size))


@_converts(aten.adaptive_avg_pool3d, aten._adaptive_avg_pool3d)
def _aap3d(cx, input, output_size):
    return _f_adaptive_avg_pool3d(input, output_size)


@_converts(aten.adaptive_max_pool3d)
def _amp3d(cx, input, output_size):
    return "adaptive_max_pool3d", (input,), dict(output_size=tuple(output_size))


_UPSAMPLE_MODES = {aten.upsample_nearest2d: "nearest", aten.upsample_bilinear2d: "bilinear",
                   aten.upsample_nearest1d: "nearest", aten.upsample_linear1d: "linear",
                   aten._upsample_nearest_exact1d: "nearest-exact", aten._upsample_nearest_exact2d: "nearest-exact"}


@_converts(*_UPSAMPLE_MODES)
def _upsample(cx, input, output_size, *rest):
    mode = _UPSAMPLE_MODES[cx.node.target.overloadpacket]
    if cx.node.target._overloadname != "vec":
        return None
    align_corners = rest[0] if mode in ("bilinear", "linear") else None
    scales = rest[-1]
    return _f_interpolate(input, tuple(output_size) if output_size is not None else None,
                          tuple(scales) if scales is not None else None, mode, align_corners)


@_converts(aten.view, aten._unsafe_view, aten.reshape)
def _reshape(cx, input, size):
    return "reshape", (input,), dict(shape=tuple(size))


@_converts(aten.unflatten)
def _unflatten(cx, input, dim, sizes):
    """A reshape: the other dims are kept, as `size` nodes where the program has them symbolic."""
    fake = cx.node.args[0].meta.get("val") if isinstance(cx.node.args[0], fx.Node) else None
    if fake is None or not isinstance(input, Node):
        return None
    shape = list(fake.shape)
    dim %= len(shape)
    entries: list[Any] = []
    for i, s in enumerate(shape):
        if i == dim:
            entries.extend(sizes)
        elif isinstance(s, int):
            entries.append(s)
        else:
            entries.append(cx.emit("size", (input,), dict(dim=i), None))
    return "reshape", (input,), dict(shape=tuple(entries))


def _shape_of(cx, other: Any, arg: int) -> tuple | None:
    """`other`'s shape as reshape/expand sizes: ints, and `size` nodes of `other` where the program has the
    dim symbolic (for aten's `*_as` ops, operand `arg`)."""
    src = cx.node.args[arg] if len(cx.node.args) > arg else None
    fake = src.meta.get("val") if isinstance(src, fx.Node) else None
    if fake is None or not isinstance(other, (Node, Param)):
        return None
    return tuple(s if isinstance(s, int) else cx.emit("size", (other,), dict(dim=i), None)
                 for i, s in enumerate(fake.shape))


@_converts(aten.reshape_as, aten.view_as)
def _reshape_as(cx, input, other):
    shape = _shape_of(cx, other, 1)
    return None if shape is None else ("reshape", (input,), dict(shape=shape))


@_converts(aten.expand_as)
def _expand_as(cx, input, other):
    shape = _shape_of(cx, other, 1)
    return None if shape is None else ("expand", (input,), dict(size=shape))


@_converts(aten.contiguous)
def _contiguous(cx, input, memory_format=None):
    return ("contiguous", (input,), {}) if memory_format in (None, torch.contiguous_format) else None


@_converts(aten.flatten)
def _flatten(cx, input, start_dim=0, end_dim=-1):
    if cx.node.target._overloadname != "using_ints":
        return None
    return "flatten", (input,), dict(start_dim=start_dim, end_dim=end_dim)


@_converts(aten.permute)
def _permute(cx, input, dims):
    return "permute", (input,), dict(dims=tuple(dims))


@_converts(aten.transpose, aten.swapaxes, aten.swapdims)  # swapaxes/swapdims: numpy-style aliases
def _transpose(cx, input, dim0, dim1):
    return "transpose", (input,), dict(dim0=dim0, dim1=dim1)


@_converts(aten.t)
def _t(cx, input):
    if cx.rank(input) != 2:
        return _Alias(input)
    return "transpose", (input,), dict(dim0=0, dim1=1)


@_converts(aten.expand)
def _expand(cx, input, size, *, implicit=False):
    return "expand", (input,), dict(size=tuple(size))


@_converts(aten.cat, aten.concat)
def _cat(cx, tensors, dim=0):
    return "cat", tuple(tensors), dict(dim=dim)


@_converts(aten.stack)
def _stack(cx, tensors, dim=0):
    return "stack", tuple(tensors), dict(dim=dim)


@_converts(aten.split, aten.split_with_sizes)
def _split(cx, input, split_size, dim=0):
    return "split", (input,), dict(split_size=tuple(split_size) if isinstance(split_size, (list, tuple))
                                   else split_size, dim=dim)


@_converts(aten.chunk)
def _chunk(cx, input, chunks, dim=0):
    return "chunk", (input,), dict(chunks=chunks, dim=dim)


@_converts(aten.unsqueeze)
def _unsqueeze(cx, input, dim):
    return "unsqueeze", (input,), dict(dim=dim)


@_converts(aten.squeeze)
def _squeeze(cx, input, dim=None):
    return "squeeze", (input,), dict(dim=tuple(dim) if isinstance(dim, (list, tuple)) else dim)


@_converts(aten.slice)
def _slice(cx, input, dim=0, start=None, end=None, step=1):
    if cx.node.target._overloadname != "Tensor":
        return None
    start = None if start == 0 else start
    end = None if isinstance(end, int) and end >= _INT_MAX else end
    if start is None and end is None and step == 1:
        return _Alias(input)  # x[:, :] is x
    return "slice", (input,), dict(index=_index_for(dim, cx.rank(input), slice(start, end, None if step == 1
                                                                                     else step)))


@_converts(aten.diff)
def _diff(cx, input, n=1, dim=-1, prepend=None, append=None):
    """torch.diff: prepend/append joined on (cat), then n times x[1:] - x[:-1] along dim (slice, slice, sub).
    Hugging Face's mask helpers (find_packed_sequence_indices) call it on the position ids."""
    parts = [p for p in (prepend, input, append) if p is not None]
    rank = cx.rank(input)
    if rank is None or not isinstance(n, int) or n < 1 or any(cx.rank(p) != rank for p in parts):
        return None  # a scalar prepend (broadcast by torch) stays opaque
    dim %= rank

    def emit(op: str, ins: tuple, attrs: dict) -> Node:
        node = cx.emit(op, ins, attrs, None)
        node.meta = infer_meta(node)
        return node

    x = emit("cat", tuple(parts), dict(dim=dim)) if len(parts) > 1 else input
    for step in range(n):
        a = emit("slice", (x,), dict(index=_index_for(dim, rank, slice(1, None))))
        b = emit("slice", (x,), dict(index=_index_for(dim, rank, slice(None, -1))))
        if step == n - 1:
            return "sub", (a, b), {}
        x = emit("sub", (a, b), {})
    return None


@_converts(aten.select)
def _select(cx, input, dim, index):
    if cx.node.target._overloadname != "int":
        return None
    return "slice", (input,), dict(index=_index_for(dim, cx.rank(input), index))


@_converts(aten.mean, aten.sum)
def _reduce(cx, input, dim=None, keepdim=False, *, dtype=None):
    if dtype is not None:
        return None
    op = cx.node.target.overloadpacket.__name__
    if cx.node.target._overloadname not in ("default", "dim", "dim_IntList"):
        return None
    return op, (input,), dict(dim=tuple(dim) if dim is not None else None, keepdim=keepdim)


@_converts(aten.amax, aten.amin)
def _extreme(cx, input, dim=(), keepdim=False):
    return cx.node.target.overloadpacket.__name__, (input,), dict(dim=tuple(dim) if dim else None, keepdim=keepdim)


@_converts(aten.linalg_vector_norm)
def _vector_norm(cx, input, ord=2, dim=None, keepdim=False, *, dtype=None):  # noqa: A002
    """The 1- and 2-norms (F.normalize, x.norm()) as sum(|x|) and sqrt(sum(x * x))."""
    if dtype is not None or ord not in (1, 2) or not isinstance(input, Node) or not hasattr(input.meta, "shape"):
        return None
    dims = None if dim is None else tuple(dim) if isinstance(dim, (list, tuple)) else (int(dim),)
    out = meta_of(cx.value)
    if ord == 1:
        return "sum", (cx.emit("abs", (input,), {}, input.meta),), dict(dim=dims, keepdim=bool(keepdim))
    sq = cx.emit("mul", (input, input), {}, input.meta)
    return "sqrt", (cx.emit("sum", (sq,), dict(dim=dims, keepdim=bool(keepdim)), out),), {}


@_converts(aten.scaled_dot_product_attention)
def _sdpa(cx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    if enable_gqa:
        return None
    return "scaled_dot_product_attention", (query, key, value, attn_mask), dict(
        dropout_p=dropout_p, is_causal=is_causal, scale=scale)


def _cast_or_alias(cx, input, dtype, device=None):
    if device is not None and torch.device(device).type != "cpu":
        return None
    if dtype is None or (isinstance(input, Node) and hasattr(input.meta, "dtype") and input.meta.dtype == dtype):
        return _Alias(input)
    return "cast", (input,), dict(dtype=dtype)


@_converts(aten.to)
def _to(cx, input, *args, **kwargs):
    overload = cx.node.target._overloadname
    if overload == "dtype":
        return _cast_or_alias(cx, input, args[0] if args else kwargs.get("dtype"))
    if overload == "device":
        return _cast_or_alias(cx, input, args[1] if len(args) > 1 else kwargs.get("dtype"),
                              args[0] if args else kwargs.get("device"))
    if overload == "dtype_layout":
        return _cast_or_alias(cx, input, kwargs.get("dtype"), kwargs.get("device"))
    return None


@_converts(aten._to_copy)
def _to_copy(cx, input, **kwargs):
    return _cast_or_alias(cx, input, kwargs.get("dtype"), kwargs.get("device"))


@_converts(aten.type_as)
def _type_as(cx, input, other):
    """`x.type_as(y)`: x cast to y's dtype (RoBERTa's position ids, Gemma's norms)."""
    dtype = getattr(getattr(other, "meta", None), "dtype", None)
    return _cast_or_alias(cx, input, dtype) if dtype is not None else None


@_converts(aten.alias, aten.detach, aten.lift_fresh_copy)
def _alias(cx, input):
    return _Alias(input)


@_converts(aten.sym_size)
def _sym_size(cx, input, dim=None):
    return "size", (input,), dict(dim=dim)


@_converts(aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size,
           aten.sym_constrain_range, aten._assert_async)
def _check(cx, *args, **kwargs):
    return _DROP  # export's own runtime checks of the shapes it specialized on; they compute nothing


# --- ops real models use: transposed convs, einsum, norms, masks, indexing, recurrent layers -------------

@_converts(aten.einsum)
def _einsum(cx, equation, tensors, *, path=None):
    return "einsum", tuple(tensors), dict(equation=equation)


@_converts(aten.rms_norm)
def _rms_norm(cx, input, normalized_shape, weight=None, eps=None):
    return "rms_norm", (input, weight), dict(normalized_shape=tuple(normalized_shape), eps=eps)


@_converts(aten.instance_norm)
def _instance_norm(cx, input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
                   cudnn_enabled=True):
    mod = cx.module()
    if isinstance(mod, nn.modules.instancenorm._InstanceNorm) and bool(use_input_stats) == (
            cx.model_training or running_mean is None):
        use_input_stats = None  # the module's own rule: follows the mode
    return "instance_norm", (input, running_mean, running_var, weight, bias), dict(
        use_input_stats=use_input_stats if use_input_stats is None else bool(use_input_stats), momentum=momentum,
        eps=eps, training=None)


@_converts(aten.pixel_shuffle)
def _pixel_shuffle(cx, input, upscale_factor):
    return "pixel_shuffle", (input,), dict(upscale_factor=int(upscale_factor))


@_converts(aten.pixel_unshuffle)
def _pixel_unshuffle(cx, input, downscale_factor):
    return "pixel_unshuffle", (input,), dict(downscale_factor=int(downscale_factor))


def _binary_op(op: str) -> Callable:
    def conv(cx, input, other):
        return op, (input, other), {}
    return conv


for _op in ("eq", "ne", "lt", "le", "gt", "ge"):
    _converts(getattr(aten, _op))(_binary_op(_op))
for _op, _targets in {"logical_and": (aten.logical_and,), "logical_or": (aten.logical_or,),
                      "logical_xor": (aten.logical_xor,), "bitwise_and": (aten.bitwise_and, aten.__and__),
                      "bitwise_or": (aten.bitwise_or, aten.__or__), "bitwise_xor": (aten.bitwise_xor, aten.__xor__)}.items():
    _converts(*_targets)(_binary_op(_op))


@_converts(aten.logical_not, aten.bitwise_not)
def _not(cx, input):
    return cx.node.target.overloadpacket.__name__, (input,), {}


@_converts(aten.where)
def _where(cx, condition, self=None, other=None):
    if self is None or other is None:
        return None  # where(cond): nonzero
    return "where", (condition, self, other), {}


@_converts(aten.masked_fill)
def _masked_fill(cx, input, mask, value):
    return _f_masked_fill(input, mask, value)


@_converts(aten.pad)
def _pad(cx, input, pad, mode="constant", value=None):
    return "pad", (input,), dict(pad=tuple(int(p) for p in pad), mode=str(mode),
                                 value=None if value is None else float(value))


@_converts(aten.constant_pad_nd)
def _constant_pad_nd(cx, input, pad, value=0):
    return _pad(cx, input, pad, "constant", value)


@_converts(aten.roll)
def _roll(cx, input, shifts, dims=()):
    shifts, dims = tuple(int(s) for s in shifts), tuple(int(d) for d in dims)
    if not dims or len(dims) != len(shifts):
        return None
    return "roll", (input,), dict(shifts=shifts, dims=dims)


@_converts(aten.cumsum)
def _cumsum(cx, input, dim, *, dtype=None):
    return "cumsum", (input,), dict(dim=int(dim), dtype=dtype)


@_converts(aten.unbind)
def _unbind(cx, input, dim=0):
    return "unbind", (input,), dict(dim=int(dim))


@_converts(aten.addcmul)
def _addcmul(cx, input, tensor1, tensor2, *, value=1):
    return "addcmul", (input, tensor1, tensor2), dict(value=value)


# tensors of one value whose size follows the inputs (those of fixed size are folded into constants first)
@_converts(aten.zeros, aten.ones)
def _zeros_ones(cx, size, **kwargs):
    value = 0.0 if cx.node.target.overloadpacket is aten.zeros else 1.0
    return filled(size, value, _fill_kwargs(**kwargs) or cx.value.dtype)


@_converts(aten.full)
def _full(cx, size, fill_value, **kwargs):
    return filled(size, fill_value, _fill_kwargs(**kwargs) or cx.value.dtype)


@_converts(aten.full_like, aten.zeros_like, aten.ones_like)
def _full_like(cx, input, *rest, **kwargs):
    packet = cx.node.target.overloadpacket
    value = rest[0] if packet is aten.full_like else 0 if packet is aten.zeros_like else 1
    if isinstance(value, (Node, Param)):
        return None
    return "full_like", (input,), dict(value=value, dtype=_fill_kwargs(**kwargs) or cx.value.dtype)


@_converts(aten.new_zeros, aten.new_ones, aten.new_full)
def _new_filled(cx, input, size, *rest, **kwargs):
    packet = cx.node.target.overloadpacket
    value = rest[0] if packet is aten.new_full else 0 if packet is aten.new_zeros else 1
    return filled(size, value, _fill_kwargs(**kwargs) or cx.value.dtype)


@_converts(aten.topk)
def _topk(cx, input, k, dim=-1, largest=True, sorted=True):  # noqa: A002
    if not isinstance(k, int):
        return None
    return "topk", (input,), dict(k=k, dim=int(dim), largest=bool(largest), sorted=bool(sorted))


@_converts(aten.argmax, aten.argmin)
def _arg_reduce(cx, input, dim=None, keepdim=False):
    return cx.node.target.overloadpacket.__name__, (input,), dict(dim=dim, keepdim=bool(keepdim))


@_converts(aten.index_select)
def _index_select(cx, input, dim, index):
    return "index_select", (input, index), dict(dim=int(dim))


@_converts(aten.gather)
def _gather(cx, input, dim, index, *, sparse_grad=False):
    if sparse_grad:
        return None
    return "gather", (input, index), dict(dim=int(dim))


def _rnn_state(cx, hx: list) -> Any:
    """None for the all-zero initial state nn.LSTM / nn.GRU create (aten.zeros nodes), else the states."""
    if all(isinstance(h, Node) and h.op == "opaque" and h.attrs.get("target") is aten.zeros.default for h in hx):
        cx.maybe_dead.extend(hx)
        return None
    return tuple(hx)


def _rnn(cx, op: str, input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    if cx.rank(input) != 3 or not all(isinstance(p, (Param, Node)) for p in params):
        return None
    dirs = 2 if bidirectional else 1
    per = len(params) // (num_layers * dirs)
    gates = 4 if op == "lstm" else 3
    hidden = (cx.graph.params[params[0].name].shape[0] if isinstance(params[0], Param)
              else params[0].meta.shape[0]) // gates
    attrs = dict(hidden_size=hidden, num_layers=num_layers, bias=bool(has_biases), batch_first=bool(batch_first),
                 bidirectional=bool(bidirectional), dropout=float(dropout),
                 training=None if bool(train) == cx.model_training else bool(train))
    state = _rnn_state(cx, hx)
    if op == "lstm":
        has_proj = per == (5 if has_biases else 3)
        w_hr = params[per - 1]
        attrs["proj_size"] = (cx.graph.params[w_hr.name].shape[0] if isinstance(w_hr, Param)
                              else w_hr.meta.shape[0]) if has_proj else 0
        return "lstm", (input, state, *params), attrs
    return "gru", (input, None if state is None else state[0], *params), attrs


@_converts(aten.lstm)
def _lstm(cx, input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    if cx.node.target._overloadname != "input":
        return None  # the packed-sequence overload
    return _rnn(cx, "lstm", input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)


@_converts(aten.gru)
def _gru(cx, input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    if cx.node.target._overloadname != "input":
        return None
    return _rnn(cx, "gru", input, [hx], params, has_biases, num_layers, dropout, train, bidirectional, batch_first)


# ATen ops that return a tuple whose element 0 is the canonical op's result (the rest: saved statistics
# or indices that inference does not read).
_TUPLE_HEADS = {aten._native_batch_norm_legit_no_training.default, aten.native_layer_norm.default,
                aten.max_pool2d_with_indices.default, aten.adaptive_max_pool2d.default,
                aten.max_pool3d_with_indices.default, aten.adaptive_max_pool3d.default}


# --- export and conversion ------------------------------------------------------------------------------

def _dynamic_spec(value: Any, dims: dict[int, str] | None = None) -> Any:
    """Dim.AUTO for each symbolic dim of an input (`dims`; default: the batch dim of every tensor input, and
    the sequence dim of integer [B, S] inputs)."""
    from slimfx.ir.symdims import default_dims

    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    if dims is None:
        dims = default_dims(value)
    return {d: torch.export.Dim.AUTO for d in dims} or None


def _sample(value: Any, dims: dict[int, str] | None = None) -> Any:
    """The example to export with: a dynamic dim of size 1 grown to 2 (rows or columns repeated), since
    torch.export specializes a dim its example has at size 0 or 1; the program then takes any size, and
    the IR's shapes still come from running it on the user's own example."""
    from slimfx.ir.symdims import resize

    spec = _dynamic_spec(value, dims)
    if not spec or value.shape[0] == 0:
        return value
    return resize(value, {d: 2 for d in spec if value.shape[d] == 1})


# torch's loggers that write to stderr while torch.export traces (the graph at a data-dependent guard, notes
# on the model's internals): the failure they describe reaches the user as slimfx's own one-paragraph message.
_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export", "torch._dynamo",
                   "torch._subclasses.fake_tensor", "torch.fx.experimental.recording")


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Run torch.export without its warnings, log lines and the partial graph it prints to stderr on a
    failure (slimfx reports what went wrong, in one paragraph)."""
    loggers = [logging.getLogger(name) for name in _EXPORT_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_program(model: nn.Module, args: tuple, kwargs: dict[str, Any], *,
                   dynamic: bool = True, dims: dict[str, dict[int, str]] | None = None) -> torch.export.ExportedProgram:
    """torch.export.export(model, args, kwargs, strict=False), with the symbolic dims `dims` (per input name
    {dim: symbol}; default: batch, and sequence for token inputs) dynamic when `dynamic` and the model allows
    them (falls back to static shapes, and says so in the log)."""
    if dynamic and (dims is None or any(dims.values())):
        try:
            names = [p.name for p in inspect.signature(model.forward).parameters.values()
                     if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            per = (lambda name: None) if dims is None else (lambda name: dims.get(name, {}))
            specs = {name: _dynamic_spec(v, per(name)) for name, v in zip(names, args)}
            specs.update({k: _dynamic_spec(v, per(k)) for k, v in kwargs.items()})
            if len(specs) != len(args) + len(kwargs):
                raise ValueError("positional inputs beyond forward's named parameters")
            with quiet_export():
                return torch.export.export(model, tuple(_sample(a, per(n)) for n, a in zip(names, args)),
                                           {k: _sample(v, per(k)) for k, v in kwargs.items()}, dynamic_shapes=specs,
                                           strict=False)
        except Exception as e:  # noqa: BLE001 - retried with static shapes below
            _log.info("torch.export with dynamic batch/sequence dims failed for %s (%s: %s); "
                      "exporting with static shapes", type(model).__name__, type(e).__name__,
                      str(e).splitlines()[0] if str(e) else "")
    try:
        with quiet_export():
            return torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:  # noqa: BLE001 - any export failure is reported as a CaptureError
        frames = [ln for ln in str(e).splitlines() if ln.strip()]
        raise CaptureError(
            f"torch.export cannot capture {type(model).__name__}: {type(e).__name__}: "
            f"{frames[0] if frames else ''}\n  torch.export (non-strict) fails on control flow that depends on "
            "tensor values and on outputs that are not tensors or containers of tensors; return tensors "
            "only, or rewrite the data-dependent branch with torch.cond / torch.where."
        ) from e


def _inline_wrappers(ep: torch.export.ExportedProgram) -> None:
    """Inline the higher-order ops torch.export wraps a `torch.no_grad()` / `torch.autocast(enabled=False)` region
    in (Llama's rotary embedding: `wrap_with_set_grad_enabled(False, submod, ...)`), in place: they call a
    submodule (a get_attr node), which slimfx does not map. Inlining is exact when the region computes the same
    values (autocast disabled) and passes no gradient that the model would have blocked: a region with grad
    disabled is inlined only when nothing it reads depends on a parameter. Others stay as they were (the
    converter names them)."""
    gm, sig = ep.graph_module, ep.graph_signature
    hop = getattr(torch.ops, "higher_order", None)
    grad_hop, cast_hop = getattr(hop, "wrap_with_set_grad_enabled", None), getattr(hop, "wrap_with_autocast", None)
    params = set(sig.inputs_to_parameters)
    from_params: set[fx.Node] = set()
    changed = False
    for n in list(gm.graph.nodes):
        if n.op == "placeholder" and n.name in params or any(a in from_params for a in n.all_input_nodes):
            from_params.add(n)
        if n.op != "call_function" or n.target not in (grad_hop, cast_hop) or grad_hop is None:
            continue
        if n.target is grad_hop:
            first, sub_at = n.args[0], 1
            exact = bool(first) or not any(a in from_params for a in n.args[2:] if isinstance(a, fx.Node))
        else:  # wrap_with_autocast(device_type, dtype, enabled, cache_enabled, submod, *args)
            first, sub_at = n.args[2], 4
            exact = not first
        sub_node = n.args[sub_at]
        if not exact or not isinstance(sub_node, fx.Node) or sub_node.op != "get_attr":
            continue
        sub = getattr(gm, sub_node.target)
        if any(sn.op not in ("placeholder", "call_function", "output") for sn in sub.graph.nodes):
            continue
        env: dict[fx.Node, Any] = dict(zip([sn for sn in sub.graph.nodes if sn.op == "placeholder"],
                                           n.args[sub_at + 1:]))
        outs: Any = None
        with gm.graph.inserting_before(n):
            for sn in sub.graph.nodes:
                if sn.op == "output":
                    outs = fx.node.map_arg(sn.args[0], env.__getitem__)
                elif sn.op != "placeholder":
                    env[sn] = gm.graph.node_copy(sn, env.__getitem__)
                    if env[sn].all_input_nodes and any(a in from_params for a in env[sn].all_input_nodes):
                        from_params.add(env[sn])
        outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        for user in list(n.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(outs[user.args[1]])
                gm.graph.erase_node(user)
        if not n.users:
            gm.graph.erase_node(n)
            if not sub_node.users:
                gm.graph.erase_node(sub_node)
            changed = True
    if changed:
        gm.recompile()


def _run_program(ep: torch.export.ExportedProgram, user_inputs: list[Any],
                 state: dict[str, torch.Tensor] | None = None) -> dict[fx.Node, Any]:
    """Run the exported graph on the example inputs (params and buffers from the program, or from
    `state` by fully qualified name), recording every node's value: concrete shapes for the IR's metas,
    even where the export is dynamic. The program's no_grad/autocast wrappers are inlined first
    (`_inline_wrappers`), so every program slimfx maps goes through this."""
    _inline_wrappers(ep)
    sig = ep.graph_signature
    flat = []
    user = iter(user_inputs)
    state = state or {}
    for spec in sig.input_specs:
        kind = spec.kind.name
        if kind == "USER_INPUT":
            flat.append(next(user))
        elif kind == "PARAMETER":
            flat.append(state.get(spec.target, ep.state_dict.get(spec.target)))
        elif kind == "BUFFER":
            t = state.get(spec.target)
            if t is None:
                t = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
            flat.append(t.clone())  # training-mode graphs update buffers in place; keep the model's intact
        else:
            flat.append(ep.constants[spec.target])
    values: dict[fx.Node, Any] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            values[n] = out = super().run_node(n)
            return out

    with torch.no_grad():
        _Recorder(ep.graph_module).run(*flat)
    return values


def _source(n: fx.Node) -> str | None:
    """`file.py:LINE` of the innermost frame of the export node's stack trace outside torch."""
    stack = n.meta.get("stack_trace")
    if not stack:
        return None
    frames = [m for ln in stack.splitlines() if (m := re.match(r'\s*File "([^"]+)", line (\d+)', ln))]
    user = [m for m in frames if not is_internal_file(m.group(1))]
    return f"{os.path.basename(user[-1].group(1))}:{user[-1].group(2)}" if user else None


def _module_path(n: fx.Node) -> str | None:
    stack = {k: v for k, v in (n.meta.get("nn_module_stack") or {}).items()
             if not k.startswith("_empty_nn_module_stack")}  # export's marker for nodes it adds itself
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"@\d+$", "", path)  # a module called more than once
    return path or None


def _structure(spec: pytree.TreeSpec, leaves: list[Any]) -> Any:
    """Rebuild the output structure with plain containers: tuples, lists, and dicts for any mapping
    (a Hugging Face ModelOutput becomes {"logits": node, ...})."""
    it = iter(leaves)

    def build(s: pytree.TreeSpec) -> Any:
        if s.is_leaf():
            return next(it)
        children = [build(c) for c in s.children()]
        if s.type is list:
            return children
        ctx = s.context
        if isinstance(ctx, (list, tuple)) and len(ctx) == len(children) and all(isinstance(k, str) for k in ctx):
            return dict(zip(ctx, children))
        if s.type is type(None):
            return None
        return tuple(children)

    return build(spec)


def capture_export(model: nn.Module, args: tuple = (), kwargs: dict[str, Any] | None = None, *,
                   dynamic: bool = True, dims: dict[str, dict[int, str]] | None = None) -> Graph:
    """Capture `model` with torch.export (non-strict) into the canonical IR; see the module docstring."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture() needs a torch.nn.Module, got {type(model).__name__}")
    names = list(inspect.signature(model.forward).parameters)
    kwargs = dict(sorted((kwargs or {}).items(), key=lambda kv: names.index(kv[0]) if kv[0] in names else len(names)))
    t0 = time.perf_counter()
    ep = export_program(model, tuple(args), kwargs, dynamic=dynamic, dims=dims)  # inputs in forward's order
    t1 = time.perf_counter()
    graph = from_exported_program(ep, model, args, kwargs)
    _log.info("captured %s with torch.export in %.2fs (export %.2fs, %d nodes%s)", type(model).__name__,
              time.perf_counter() - t0, t1 - t0, len(graph),
              ", dynamic " + ", ".join(map(str, ep.range_constraints)) if ep.range_constraints else "")
    return graph


def from_exported_program(ep: torch.export.ExportedProgram, model: nn.Module, args: tuple = (),
                          kwargs: dict[str, Any] | None = None) -> Graph:
    """The canonical IR of an ExportedProgram of `model` (also a decomposed one, e.g. after
    `ep.run_decompositions()`), with shapes from running it on the example `args`/`kwargs`."""
    kwargs = dict(kwargs or {})
    in_spec = ep.call_spec.in_spec
    if in_spec is not None and in_spec.num_children == 2:
        order = list(in_spec.child(1).context or [])
        kwargs = {k: kwargs[k] for k in order if k in kwargs}
    user_inputs = pytree.tree_leaves((tuple(args), kwargs))
    try:
        values = _run_program(ep, user_inputs)
    except Exception as e:  # noqa: BLE001 - the inputs do not fit the program
        given = ", ".join(f"{tuple(t.shape)}" if isinstance(t, torch.Tensor) else repr(t) for t in user_inputs)
        raise CaptureError(f"the exported program of {type(model).__name__} does not run on the example inputs "
                           f"({given}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Pass "
                           "the inputs it was exported with.") from e
    return _convert_program(ep, model, values, user_inputs)


@dataclass
class Splice:
    """Where `_convert_program` puts a program that is one call of a larger graph (ir.decompose):
    into `graph`, reading each user input from `operands`, with state names mapped by `qual`, module
    paths by `module_path`, a `source` for nodes without a user line of their own and node names
    prefixed with `name`."""

    graph: Graph
    operands: list[Any]
    qual: Callable[[str], str]
    module_path: Callable[[str | None], str | None]
    source: str | None
    name: str
    env: dict[fx.Node, Any] = field(default_factory=dict)  # filled: each program node's IR value


def _convert_program(ep: torch.export.ExportedProgram, model: nn.Module, values: dict[fx.Node, Any],
                     user_inputs: list[Any], splice: Splice | None = None) -> Any:
    """The canonical IR of the program: a new Graph, or with `splice` the call's output structure (its
    nodes added to `splice.graph`)."""
    graph = splice.graph if splice is not None else _program_graph(model)
    cx = _Ctx(graph, dict(model.named_modules(remove_duplicate=False)), values, _transposable_params(ep, splice),
              _program_state(ep, model), model.training, splice.qual if splice is not None else str)
    env: dict[fx.Node, Any] = {}
    tuple_heads: set[fx.Node] = set()

    def lookup(a: Any) -> Any:
        return env[a] if isinstance(a, fx.Node) else a

    inputs = _program_inputs(cx, ep, user_inputs, splice)
    folded = _constant_nodes(ep, {k for k, v in inputs.items() if isinstance(v, Param)})
    out = None
    for n in ep.graph.nodes:
        if n in folded:
            if folded[n]:  # read by the rest of the graph: the value it had on the example run
                path = splice.module_path(_module_path(n)) if splice is not None else _module_path(n)
                name = (f"{path}." if path else "") + (splice.name + "_" if splice is not None else "") + n.name
                env[n] = graph.add_param(name, values[n].detach().clone(), buffer=True)
            continue
        if n.op == "placeholder":
            env[n] = inputs[n.name]
        elif n.op == "output":
            out = _set_outputs(graph, ep, n, lookup, splice is None, splice.qual if splice is not None else str)
        elif n.op != "call_function":
            raise CaptureError(f"torch.export produced a {n.op} node {n.name!r} ({n.target}); slimfx maps only "
                               "call_function graphs (higher-order ops such as torch.cond are not supported)")
        else:
            env[n] = _convert_call(cx, n, lookup, tuple_heads, splice)
            written = inplace_target(n) if isinstance(env[n], Node) and env[n].op != "opaque" else None
            if written is not None and isinstance(env.get(written), Node):
                rebind(env, env[written], env[n])
    for dead in cx.maybe_dead:
        if not dead.users:
            graph.erase(dead)
    if splice is not None:
        splice.env = env
        return out
    return graph


# ATen ops that make a tensor from their size and value arguments alone (new_*: the first operand gives only
# dtype and device); random ones are not among them.
_CONSTANT_SOURCES = {"zeros", "ones", "full", "arange", "empty", "scalar_tensor", "new_zeros", "new_ones", "new_full",
                     "new_empty", "lift_fresh_copy"}


def _constant_nodes(ep: torch.export.ExportedProgram, state: set[str]) -> dict[fx.Node, bool]:
    """Nodes folded into constants at capture, each mapped to whether a node outside the set reads it (those
    become buffers holding the value from the example run; the rest is dropped):

    - values that depend on no input, parameter or buffer: masks built from sizes known at capture (swin's
      shifted-window mask: `new_zeros`, then `mask[h0:h1, w0:w1] = k` in place) and what is computed from them;
    - tensors computed from parameters and buffers alone that are then written in place, with what they are
      made from (swin v2's `qkv_bias.clone()[n:2n].zero_()`): in-place writes have no ONNX form, their result
      does not change at inference.
    A size that follows a dynamic dim is a node, so nothing that depends on it is folded. Nothing is folded
    when an in-place write to a folded tensor comes after the graph first reads one (the value read would be
    the final one), when a write goes to a parameter or buffer itself, or when a folded value is an output.
    `state`: the placeholders that hold parameters and buffers (a spliced call's operands among them)."""
    lifted = set(ep.graph_signature.inputs_to_lifted_tensor_constants)
    pure: set[fx.Node] = set()     # no input, parameter or buffer
    derived: set[fx.Node] = set()  # no input
    writes: list[fx.Node] = []
    operands: dict[fx.Node, list[fx.Node]] = {}
    order = {n: i for i, n in enumerate(ep.graph.nodes)}
    for n in ep.graph.nodes:
        if n.op == "placeholder":
            if n.name in lifted:
                pure.add(n)
            if n.name in lifted or n.name in state:
                derived.add(n)
            continue
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        name = n.target.overloadpacket.__name__
        if any(k in name for k in NOT_FOLDED):
            continue
        ops = [a for a in pytree.tree_leaves((n.args, n.kwargs)) if isinstance(a, fx.Node)]
        if name.startswith("new_"):
            ops = ops[1:]
        elif name not in _CONSTANT_SOURCES and not ops:
            continue  # no operand at all, yet not a known source: leave it to its converter
        operands[n] = ops
        if all(a in derived for a in ops):
            derived.add(n)
            if all(a in pure for a in ops):
                pure.add(n)
            if n.target._schema.is_mutable:
                if any(a.op == "placeholder" for a in ops[:1]):
                    return {}  # writes to a parameter or buffer itself: not a value to fold
                writes.append(n)
    fold = set(pure)
    made_from: dict[fx.Node, set[fx.Node]] = {}  # each write: the tensors it writes through (the base, views)
    for w in writes:
        seen, stack = set(), [w]
        while stack:
            n = stack.pop()
            if n in seen or n not in derived:
                continue
            seen.add(n)
            stack.extend(operands.get(n, ()))
        made_from[w] = seen
        fold |= seen
    const: dict[fx.Node, bool] = dict.fromkeys(fold, False)
    for n in ep.graph.nodes:
        if n in const:
            continue
        reads = [a for a in pytree.tree_leaves((n.args, n.kwargs)) if isinstance(a, fx.Node) and a in const]
        if reads and n.op == "output":
            return {}
        for a in reads:
            const[a] = True
            if any(a in seen and order[n] < order[w] for w, seen in made_from.items()):
                return {}  # read before a write to it: the folded (final) value would be wrong here
    return {n: used for n, used in const.items() if n.op != "placeholder"}


def _program_graph(model: nn.Module) -> Graph:
    graph = Graph()
    graph.name = type(model).__name__
    graph.training = model.training
    graph.capture_method = "export"
    return graph


def _program_state(ep: torch.export.ExportedProgram, model: nn.Module) -> dict[str, torch.Tensor]:
    """The program's lifted tensors by name: the model's own where it has them (shared storage)."""
    state = dict(ep.state_dict)
    state.update(ep.constants)
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    state.update({k: v for k, v in named.items() if k in state})
    return state


def _transposable_params(ep: torch.export.ExportedProgram, splice: Splice | None) -> set[str]:
    """Params used only as the right operand of addmm/mm are [in, out] matrices (GPT-2's Conv1D): the IR
    holds them as their [out, in] transposed view so those matmuls become canonical `linear` nodes.
    (Not in a spliced call: the graph around it may read the same param untransposed.)"""
    if splice is not None:
        return set()
    by_name = {n.name: n for n in ep.graph.nodes}
    ok = set()
    for ph, fqn in ep.graph_signature.inputs_to_parameters.items():
        users = list(by_name[ph].users)
        if users and all(u.target in (aten.addmm.default, aten.mm.default) and u.args[-1] is by_name[ph]
                         and by_name[ph] not in u.args[:-1] for u in users):
            ok.add(fqn)
    return ok


def _program_inputs(cx: _Ctx, ep: torch.export.ExportedProgram, user_inputs: list[Any],
                    splice: Splice | None) -> dict[str, Any]:
    """Each placeholder's IR value: a param (lifted parameters, buffers, constants), an `input` node, a
    spliced call's operand, or the constant a non-tensor input was specialized to."""
    sig = ep.graph_signature
    lifted = {**{k: (v, False) for k, v in sig.inputs_to_parameters.items()},
              **{k: (v, True) for k, v in sig.inputs_to_buffers.items()},
              **{k: (v, True) for k, v in sig.inputs_to_lifted_tensor_constants.items()}}
    user_names = set(sig.user_inputs)
    user_iter = iter(user_inputs)
    operand_iter = iter(splice.operands) if splice is not None else None
    out: dict[str, Any] = {}
    for n in ep.graph.nodes:
        if n.op != "placeholder":
            continue
        if n.name in lifted:
            out[n.name] = cx.state_param(*lifted[n.name])
        elif n.name in user_names:
            value = next(user_iter)
            if operand_iter is not None:
                out[n.name] = next(operand_iter)
            elif isinstance(value, torch.Tensor):
                out[n.name] = cx.graph.create_node("input", (), {}, name=n.name, meta=meta_of(value))
            else:
                out[n.name] = value  # a non-tensor input export specialized on
        else:
            raise CaptureError(f"torch.export lifted {n.name!r} as a {sig.input_specs} input slimfx cannot "
                               "hold (custom objects are not supported); keep the model's state in tensors")
    return out


_VIEW_TARGETS_CACHE: dict[Any, bool] = {}


def _is_view(n: fx.Node) -> bool:
    """Whether ATen node `n`'s result may share memory with an operand (a view: view, slice, transpose...)."""
    t = n.target
    if t not in _VIEW_TARGETS_CACHE:
        schema = getattr(t, "_schema", None)
        _VIEW_TARGETS_CACHE[t] = schema is None or any(r.alias_info is not None for r in schema.returns)
    return _VIEW_TARGETS_CACHE[t]


def _functional_variant(n: fx.Node) -> Any:
    """For an in-place ATen op (`aten.silu_`, `aten.mul_.Tensor`) that writes an intermediate no view shares
    (its operand made by a call that returns new memory, not read through a view): the functional overload
    (`aten.silu`, `aten.mul.Tensor`) computing the same value. The written node's later readers must then
    read this node instead (`inplace_target`). None otherwise (the op stays as it is)."""
    t = n.target
    if not isinstance(t, torch._ops.OpOverload) or not t._schema.is_mutable:
        return None
    name = t.overloadpacket.__name__
    if not name.endswith("_") or name.startswith("_") or not n.args:
        return None
    base = n.args[0]
    if not isinstance(base, fx.Node) or base.op != "call_function" \
            or (_is_view(base) and _functional_variant(base) is None):  # (an in-place op returns what it wrote)
        return None
    if any(u is not n and u.op == "call_function" and _is_view(u) for u in base.users):
        return None  # a view of the written tensor would see the write
    packet = getattr(aten, name[:-1], None)
    if packet is None:
        return None
    return getattr(packet, t._overloadname, None) or packet


def inplace_target(n: fx.Node) -> fx.Node | None:
    """The node an in-place op converted to its functional form writes (its readers after `n` read `n`)."""
    return n.args[0] if _functional_variant(n) is not None else None


def _convert_call(cx: _Ctx, n: fx.Node, lookup: Callable[[Any], Any], tuple_heads: set[fx.Node],
                  splice: Splice | None) -> Any:
    """The IR value of one call_function node: a new node, an existing value (an alias), or None (a check)."""
    cx.node, cx.module_path, cx.source = n, _module_path(n), _source(n)
    path, source, prefix = cx.module_path, cx.source, ""
    if splice is not None:  # the program's names are the call's; the graph's are the model's
        path, source, prefix = splice.module_path(cx.module_path), cx.source or splice.source, splice.name + "_"
    args = fx.node.map_aggregate(n.args, lookup)
    kwargs = fx.node.map_aggregate(n.kwargs, lookup)
    if n.target is operator.getitem and isinstance(n.args[0], fx.Node) and n.args[0] in tuple_heads:
        if n.args[1] != 0 and not n.users:  # torch.export keeps an unread getitem of the indices
            return None
        if n.args[1] != 0:
            raise CaptureError(f"node {n.name!r} reads output {n.args[1]} of {n.args[0].target} "
                               f"({cx.module_path or 'top level'}), which slimfx does not keep")
        return lookup(n.args[0])
    if n.target is operator.getitem:
        return cx.graph.create_node("getitem", (args[0],), dict(index=args[1]), name=prefix + n.name,
                                    meta=meta_of(cx.values.get(n)), source=source, module_path=path)
    conv = _converter(n.target)
    converted = None
    if conv is not None:
        try:
            converted = conv(cx, *args, **kwargs)
        except (TypeError, _NoConversion):
            converted = None
    functional = _functional_variant(n) if converted is None else None
    if functional is not None and (conv := _converter(functional)) is not None:
        try:  # an in-place op on an intermediate (silu_, mul_): its functional form; the caller rebinds
            converted = conv(cx, *args, **kwargs)
        except (TypeError, _NoConversion):
            converted = None
    if converted is _DROP:
        return None
    if isinstance(converted, _Alias):
        return converted.value
    value = cx.values.get(n)
    if n.target in _TUPLE_HEADS and converted is not None:
        tuple_heads.add(n)
        value = value[0]
    if converted is None:
        op, ins, attrs = "opaque", args, {"kind": "call_function", "target": n.target, "kwargs": kwargs}
    else:
        op, ins, attrs = converted
        if op not in OPS:
            raise CaptureError(f"the capture converter for {n.target} returned op {op!r}, which is not in the "
                               f"op table; register it first: ir.register_op({op!r}, impl, ...)")
    # `%addmm = linear(...)` would mislead; a node converted from another spelling is named after its op
    name = n.name if op == "opaque" or n.name.startswith(op) else op
    if op == "scalar" and not n.name.startswith(attrs["fn"]):
        name = attrs["fn"]
    return cx.graph.create_node(op, ins, attrs, name=prefix + name, meta=meta_of(value), source=source,
                                module_path=path)


def _set_outputs(graph: Graph, ep: torch.export.ExportedProgram, out: fx.Node, lookup: Callable,
                 set_outputs: bool = True, qual: Callable[[str], str] = str) -> Any:
    """The program's output structure (set as the graph's outputs unless `set_outputs` is False); buffer
    updates become nodes of their own."""
    sig = ep.graph_signature
    leaves = list(out.args[0])
    user, mutations = [], []
    for spec, leaf in zip(sig.output_specs, leaves):
        kind = spec.kind.name
        if kind == "USER_OUTPUT":
            user.append(lookup(leaf) if isinstance(leaf, fx.Node) else leaf)
        elif kind == "BUFFER_MUTATION":
            mutations.append((spec.target, lookup(leaf)))
        else:
            raise CaptureError(f"torch.export output {spec.arg} is a {kind}; slimfx captures inference graphs "
                               "whose only side effects are buffer updates (call model.eval() or stop mutating "
                               "inputs in forward)")
    for target, value in mutations:
        # the functional form of `buffer.copy_(new)`: keep the update so the graph does what the model does
        target = qual(target)
        graph.create_node("opaque", (Param(target), value), {"kind": "call_function",
                                                              "target": aten.copy_.default, "kwargs": {}},
                          name=f"update_{target.replace('.', '_')}")
    outputs = _structure(ep.call_spec.out_spec, user) if ep.call_spec.out_spec is not None else tuple(user)
    if set_outputs:
        graph.set_outputs(outputs)
    return outputs


def aten_converters() -> dict[Any, Callable]:
    """ATen ops (packets or overloads) that export capture turns into canonical ops (for docs and tests)."""
    return dict(_CONVERTERS)


__all__ = ["aten_converters", "capture_export", "export_program", "from_exported_program"]
