"""The op the quantization passes add to the IR's op table for their own use.

`fake_quantize` is the straight-through-estimator (STE) form used only while
fine-tuning (QAT); the graphs it appears in are temporary, and the quantize
pass always folds back to canonical `quantize`/`dequantize` before it returns.
(What a quantized graph holds, `quantize`, `dequantize` and `dynamic_quantize`,
is in the IR's op table, ir/ops.py, with an emitter for each in exporters/onnx.)
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


# weight-only low-bit linear layers (passes/quantize/weight_only.py); exported as MatMulNBits
register_op("matmul_nbits", _matmul_nbits, channels="block", macs=_matmul_nbits_macs)
