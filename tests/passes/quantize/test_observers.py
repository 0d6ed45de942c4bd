"""Observers against hand-computed ranges, and qparams from ranges."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from slimfx.ir.errors import PassError
from slimfx.passes.quantize.observers import (
    EntropyObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    make_observer,
    pow2_qparams,
    qparams_from_range,
)


def test_minmax_per_tensor_and_per_channel():
    o = MinMaxObserver()
    o.update(torch.tensor([[-1.0, 2.0], [0.5, 3.0]]))
    o.update(torch.tensor([[-4.0, 1.0]]))
    lo, hi = o.range()
    assert (float(lo), float(hi)) == (-4.0, 3.0)
    pc = MinMaxObserver(axis=1)
    pc.update(torch.tensor([[-1.0, 2.0, 0.0], [0.5, 3.0, -2.0]]))
    lo, hi = pc.range()
    assert lo.tolist() == [-1.0, 2.0, -2.0] and hi.tolist() == [0.5, 3.0, 0.0]


def test_moving_average():
    o = MovingAverageMinMaxObserver(averaging_constant=0.5)
    o.update(torch.tensor([0.0, 4.0]))
    o.update(torch.tensor([-2.0, 8.0]))
    lo, hi = o.range()
    assert float(lo) == pytest.approx(-1.0) and float(hi) == pytest.approx(6.0)


def test_percentile_clips_outliers():
    x = torch.linspace(0, 1, 10001)
    x[-1] = 100.0  # one outlier
    o = PercentileObserver(percentile=99.9)
    o.update(x[:5000])
    o.update(x[5000:])  # range grows: histogram is re-binned
    lo, hi = o.range()
    assert float(lo) == 0.0
    assert 0.95 < float(hi) < 1.2  # the 99.9th percentile of ~U(0,1), not the outlier


def test_entropy_ignores_a_far_outlier_but_keeps_the_bulk():
    x = torch.randn(200000, generator=torch.Generator().manual_seed(0)).abs()
    x[0] = 60.0
    obs = EntropyObserver()
    obs.update(x)
    lo, hi = obs.range()
    assert float(lo) == 0.0
    assert 2.5 < float(hi) < 20.0


def _qdq_mse(x, lo, hi):
    qp = qparams_from_range(lo, hi, torch.int8, symmetric=True)
    s = float(qp.scale)
    return float((((x / s).round().clamp(-127, 127)) * s - x).pow(2).mean())


def test_mse_range_beats_minmax_and_percentile_on_heavy_tails():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((100000,))
    obs = MSEObserver(dtype=torch.int8, symmetric=True)
    obs.update(x)
    lo, hi = obs.range()
    err = _qdq_mse(x, lo, hi)
    assert err < 0.9 * _qdq_mse(x, x.min(), x.max())
    p = PercentileObserver(99.0)
    p.update(x)
    assert err <= _qdq_mse(x, *p.range()) * 1.01


def test_histogram_observers_are_per_tensor_only():
    with pytest.raises(PassError, match="per tensor"):
        make_observer("entropy", axis=0)
    with pytest.raises(PassError, match="unknown calibration method 'kl'"):
        make_observer("kl")
    with pytest.raises(PassError, match="no data observed"):
        MinMaxObserver().range()


def test_qparams_hand_computed():
    qp = qparams_from_range(-1.0, 3.0, torch.uint8, symmetric=False)
    assert float(qp.scale) == pytest.approx(4.0 / 255)
    assert int(qp.zero_point) == round(1.0 / (4.0 / 255))  # 64
    qp = qparams_from_range(0.5, 3.0, torch.uint8, symmetric=False)  # widened to contain 0
    assert int(qp.zero_point) == 0 and float(qp.scale) == pytest.approx(3.0 / 255)
    qp = qparams_from_range(torch.tensor([-2.0, -0.1]), torch.tensor([1.0, 0.5]), torch.int8, symmetric=True,
                            axis=0, qmin=-127, qmax=127)
    assert qp.scale.tolist() == pytest.approx([2.0 / 127, 0.5 / 127]) and qp.zero_point.tolist() == [0, 0]
    qp, n = pow2_qparams(-3.0, 2.0, bits=8)
    assert n == 5 and float(qp.scale) == 2.0 ** -5  # 3 * 2^5 = 96 <= 127 < 3 * 2^6


@given(st.floats(-100, -1e-3), st.floats(1e-3, 100), st.sampled_from([torch.int8, torch.uint8]),
       st.booleans())
def test_qparams_represent_zero_exactly_and_cover_range(lo, hi, dtype, symmetric):
    qp = qparams_from_range(lo, hi, dtype, symmetric=symmetric)
    assert qp.qmin <= int(qp.zero_point) <= qp.qmax
    s, z = float(qp.scale), int(qp.zero_point)
    # the representable range covers [lo, hi] up to half a step of rounding
    assert (qp.qmin - z) * s <= lo + s and (qp.qmax - z) * s >= hi - s


def test_entropy_is_not_fooled_by_relu_zeros():
    x = torch.relu(torch.randn(200000, generator=torch.Generator().manual_seed(2)) - 0.5)  # ~70% exact zeros
    obs = EntropyObserver()
    obs.update(x)
    lo, hi = obs.range()
    assert float(lo) == 0.0 and float(hi) > 2.0  # keeps the bulk of the positive tail (max is ~4.7)
