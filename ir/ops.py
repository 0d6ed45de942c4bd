"""The canonical op table: each op's torch implementation, used by lowering.

A node `%y = op(inputs...) {attrs...}` lowers to `impl(*inputs, **attrs)`. The
implementations call exactly the kernels that torch's own modules call, so a
lowered graph is bit-exact with the model it was captured from.

Each op is registered once with its traits (`OpDef`): what passes and exporters need to
know of it (weighted layer, elementwise, reduction, shape op, how channels flow for pruning,
how it quantizes). Ops marked `training_flag` take `training=` from the lowered module's mode
when their `training` attr is None (batch_norm, dropout).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

CHANNEL_FLOWS = ("same", "broadcast", "weighted", "view", "reduce", "spatial", "block")
QUANT_ROLES = ("weight", "operands", "output", "transparent", "clipping", "table")
RESULTS = ("tensor", "tuple", "value", "any")


@dataclass(frozen=True)
class Weighted:
    """Trait of a layer `y = x ⊛ W + b` (conv, linear, conv_transpose). Operands follow one convention:
    `(x, weight, bias|None)`, with W's axis 0 the output channels and axis 1 the input channels
    (per group). `channel_dim` is the dim of x and y holding the channels (conv: 1, linear: -1);
    `grouped` says the op reads a `groups` attr (grouped/depthwise convolution). `transposed` layers
    (conv_transpose) keep torch's weight layout, the other way round: W is `[in, out/groups, k...]`,
    axis 0 the input channels and axis 1 the output channels per group. Passes that read weights by
    channel ask `out_axis`/`in_axis`, or work on `canonical_weight(...)` (`[out, in/groups, k...]`)."""

    channel_dim: int = 1
    grouped: bool = False
    transposed: bool = False

    @property
    def out_axis(self) -> int:
        """The weight axis that indexes output channels (per group when `transposed`)."""
        return 1 if self.transposed else 0

    @property
    def in_axis(self) -> int:
        """The weight axis that indexes input channels (per group unless `transposed`)."""
        return 0 if self.transposed else 1


def canonical_weight(w: torch.Tensor, layer: Weighted, groups: int = 1) -> torch.Tensor:
    """A layer's weight in the `[out, in/groups, k...]` layout (a view when it already is, or groups == 1)."""
    if not layer.transposed:
        return w
    if groups == 1:
        return w.transpose(0, 1)
    cin, opg = w.shape[0], w.shape[1]
    return w.reshape(groups, cin // groups, opg, *w.shape[2:]).transpose(1, 2).reshape(groups * opg, cin // groups,
                                                                                     *w.shape[2:])


def from_canonical_weight(w: torch.Tensor, layer: Weighted, groups: int = 1) -> torch.Tensor:
    """The inverse of `canonical_weight`: a `[out, in/groups, k...]` weight in the layer's own layout."""
    if not layer.transposed:
        return w
    if groups == 1:
        return w.transpose(0, 1).contiguous()
    cout, ipg = w.shape[0], w.shape[1]
    return w.reshape(groups, cout // groups, ipg, *w.shape[2:]).transpose(1, 2).reshape(groups * ipg, cout // groups,
                                                                                      *w.shape[2:]).contiguous()


@dataclass(frozen=True)
class OpDef:
    """What the IR knows of one canonical op: its implementation and its traits.

    Passes and exporters ask the traits (`ir.trait(op, name)`, `ir.ops_with(...)`) instead of
    keeping lists of op names, so an op registered later with the right traits goes through them.

    - `training_flag`: takes `training=` from the lowered module's mode when its attr is None.
    - `result`: tensor | tuple (of tensors, read with getitem: split) | value (a Python value, not a
      tensor: size, shape; meta may be None) | any (getitem: whatever it indexes).
    - `elementwise`: number of tensor operands combined element by element, with broadcasting
      (0: not elementwise; relu: 1; add: 2).
    - `weighted`: a `Weighted` layer (conv, linear), or None.
    - `reduction`: reduces over attr `dim` (None: all dims) with attr `keepdim` (mean, sum).
    - `shape_op`: moves or reinterprets data without arithmetic (reshape, permute, cat, split, ...).
    - `commutative`: the result does not depend on the order of the first two operands.
    - `channels`: how channels flow, for structured pruning (derived from the traits above when not
      given): same (channel i in gives channel i out: relu, batch_norm) | broadcast (elementwise with
      broadcasting: residual add couples its operands' channels) | weighted (consumes the channels of
      x at `channel_dim`, produces new ones: conv, linear) | view (data movement whose attrs name dims,
      never sizes, replayed on channel labels: permute, flatten, cat; reshape and split, whose attrs hold
      sizes, have pruning rules of their own) | reduce (combines positions along attr `dim`: mean, softmax) |
      spatial (combines positions of dims 2+, keeps dim 1: pools, interpolate) | block (channels stop
      here) | None (unknown: pruning refuses the channels that reach it, unless a pruning rule is
      registered for the op).
    - `quant`: what the quantize pass does with it: weight (integer weight per output channel, its
      input quantized, int32 bias: conv, linear) | operands (its activation operands are quantized:
      matmul) | output (an integer kernel only when its output is quantized too: add, mul (of two
      activations), sigmoid, average pools) |
      transparent (a quantized value passes through unchanged: reshape, max pool) | clipping (absorbed
      by the quantize that follows: relu, relu6) | table (an integer lookup table: embedding) | None
      (stays float).
    - `quant_output`: the integer kernel writes integers, so the quantize pass quantizes the op's output
      whenever it quantizes the op, also when the next op stays float (onnxruntime fuses a conv into
      QLinearConv only with a QuantizeLinear right after it, or after a ReLU; without one the conv runs
      in float on dequantized weights). Linear and matmul have integer kernels with float output
      (QGemm, MatMulIntegerToFloat) and leave it off.
    - `state_inputs`: operands that carry only run-time state the op updates in place
      (batch_norm's num_batches_tracked); they do not shape the output.
    - `stored_weights`: operands that may hold a layer's weights in stored form (quantized codes, packed 4-bit
      blocks, an int8 lookup table): an integer buffer read there counts as parameters (`count_params`), its
      scales and zero points do not.
    - `buffer_inputs`: operands that are module buffers, never trained (batch_norm's running mean, variance
      and counter): a param read there is not trainable (torch refuses running statistics that require
      grad), which is how `ir.parse` tells buffers from weights in IR text.
    - `macs`: `fn(node) -> int`, multiply-accumulates of a node (weighted ops have a generic formula).
    """

    name: str
    impl: Callable
    training_flag: bool = False
    result: str = "tensor"
    elementwise: int = 0
    weighted: Weighted | None = None
    reduction: bool = False
    shape_op: bool = False
    commutative: bool = False
    channels: str | None = None
    quant: str | None = None
    quant_output: bool = False
    state_inputs: tuple[int, ...] = ()
    buffer_inputs: tuple[int, ...] = ()
    stored_weights: tuple[int, ...] = ()
    macs: Callable[[Any], int] | None = None


OPS: dict[str, OpDef] = {}


def _derived_channels(op: OpDef) -> str | None:
    if op.weighted is not None:
        return "weighted"
    if op.elementwise == 1:
        return "same"
    if op.elementwise >= 2:
        return "broadcast"
    if op.reduction:
        return "reduce"
    if op.shape_op:
        return "view"
    return None


def register_op(name: str, impl: Callable, *, training_flag: bool = False, **traits: Any) -> OpDef:
    """Add (or replace) a canonical op with its traits (see `OpDef`). Later packages and users use
    this for ops of their own: `register_op("my_act", fn, elementwise=1)` goes through pruning (its
    channels are derived: same), stays float under quantize, and exports with an emitter
    (`exporters.onnx.register_emitter("my_act")`)."""
    op = OpDef(name, impl, training_flag, **traits)
    for key, allowed in (("channels", CHANNEL_FLOWS), ("quant", QUANT_ROLES), ("result", RESULTS)):
        v = getattr(op, key)
        if v is not None and v not in allowed:
            raise ValueError(f"register_op({name!r}): {key}={v!r} is not one of {', '.join(allowed)}")
    if op.weighted is not None and not isinstance(op.weighted, Weighted):
        raise ValueError(f"register_op({name!r}): weighted must be an ir.Weighted(channel_dim=, grouped=)")
    if op.channels is None:
        op = replace(op, channels=_derived_channels(op))
    OPS[name] = op
    return op


def get_op(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"unknown canonical op {name!r}; known: {', '.join(sorted(OPS))}") from None


def trait(op: str, name: str, default: Any = None) -> Any:
    """Trait `name` of op `op` (`default` for ops outside the table: input, output, opaque)."""
    d = OPS.get(op)
    return default if d is None else getattr(d, name)


class OpQuery:
    """The ops whose traits match, read from the table at each use (so ops registered later count):
    `"conv2d" in ops_with(quant="weight")`, `sorted(ops_with(weighted=True))`, `a | b`."""

    def __init__(self, pred: Callable[[OpDef], bool], text: str):
        self._pred = pred
        self._text = text

    def __contains__(self, op: object) -> bool:
        d = OPS.get(op) if isinstance(op, str) else None
        return d is not None and self._pred(d)

    def __iter__(self) -> Iterator[str]:
        return iter([n for n, d in OPS.items() if self._pred(d)])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __or__(self, other: OpQuery) -> OpQuery:
        return OpQuery(lambda d: self._pred(d) or other._pred(d), f"{self._text} | {other._text}")

    def __repr__(self) -> str:
        return f"ops_with({self._text})"


def ops_with(**traits: Any) -> OpQuery:
    """Ops whose traits equal the given values; a bool asks whether a trait is set
    (`ops_with(weighted=True)`: conv1d, conv2d, linear)."""
    for k in traits:
        if k not in OpDef.__dataclass_fields__ or k in ("name", "impl"):
            raise TypeError(f"ops_with: {k!r} is not an op trait")

    def pred(d: OpDef) -> bool:
        for k, v in traits.items():
            have = getattr(d, k)
            if (bool(have) != v) if isinstance(v, bool) else (have != v):
                return False
        return True
    return OpQuery(pred, ", ".join(f"{k}={v!r}" for k, v in traits.items()))


# --- implementations ------------------------------------------------------------------------------

def _conv1d(x, weight, bias=None, *, stride=(1,), padding=(0,), dilation=(1,), groups=1):
    return F.conv1d(x, weight, bias, stride, padding, dilation, groups)


def _conv2d(x, weight, bias=None, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _conv3d(x, weight, bias=None, *, stride=(1, 1, 1), padding=(0, 0, 0), dilation=(1, 1, 1), groups=1):
    return F.conv3d(x, weight, bias, stride, padding, dilation, groups)


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


def _max_pool3d(x, *, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    return F.max_pool3d(x, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)


def _avg_pool3d(x, *, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                divisor_override=None):
    return F.avg_pool3d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


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


def _amax(x, *, dim=None, keepdim=False):
    return x.amax() if dim is None else x.amax(dim, keepdim)


def _amin(x, *, dim=None, keepdim=False):
    return x.amin() if dim is None else x.amin(dim, keepdim)


def _size(x, *, dim=None):
    return x.size() if dim is None else x.size(dim)


def _shape_of(x):
    return x.shape


# Python arithmetic on shape values (`x.size(0) * heads`, `1 / math.sqrt(q.size(-1))`) that capture keeps
# because the value depends on a dynamic dim (batch, sequence); static ones are folded to constants.
SCALAR_FNS: dict[str, Callable] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv,
    "floordiv": operator.floordiv, "mod": operator.mod, "pow": operator.pow, "neg": operator.neg, "abs": abs,
    "sqrt": math.sqrt, "floor": math.floor, "ceil": math.ceil, "int": int, "float": float, "max": max, "min": min,
}


def _scalar(*args, fn):
    """`scalar(a, b) {fn='mul'}`: `a * b` on Python numbers (shape values), never on tensors."""
    return SCALAR_FNS[fn](*args)


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


def _conv_transpose1d(x, weight, bias=None, *, stride=(1,), padding=(0,), output_padding=(0,), groups=1,
                      dilation=(1,)):
    return F.conv_transpose1d(x, weight, bias, stride, padding, output_padding, groups, dilation)


def _conv_transpose2d(x, weight, bias=None, *, stride=(1, 1), padding=(0, 0), output_padding=(0, 0), groups=1,
                      dilation=(1, 1)):
    return F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation)


def _einsum(*operands, equation):
    return torch.einsum(equation, *operands)


def _rms_norm(x, weight=None, *, normalized_shape, eps=None):
    return F.rms_norm(x, normalized_shape, weight, eps)


def _instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None, *, use_input_stats=None,
                   momentum=0.1, eps=1e-5, training=False):
    """use_input_stats None: as nn.InstanceNorm, the input's own statistics in training mode or when
    there are no running statistics, else the running ones."""
    if use_input_stats is None:
        use_input_stats = bool(training) or running_mean is None
    return F.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum or 0.0, eps)


def _pixel_shuffle(x, *, upscale_factor):
    return F.pixel_shuffle(x, upscale_factor)


def _pixel_unshuffle(x, *, downscale_factor):
    return F.pixel_unshuffle(x, downscale_factor)


def _pad(x, *, pad, mode="constant", value=None):
    return F.pad(x, list(pad), mode=mode, value=value)


def _roll(x, *, shifts, dims):
    return torch.roll(x, list(shifts), list(dims))


def _cumsum(x, *, dim, dtype=None):
    return torch.cumsum(x, dim, dtype=dtype)


def _unbind(x, *, dim=0):
    return torch.unbind(x, dim)


def _addcmul(x, t1, t2, *, value=1):
    # torch's fused kernel (one rounding where the CPU has FMA): x + value * t1 * t2 as separate ops differs
    return torch.addcmul(x, t1, t2, value=value)


def _full(*, size, value, dtype=None):
    return torch.full(tuple(size), value, dtype=dtype)


def _full_like(x, *, value, dtype=None):
    return torch.full_like(x, value, dtype=dtype)


def _max_dim(x, *, dim, keepdim=False):
    return tuple(torch.max(x, dim, keepdim))


def _min_dim(x, *, dim, keepdim=False):
    return tuple(torch.min(x, dim, keepdim))


def _topk(x, *, k, dim=-1, largest=True, sorted=True):  # noqa: A002
    return tuple(torch.topk(x, k, dim, largest, sorted))


def _argmax(x, *, dim=None, keepdim=False):
    return torch.argmax(x, dim, keepdim)


def _argmin(x, *, dim=None, keepdim=False):
    return torch.argmin(x, dim, keepdim)


def _index_select(x, index, *, dim):
    return torch.index_select(x, dim, index)


def _gather(x, index, *, dim):
    return torch.gather(x, dim, index)


def _rnn_zeros(x, layers: int, hidden: int, batch_first: bool):
    """The zero initial state nn.LSTM / nn.GRU create when none is given."""
    return torch.zeros(layers, x.size(0 if batch_first else 1), hidden, dtype=x.dtype, device=x.device)


def _lstm(x, hx, *weights, hidden_size, num_layers=1, bias=True, batch_first=False, bidirectional=False,
          dropout=0.0, proj_size=0, training=False):
    """nn.LSTM's computation on a batched input: `(output, h_n, c_n)` (torch returns `(output, (h_n, c_n))`;
    capture maps the nested reads onto this flat tuple). `hx` is None (zeros) or `(h_0, c_0)`; `weights` are
    torch's flat weights in their order (per layer and direction: w_ih, w_hh[, b_ih, b_hh][, w_hr])."""
    if hx is None:
        layers = num_layers * (2 if bidirectional else 1)
        hx = (_rnn_zeros(x, layers, proj_size or hidden_size, batch_first),
              _rnn_zeros(x, layers, hidden_size, batch_first))
    return tuple(torch.lstm(x, tuple(hx), list(weights), bias, num_layers, dropout, bool(training), bidirectional,
                            batch_first))


def _gru(x, hx, *weights, hidden_size, num_layers=1, bias=True, batch_first=False, bidirectional=False,
         dropout=0.0, training=False):
    """nn.GRU's computation on a batched input: `(output, h_n)`; `hx` is None (zeros) or `h_0`."""
    if hx is None:
        hx = _rnn_zeros(x, num_layers * (2 if bidirectional else 1), hidden_size, batch_first)
    return tuple(torch.gru(x, hx, list(weights), bias, num_layers, dropout, bool(training), bidirectional,
                           batch_first))


_QRANGE = {torch.int8: (-128, 127), torch.uint8: (0, 255), torch.int32: (-(2**31), 2**31 - 1)}


def _broadcast_qparam(p, x, axis):
    if axis is None or not isinstance(p, torch.Tensor) or p.dim() == 0 or x.dim() == 1:
        return p
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def _blocked_qparam(p, q, axis, block_size):
    """A blocked scale or zero point (ONNX DequantizeLinear, opset 21: shaped like `q` but with
    ceil(D / block_size) entries along `axis`) repeated to `q`'s shape."""
    if not isinstance(p, torch.Tensor) or p.dim() == 0:
        return p
    return p.repeat_interleave(block_size, dim=axis).narrow(axis, 0, q.shape[axis])


def _qparams(scale, zero_point, x, axis, block_size):
    """Scale and zero point shaped to broadcast against `x` (per tensor, per channel along `axis`, or blocked)."""
    if block_size:
        return _blocked_qparam(scale, x, axis, block_size), _blocked_qparam(zero_point, x, axis, block_size)
    return _broadcast_qparam(scale, x, axis), _broadcast_qparam(zero_point, x, axis)


def _quantize(x, scale, zero_point, *, dtype=torch.int8, axis=None, block_size=None):
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point); `block_size` as in dequantize."""
    lo, hi = _QRANGE[dtype]
    s, z = _qparams(scale, zero_point, x, axis, block_size)
    q = torch.round(x / s) + (z.to(x.dtype) if isinstance(z, torch.Tensor) else z)
    return q.clamp(lo, hi).to(dtype)


def _dequantize(q, scale, zero_point, *, axis=None, block_size=None, bits=None):
    """ONNX DequantizeLinear: (q - zero_point) * scale, in float32.

    `block_size` (ONNX opset 21 blocked quantization): scale and zero point hold one entry per `block_size`
    consecutive values along `axis`. `bits`: how many bits the integers are stored in (4: ONNX INT4, the
    values held here as int8 in [-8, 7]); the arithmetic does not depend on it."""
    s, z = _qparams(scale, zero_point, q, axis, block_size)
    zf = z.to(torch.float32) if isinstance(z, torch.Tensor) else float(z)
    return (q.to(torch.float32) - zf) * s


# Compact forms of the two ops above, bit for bit the same results, for files that record every torch call
# (torch.export, TorchScript): `exporters._common.compact_quantization` writes them in place of the pairs.

def fake_quantize(x, scale, zero_point: int, *, dtype=torch.int8):
    """`_dequantize(_quantize(x, scale, zero_point, dtype=dtype), scale, zero_point)` per tensor (finite x;
    `zero_point` a Python int, int8/uint8): the clamped integers are exact in float32, so the round trip
    through `dtype` and back changes nothing and is left out (5 torch calls, 6 with a zero point, instead of
    10). `+ zero_point` stays even when it is 0: it turns round's -0.0 into +0.0 as the integer trip does."""
    lo, hi = _QRANGE[dtype]
    q = (torch.round(x / scale) + zero_point).clamp(lo, hi)
    return (q - zero_point) * scale if zero_point else q * scale


def dequantize_symmetric(q, scale, *, axis=None):
    """`_dequantize(q, scale, zeros)` when every zero point is 0 (symmetric weights and biases): q - 0.0 is
    q, and a float32 scale times the integers promotes them to float32 exactly as `.to(float32)` does, so one
    multiplication remains (two with a per-channel scale's reshape)."""
    s = _broadcast_qparam(scale, q, axis)
    if isinstance(s, torch.Tensor) and s.dtype == torch.float32 and not q.is_floating_point():
        return q * s
    return q.to(torch.float32) * s


def _dynamic_quantize(x):
    """ONNX DynamicQuantizeLinear: (uint8 values, scale, zero point) from x's own range at run time, with
    scale = (max(0, max x) - min(0, min x)) / 255 (1 when that is 0). Tuple-valued: read with getitem."""
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = ((hi - lo) / 255.0).to(torch.float32)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.round(0.0 - lo / scale).clamp(0, 255)
    q = (torch.round(x / scale) + zp).clamp(0, 255).to(torch.uint8)
    return q, scale, zp.to(torch.uint8)


def _shape(v: Any) -> tuple[int, ...] | None:
    return getattr(getattr(v, "meta", None), "shape", None)


def _matmul_macs(node: Any) -> int:
    a = _shape(node.inputs[0])
    out = _shape(node)
    return math.prod(out) * a[-1] if a and out is not None else 0


def _sdpa_macs(node: Any) -> int:
    q, k = _shape(node.inputs[0]), _shape(node.inputs[1])
    return 2 * math.prod(q) * k[-2] if q and k else 0  # QK^T and AV: each is (... L x S x E)


def _conv_transpose_macs(node: Any) -> int:
    """Each input element meets out/groups x kernel weights."""
    x = _shape(node.inputs[0])
    w = node.inputs[1]
    g = node.graph
    wshape = tuple(g.params[w.name].shape) if g is not None and getattr(w, "name", None) in g.params \
        else _shape(w)
    return math.prod(x) * math.prod(wshape[1:]) if x and wshape else 0


def _einsum_macs(node: Any) -> int:
    """One multiply-accumulate per point of the joint index space of the operands' letters."""
    eq = node.attrs.get("equation", "")
    ins = eq.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for spec, v in zip(ins, node.inputs):
        shape = _shape(v)
        if shape is None or "." in spec or len(spec) != len(shape):
            return 0
        sizes.update(zip(spec, shape))
    return math.prod(sizes.values()) if len(ins) > 1 else 0


def _rnn_macs(gates: int) -> Callable[[Any], int]:
    def macs(node: Any) -> int:
        x = _shape(node.inputs[0])
        if not x:
            return 0
        a = node.attrs
        h, layers = a["hidden_size"], a.get("num_layers", 1)
        dirs = 2 if a.get("bidirectional") else 1
        steps = x[0] * x[1]  # sequence x batch, in either layout
        total, feat = 0, x[-1]
        for _ in range(layers):
            total += dirs * steps * gates * h * (feat + h)
            feat = dirs * h
        return total
    return macs


# --- the table --------------------------------------------------------------------------------------

_CONV = dict(weighted=Weighted(channel_dim=1, grouped=True), quant="weight", quant_output=True)
register_op("conv1d", _conv1d, **_CONV)
register_op("conv2d", _conv2d, **_CONV)
register_op("conv3d", _conv3d, **_CONV)  # video: [batch, channels, time, H, W]
register_op("linear", _linear, weighted=Weighted(channel_dim=-1), quant="weight")
register_op("matmul", torch.matmul, quant="operands", macs=_matmul_macs)
register_op("scaled_dot_product_attention", _sdpa, macs=_sdpa_macs)
register_op("embedding", _embedding, quant="table", stored_weights=(1,))
# norms: batch_norm keeps channels (its params follow them); layer/group norm have pruning rules of their own
register_op("batch_norm", _batch_norm, training_flag=True, channels="same", state_inputs=(5,),
            buffer_inputs=(1, 2, 5))
register_op("layer_norm", _layer_norm)
register_op("group_norm", _group_norm)

for _name, _impl, _quant in [
    ("relu", F.relu, "clipping"), ("relu6", _relu6, "clipping"), ("gelu", _gelu, None), ("silu", F.silu, None),
    ("sigmoid", torch.sigmoid, "output"), ("tanh", torch.tanh, None), ("hardswish", F.hardswish, None),
    ("hardsigmoid", F.hardsigmoid, None), ("leaky_relu", _leaky_relu, None), ("clamp", _clamp, None),
    ("neg", operator.neg, None), ("sqrt", torch.sqrt, None), ("rsqrt", torch.rsqrt, None), ("exp", torch.exp, None),
    ("log", torch.log, None), ("abs", torch.abs, None), ("erf", torch.erf, None), ("sin", torch.sin, None), ("cos", torch.cos, None),
    ("reciprocal", torch.reciprocal, None), ("cast", _cast, None), ("identity", _identity, "transparent"),
]:
    register_op(_name, _impl, elementwise=1, quant=_quant)
register_op("dropout", _dropout, training_flag=True, elementwise=1, quant="transparent")
register_op("contiguous", _contiguous, elementwise=1, shape_op=True, quant="transparent")
for _name, _impl in [("softmax", _softmax), ("log_softmax", _log_softmax)]:
    register_op(_name, _impl, channels="reduce")

register_op("add", operator.add, elementwise=2, commutative=True, quant="output")
register_op("mul", operator.mul, elementwise=2, commutative=True, quant="output")
for _name, _impl in [("sub", operator.sub), ("div", operator.truediv), ("pow", operator.pow)]:
    register_op(_name, _impl, elementwise=2)
# elementwise minimum/maximum of two tensors (torch.minimum, torch.min(a, b): T5's position buckets)
register_op("minimum", torch.minimum, elementwise=2, commutative=True)
register_op("maximum", torch.maximum, elementwise=2, commutative=True)

for _name, _impl, _quant in [
    ("max_pool1d", _max_pool1d, "transparent"), ("max_pool2d", _max_pool2d, "transparent"),
    ("avg_pool1d", _avg_pool1d, "output"), ("avg_pool2d", _avg_pool2d, "output"),
    ("adaptive_avg_pool1d", F.adaptive_avg_pool1d, "output"), ("adaptive_avg_pool2d", F.adaptive_avg_pool2d, "output"),
    ("adaptive_max_pool2d", F.adaptive_max_pool2d, None), ("interpolate", _interpolate, None),
    ("max_pool3d", _max_pool3d, "transparent"), ("avg_pool3d", _avg_pool3d, "output"),
    ("adaptive_avg_pool3d", F.adaptive_avg_pool3d, "output"), ("adaptive_max_pool3d", F.adaptive_max_pool3d, None),
]:
    register_op(_name, _impl, channels="spatial", quant=_quant)

for _name, _impl, _quant in [
    ("reshape", _reshape, "transparent"), ("flatten", _flatten, "transparent"), ("permute", _permute, "transparent"),
    ("transpose", _transpose, "transparent"), ("squeeze", _squeeze, "transparent"),
    ("unsqueeze", _unsqueeze, "transparent"), ("expand", _expand, None), ("cat", _cat, None), ("stack", _stack, None),
    ("slice", _slice, None),
]:
    register_op(_name, _impl, shape_op=True, quant=_quant)
register_op("split", _split, shape_op=True, result="tuple")
register_op("chunk", _chunk, shape_op=True, result="tuple")
register_op("getitem", _getitem, result="any")
register_op("size", _size, result="value")
register_op("shape", _shape_of, result="value")
register_op("scalar", _scalar, result="value")
register_op("mean", _mean, reduction=True)
register_op("sum", _sum, reduction=True)
# amax/amin{dim, keepdim}: the largest / smallest values (torch.amax; torch.max(x) over all values: dim None)
register_op("amax", _amax, reduction=True)
register_op("amin", _amin, reduction=True)

# transposed convolution: torch's weight layout [in, out/groups, k...] (see Weighted.transposed)
_CONV_T = dict(weighted=Weighted(channel_dim=1, grouped=True, transposed=True), quant="weight",
               macs=_conv_transpose_macs)
register_op("conv_transpose1d", _conv_transpose1d, **_CONV_T)
register_op("conv_transpose2d", _conv_transpose2d, **_CONV_T)
register_op("einsum", _einsum, macs=_einsum_macs)
register_op("rms_norm", _rms_norm)
# instance_norm: per-channel statistics and params (pruning: as batch_norm); running stats only when tracked
register_op("instance_norm", _instance_norm, training_flag=True, buffer_inputs=(1, 2))
register_op("pixel_shuffle", _pixel_shuffle, shape_op=True, quant="transparent")
register_op("pixel_unshuffle", _pixel_unshuffle, shape_op=True, quant="transparent")
# bool masks: comparisons, logic, selection (the result of a comparison is bool; `where` takes any dtypes)
for _name, _impl, _comm in [
    ("eq", operator.eq, True), ("ne", operator.ne, True), ("lt", operator.lt, False), ("le", operator.le, False),
    ("gt", operator.gt, False), ("ge", operator.ge, False), ("logical_and", torch.logical_and, True),
    ("logical_or", torch.logical_or, True), ("logical_xor", torch.logical_xor, True),
]:
    register_op(_name, _impl, elementwise=2, commutative=_comm)
register_op("logical_not", torch.logical_not, elementwise=1)
# `a & b`, `a | b`, `a ^ b`, `~a`: logical on bool masks, bitwise on integers (the dtype is kept)
for _name, _impl in [("bitwise_and", operator.and_), ("bitwise_or", operator.or_), ("bitwise_xor", operator.xor)]:
    register_op(_name, _impl, elementwise=2, commutative=True)
register_op("bitwise_not", operator.invert, elementwise=1)
register_op("where", torch.where, elementwise=3)
register_op("cumsum", _cumsum, channels="reduce")
# pad{pad (torch's order: last dim first, begin/end pairs), mode, value}; roll{shifts, dims} (dims never empty).
# Pruning stops at both (their attrs name positions of dims, not channels); roll moves quantized values as
# they are, pad stays float (its fill value need not be on the quantization grid)
register_op("pad", _pad, shape_op=True, channels="block")
register_op("roll", _roll, shape_op=True, channels="block", quant="transparent")
register_op("topk", _topk, result="tuple")
# unbind{dim}: the slices along dim with dim removed (tuple; `q, k, v = qkv.unbind(0)`); pruning stops at it
register_op("unbind", _unbind, shape_op=True, result="tuple", channels="block")
# addcmul(x, t1, t2){value}: x + value * t1 * t2 (resmlp's affine: addcmul(beta, alpha, x))
register_op("addcmul", _addcmul, elementwise=3)
# full{size, value, dtype}: a tensor of one value whose size may follow the input's (size entries may be
# `size` nodes: torch.zeros((B, H, W)), new_ones, full); no tensor operands
register_op("full", _full, channels="block")
# full_like(x){value, dtype}: x's shape (whatever it is at run time) filled with one value: zeros_like, ones_like,
# full_like (T5's relative-position buckets); its channels are x's
register_op("full_like", _full_like, channels="same")
# max_dim/min_dim{dim, keepdim}: torch.max(x, dim) / x.min(dim): (values, indices), read with getitem (PointNet's and
# TextCNN's global max pooling); pruning stops at them
register_op("max_dim", _max_dim, result="tuple", channels="block")
register_op("min_dim", _min_dim, result="tuple", channels="block")
register_op("argmax", _argmax, reduction=True)
register_op("argmin", _argmin, reduction=True)
register_op("index_select", _index_select)
register_op("gather", _gather)
# recurrent layers: float under quantize; pruning follows the channels they read (rules in passes.prune)
register_op("lstm", _lstm, training_flag=True, result="tuple", macs=_rnn_macs(4))
register_op("gru", _gru, training_flag=True, result="tuple", macs=_rnn_macs(3))

register_op("quantize", _quantize, channels="block")
register_op("dequantize", _dequantize, channels="block", stored_weights=(0,))
# run-time quantization (int8-dynamic): channel pruning stops at it (prune before quantizing)
register_op("dynamic_quantize", _dynamic_quantize, result="tuple", channels="block")
register_op("mask", _mask, elementwise=2)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` codes per row of uint8 rows holding `bits`-bit codes, low bits first."""
    p = packed.reshape(packed.shape[0], -1).to(torch.int16)
    if bits == 8:
        codes = p
    else:
        per = 8 // bits
        codes = torch.stack([(p >> (bits * i)) & (2 ** bits - 1) for i in range(per)], dim=-1).reshape(p.shape[0], -1)
    return codes[:, :count]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Rows of `bits`-bit codes (0..2^bits - 1) packed into uint8, low bits first (MatMulNBits' layout);
    a row whose length is not a multiple of 8 / bits is padded with zeros."""
    per = 8 // bits
    c = codes.to(torch.int16)
    pad = (-c.shape[-1]) % per
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, per)
    out = torch.zeros(c.shape[:-1], dtype=torch.int16, device=c.device)
    for i in range(per):
        out |= c[..., i] << (bits * i)
    return out.to(torch.uint8)


def nbits_weight(qweight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, *, bits: int,
                 block_size: int, k: int) -> torch.Tensor:
    """The float weight [N, K] a MatMulNBits node computes with: (code - zero point) * scale per block."""
    n, blocks = scales.shape[0], scales.reshape(scales.shape[0], -1).shape[1]
    codes = unpack_codes(qweight, bits, blocks * block_size).reshape(n, blocks, block_size)
    zp = unpack_codes(zero_points, bits, blocks).reshape(n, blocks, 1) if zero_points is not None \
        else torch.full((n, blocks, 1), 2 ** (bits - 1), dtype=torch.int16, device=scales.device)
    w = (codes - zp).to(torch.float32) * scales.reshape(n, blocks, 1).to(torch.float32)
    return w.reshape(n, -1)[:, :k]


def _matmul_nbits(x, qweight, scales, zero_points=None, bias=None, *, k, n, bits, block_size, accuracy_level=0,
                  form="nbits"):
    """onnxruntime's MatMulNBits: x @ W^T (+ bias), W [N, K] stored as block-quantized `bits`-bit codes.
    `form` only says how the ONNX file computes it (nbits: MatMulNBits; folded: the codes dequantized by ops
    onnxruntime folds at load, then a float MatMul); the arithmetic is the same."""
    w = nbits_weight(qweight, scales, zero_points, bits=bits, block_size=block_size, k=k).to(x.dtype)
    y = torch.matmul(x, w.t())
    return y + bias if bias is not None else y


def _matmul_nbits_macs(node) -> int:
    meta = node.meta
    return int(meta.numel * node.attrs["k"]) if meta is not None else 0


def _gather_nbits(ids, qweight, scales, zero_points=None, *, k, bits, block_size, form="nbits"):
    """onnxruntime's GatherBlockQuantized: rows `ids` of a table [N, K] stored as matmul_nbits stores a weight
    (block-quantized `bits`-bit codes along K), dequantized; a table tied to an LM head is one set of codes.
    `form`, as matmul_nbits': GatherBlockQuantized, or a Gather on the table dequantized at load."""
    return F.embedding(ids, nbits_weight(qweight, scales, zero_points, bits=bits, block_size=block_size, k=k))


# weight-only low-bit linear layers and table lookups (quantize-weights, passes/quantize/weight_only.py);
# exported as MatMulNBits and GatherBlockQuantized, which read the same packed codes
register_op("matmul_nbits", _matmul_nbits, channels="block", macs=_matmul_nbits_macs, stored_weights=(1,))
register_op("gather_nbits", _gather_nbits, channels="block", stored_weights=(1,))

# Ops that are not canonical table entries but are structural parts of every graph.
STRUCTURAL_OPS = ("input", "output", "opaque")

# Ops whose result does not depend on the order of their first two inputs (a live view of the trait).
COMMUTATIVE_OPS = ops_with(commutative=True)
