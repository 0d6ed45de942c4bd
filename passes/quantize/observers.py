"""Range observers and quantization parameters.

An observer sees tensors (`update(x)`) and proposes a clipping range
(`range() -> (lo, hi)`); `qparams_from_range` turns a range into a scale and a
zero point for an integer type. Per-channel observers keep one range per index
of `axis`. Histogram observers (percentile, entropy, MSE) are per tensor: they
are meant for activations; weights use exact min/max per channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from slimfx.ir.errors import PassError

QRANGE: dict[torch.dtype, tuple[int, int]] = {torch.int8: (-128, 127), torch.uint8: (0, 255),
                                              torch.int32: (-(2**31), 2**31 - 1)}
DTYPES = {"int8": torch.int8, "uint8": torch.uint8}
# The smallest scale: the smallest normal float32 (1.18e-38). ONNX and onnxruntime take any positive finite
# float32 scale whose reciprocal is finite; a fixed floor such as 1e-12 turned every activation of a net
# whose values are ~5e-13 into exact zeros. A range that is exactly [0, 0] (a tensor that was zero on
# every calibration batch) gets this scale too: it stays zero. The quantize pass reports such tensors.
SCALE_FLOOR = float(torch.finfo(torch.float32).tiny)


@dataclass
class QParams:
    """Affine quantization parameters: x ≈ scale * (q - zero_point); per tensor when axis is None."""

    scale: torch.Tensor  # float32, 0-d or [C]
    zero_point: torch.Tensor  # `dtype`, same shape as scale
    dtype: torch.dtype
    axis: int | None = None
    # blocked (ONNX opset 21): scale and zero point hold one entry per `block_size` values along `axis`
    block_size: int | None = None

    @property
    def qmin(self) -> int:
        return QRANGE[self.dtype][0]

    @property
    def qmax(self) -> int:
        return QRANGE[self.dtype][1]

    def same_as(self, other: QParams) -> bool:
        return (self.dtype == other.dtype and self.axis == other.axis and self.block_size == other.block_size
                and self.scale.shape == other.scale.shape
                and torch.equal(self.scale, other.scale) and torch.equal(self.zero_point, other.zero_point))


def qparams_from_range(lo: torch.Tensor | float, hi: torch.Tensor | float, dtype: torch.dtype, *,
                       symmetric: bool, axis: int | None = None, qmin: int | None = None,
                       qmax: int | None = None) -> QParams:
    """Scale/zero point covering [lo, hi] (widened to contain 0, so zero is exact).

    Symmetric: zero point 0 (int8) or 128 (uint8) and scale = max|x| / qmax_sym, with the
    integer range restricted to be symmetric (e.g. [-127, 127]) so -x quantizes like x.
    Asymmetric: scale = (hi - lo) / (qmax - qmin), zero point = round(qmin - lo / scale).
    """
    lo = torch.as_tensor(lo, dtype=torch.float32).clamp(max=0.0)
    hi = torch.as_tensor(hi, dtype=torch.float32).clamp(min=0.0)
    tmin, tmax = QRANGE[dtype]
    qmin = tmin if qmin is None else qmin
    qmax = tmax if qmax is None else qmax
    if symmetric:
        half = (qmax - qmin) // 2  # 127 for int8 and uint8
        amax = torch.maximum(-lo, hi)
        scale = (amax / half).clamp(min=SCALE_FLOOR)
        center = 0 if dtype == torch.int8 else (qmin + qmax + 1) // 2
        zp = torch.full_like(scale, center)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=SCALE_FLOOR)
        zp = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    return QParams(scale.to(torch.float32), zp.to(dtype), dtype, axis)


def pow2_qparams(lo: torch.Tensor | float, hi: torch.Tensor | float, bits: int,
                 frac_bits: int | None = None, unsigned: bool = False) -> tuple[QParams, int]:
    """Fixed-point Qm.n: scale 2^-n, zero point 0, q in a `bits`-bit range stored as int8/uint8.

    n is the largest number of fraction bits whose range still covers max|x| (or `frac_bits`).
    Returns the params and n.
    """
    amax = float(torch.maximum(torch.as_tensor(lo).abs().max(), torch.as_tensor(hi).abs().max()))
    qmax = 2 ** bits - 1 if unsigned else 2 ** (bits - 1) - 1
    if frac_bits is None:
        frac_bits = 0 if amax <= 0 else math.floor(math.log2(qmax / amax))
        frac_bits = max(-32, min(frac_bits, 126))
    dtype = torch.uint8 if unsigned else torch.int8
    return QParams(torch.tensor(2.0 ** -frac_bits), torch.tensor(0, dtype=dtype), dtype), frac_bits


# --- observers -----------------------------------------------------------------------------------------

class Observer:
    """Sees tensors, proposes a range. Subclasses implement `update` and `range`."""

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.count = 0

    def _reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().to(torch.float32)
        if self.axis is None:
            return x.min(), x.max()
        flat = x.transpose(0, self.axis).reshape(x.shape[self.axis], -1)
        return flat.min(dim=1).values, flat.max(dim=1).values

    def update(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check(self) -> None:
        if self.count == 0:
            raise PassError(f"{type(self).__name__}: no data observed; calibration needs at least one batch")


class MinMaxObserver(Observer):
    """Running min and max of everything seen."""

    def __init__(self, axis: int | None = None) -> None:
        super().__init__(axis)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = self._reduce(x)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        self.count += 1

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._check()
        return self.lo, self.hi  # type: ignore[return-value]


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max (less sensitive to one outlier batch)."""

    def __init__(self, axis: int | None = None, averaging_constant: float = 0.01) -> None:
        super().__init__(axis)
        self.c = averaging_constant

    def update(self, x: torch.Tensor) -> None:
        lo, hi = self._reduce(x)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.lo + self.c * (lo - self.lo)
            self.hi = self.hi + self.c * (hi - self.hi)
        self.count += 1


class HistogramObserver(Observer):
    """Histogram of all values seen (per tensor), re-binned when the range grows.

    The histogram starts with the first batch that is not all zeros (its range sets the bins, however
    small); zeros seen before are counted into the bin of 0 then. Only zeros seen: the range is [0, 0].
    """

    def __init__(self, bins: int = 2048) -> None:
        super().__init__(None)
        self.bins = bins
        self.hist: torch.Tensor | None = None
        self.lo = 0.0
        self.hi = 0.0
        self.pending_zeros = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float32).flatten()
        self.count += 1
        if x.numel() == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if self.hist is None:
            if lo == hi == 0.0:
                self.pending_zeros += x.numel()
                return
            self.lo, self.hi = min(lo, 0.0), max(hi, 0.0)
            self.hist = torch.zeros(self.bins, dtype=torch.float64)
            if self.pending_zeros:
                self.hist += torch.histc(torch.zeros(1), self.bins, self.lo, self.hi).to(torch.float64) \
                    * self.pending_zeros
        elif lo < self.lo or hi > self.hi:
            self._rebin(min(lo, self.lo), max(hi, self.hi))
        self.hist += torch.histc(x, self.bins, self.lo, self.hi).to(torch.float64)

    def _rebin(self, lo: float, hi: float) -> None:
        """Move old counts to the new bins containing the old bin centers."""
        assert self.hist is not None
        old_w = (self.hi - self.lo) / self.bins
        centers = self.lo + (torch.arange(self.bins, dtype=torch.float64) + 0.5) * old_w
        idx = ((centers - lo) / ((hi - lo) / self.bins)).floor().clamp(0, self.bins - 1).long()
        new = torch.zeros(self.bins, dtype=torch.float64)
        new.index_add_(0, idx, self.hist)
        self.hist, self.lo, self.hi = new, lo, hi

    def edges(self) -> torch.Tensor:
        return torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64)

    def centers(self) -> torch.Tensor:
        e = self.edges()
        return (e[:-1] + e[1:]) / 2

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._check()
        return torch.tensor(self.lo), torch.tensor(self.hi)


class PercentileObserver(HistogramObserver):
    """Clip at the given percentile of the value distribution (both tails)."""

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(bins)
        if not 50.0 < percentile <= 100.0:
            raise PassError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._check()
        if self.hist is None:  # only zeros seen
            return torch.tensor(0.0), torch.tensor(0.0)
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        e = self.edges()
        q = self.percentile / 100.0
        hi_idx = int(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64)).clamp(max=self.bins - 1))
        lo_idx = int(torch.searchsorted(cdf, torch.tensor(1.0 - q, dtype=torch.float64)).clamp(max=self.bins - 1))
        hi = float(e[hi_idx + 1]) if self.hi > 0 else 0.0
        lo = float(e[lo_idx]) if self.lo < 0 else 0.0
        return torch.tensor(min(lo, 0.0)), torch.tensor(max(hi, 0.0))


class EntropyObserver(HistogramObserver):
    """TensorRT-style KL calibration: the |x| threshold whose quantized distribution loses least information."""

    def __init__(self, bins: int = 2048, levels: int = 128) -> None:
        super().__init__(bins)
        self.levels = levels
        self.zeros = 0.0

    def update(self, x: torch.Tensor) -> None:
        # exact zeros (ReLU outputs) are representable at any threshold; left in, their mass makes the
        # KL search prefer tiny ranges
        self.zeros += float((x == 0).sum())
        super().update(x)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._check()
        if self.hist is None:  # only zeros seen
            return torch.tensor(0.0), torch.tensor(0.0)
        # fold into a histogram of |x| over [0, amax]
        amax = max(-self.lo, self.hi)
        centers = self.centers().abs()
        idx = (centers / amax * self.bins).floor().clamp(0, self.bins - 1).long()
        h = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, idx, self.hist)
        h[0] = (h[0] - self.zeros).clamp(min=0)
        signed = bool(self.hist[self.centers() < 0].sum() > 0)
        levels = self.levels if signed else 2 * self.levels
        best_t, best_kl = self.bins, math.inf
        for t in range(levels, self.bins + 1, max(1, (self.bins - levels) // 256)):
            p = h[:t].clone()
            p[t - 1] += h[t:].sum()  # outliers clipped to the threshold
            # merge the t bins into `levels` groups, then spread each group's mass over its nonzero bins
            group = torch.div(torch.arange(t) * levels, t, rounding_mode="floor")
            nz = (h[:t] > 0).to(torch.float64)
            mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, h[:t])
            cnt = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, nz)
            q = nz * (mass / cnt.clamp(min=1))[group]
            kl = _kl(p, q)
            if kl < best_kl:
                best_kl, best_t = kl, t
        thr = amax * best_t / self.bins
        return torch.tensor(max(self.lo, -thr)), torch.tensor(min(self.hi, thr))


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    p = p / p.sum().clamp(min=1e-12)
    q = q / q.sum().clamp(min=1e-12)
    mask = p > 0
    q = q[mask].clamp(min=1e-12)
    return float((p[mask] * (p[mask] / q).log()).sum())


class MSEObserver(HistogramObserver):
    """Range whose quantize-dequantize round trip has least mean squared error on the histogram."""

    def __init__(self, bins: int = 2048, dtype: torch.dtype = torch.uint8, symmetric: bool = False,
                 steps: int = 100) -> None:
        super().__init__(bins)
        self.dtype, self.symmetric, self.steps = dtype, symmetric, steps

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._check()
        if self.hist is None:  # only zeros seen
            return torch.tensor(0.0), torch.tensor(0.0)
        x = self.centers()
        w = self.hist
        best, best_err = (self.lo, self.hi), math.inf
        for i in range(self.steps, 0, -1):
            f = i / self.steps
            lo, hi = self.lo * f, self.hi * f
            qp = qparams_from_range(lo, hi, self.dtype, symmetric=self.symmetric)
            s, z = float(qp.scale), float(qp.zero_point)
            xq = ((torch.round(x / s) + z).clamp(qp.qmin, qp.qmax) - z) * s
            err = float((w * (xq - x) ** 2).sum())
            if err < best_err:
                best, best_err = (lo, hi), err
        return torch.tensor(best[0]), torch.tensor(best[1])


#: the calibration methods make_observer builds (the type of quantize's `calibration` option)
Calibration = Literal["minmax", "moving-average", "percentile", "entropy", "mse"]
CALIBRATION_METHODS: tuple[str, ...] = get_args(Calibration)


def make_observer(method: str, *, axis: int | None = None, dtype: torch.dtype = torch.uint8,
                  symmetric: bool = False, percentile: float = 99.99) -> Observer:
    """Observer for a calibration method name (see CALIBRATION_METHODS)."""
    if method == "minmax":
        return MinMaxObserver(axis)
    if method == "moving-average":
        return MovingAverageMinMaxObserver(axis)
    if axis is not None:
        raise PassError(f"calibration method {method!r} is per tensor; use 'minmax' or 'moving-average' "
                        "for per-channel ranges")
    if method == "percentile":
        return PercentileObserver(percentile)
    if method == "entropy":
        return EntropyObserver()
    if method == "mse":
        return MSEObserver(dtype=dtype, symmetric=symmetric)
    raise PassError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
