"""The op the quantization passes add to the IR's op table for their own use.

`fake_quantize` is the straight-through-estimator (STE) form used only while
fine-tuning (QAT); the graphs it appears in are temporary, and the quantize
pass always folds back to canonical `quantize`/`dequantize` before it returns.
(What a quantized graph holds, `quantize`, `dequantize`, `dynamic_quantize` and
`matmul_nbits`, is in the IR's op table, ir/ops.py, with an emitter for each in exporters/onnx.)
"""

from __future__ import annotations

import torch

from slimfx.ir.ops import register_op
from slimfx.passes.quantize.observers import SCALE_FLOOR


def _channel_view(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def _reduce_abs(x: torch.Tensor, axis: int | None, how: str) -> torch.Tensor:
    a = x.abs()
    if axis is None:
        return a.max() if how == "max" else a.mean()
    dims = [d for d in range(x.dim()) if d != axis % x.dim()]
    return a.amax(dim=dims) if how == "max" else a.mean(dim=dims)


def _fake_quantize(x, scale=None, zero_point=None, *, qmin=-128, qmax=127, axis=None, mode="fixed"):
    """Quantize-dequantize in float with an STE gradient (1 inside the representable range, 0 outside).

    mode: fixed (given scale/zero point), absmax (symmetric scale recomputed from x per `axis`),
    pow2 (scale 2^-n, n the most fraction bits that cover max|x|), sign (mean|x| * sign(x) per `axis`).
    """
    if mode == "sign":
        alpha = _channel_view(_reduce_abs(x, axis, "mean"), x, axis).detach()
        xb = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x)) * alpha
        xc = x.clamp(-1.0, 1.0)  # clipped STE (XNOR-Net / BinaryConnect)
        return xc + (xb - xc).detach()
    if mode in ("absmax", "pow2"):
        amax = _reduce_abs(x, axis, "max").detach().clamp(min=SCALE_FLOOR)
        if mode == "pow2":  # as pow2_qparams: 2^-n, n in [-32, 126]
            amax = amax.max()
            scale = 2.0 ** -torch.floor(torch.log2(qmax / amax)).clamp(-32, 126)
        else:
            scale = (amax / qmax).clamp(min=SCALE_FLOOR)
        zero_point = torch.zeros_like(scale)
    s = _channel_view(scale, x, axis)
    z = _channel_view(zero_point, x, axis).to(x.dtype) if isinstance(zero_point, torch.Tensor) else zero_point
    lo, hi = (qmin - z) * s, (qmax - z) * s
    xc = torch.maximum(torch.minimum(x, hi), lo) if isinstance(lo, torch.Tensor) else x.clamp(lo, hi)
    xq = (torch.round(x / s) + z).clamp(qmin, qmax)
    return xc + ((xq - z) * s - xc).detach()


# QAT only: channel pruning stops at it (prune before quantizing)
register_op("fake_quantize", _fake_quantize, channels="block")
