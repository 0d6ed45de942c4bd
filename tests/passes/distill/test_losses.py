"""Distillation losses against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimfx.ir.errors import PassError
from slimfx.passes.distill import (
    AttentionTransferLoss,
    CombinedLoss,
    CTKDLoss,
    KDLoss,
    LogitStdKDLoss,
    attention_map,
    grad_reverse,
    make_loss,
)


def test_kd_t1_equals_soft_cross_entropy_minus_teacher_entropy():
    torch.manual_seed(0)
    s = torch.randn(5, 4, requires_grad=True)
    t = torch.randn(5, 4)
    pt = t.softmax(1)
    soft_ce = -(pt * s.log_softmax(1)).sum(1).mean()
    entropy = -(pt * pt.log()).sum(1).mean()
    kd = KDLoss(T=1.0, alpha=1.0)(s, t)
    assert torch.allclose(kd, soft_ce - entropy, atol=1e-6)
    g_kd, = torch.autograd.grad(kd, s)
    g_ce, = torch.autograd.grad(soft_ce, s)
    assert torch.allclose(g_kd, g_ce, atol=1e-6)  # same gradient: KD at T=1 *is* soft-label CE


def test_kd_hand_computed_with_temperature_and_alpha():
    s = torch.tensor([[1.0, 2.0, 0.0]])
    t = torch.tensor([[3.0, 1.0, 0.0]])
    y = torch.tensor([1])
    T, a = 2.0, 0.75
    ps = [math.exp(v / T) for v in (1.0, 2.0, 0.0)]
    pt = [math.exp(v / T) for v in (3.0, 1.0, 0.0)]
    ps = [v / sum(ps) for v in ps]
    pt = [v / sum(pt) for v in pt]
    kl = sum(p * math.log(p / q) for p, q in zip(pt, ps))
    ce = -math.log(math.exp(2.0) / (math.exp(1.0) + math.exp(2.0) + 1.0))
    want = (1 - a) * ce + a * T * T * kl
    assert KDLoss(T=T, alpha=a)(s, t, y).item() == pytest.approx(want, rel=1e-5)
    assert KDLoss(T=T, alpha=0.0)(s, t, y).item() == pytest.approx(ce, rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(2, 8), st.floats(0.5, 10.0), st.integers(0, 10_000))
def test_kd_is_nonnegative_and_zero_iff_student_matches(batch, classes, T, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, classes, generator=g) * 3
    t = torch.randn(batch, classes, generator=g) * 3
    loss = KDLoss(T=T, alpha=1.0)
    assert loss(s, t).item() >= -1e-6
    assert abs(loss(t + 1.5, t).item()) < 1e-5  # a constant shift changes no probability


def test_logit_standardization_ignores_logit_scale_and_shift():
    torch.manual_seed(1)
    t = torch.randn(6, 10)
    s = torch.randn(6, 10)
    loss = LogitStdKDLoss(T=2.0, alpha=1.0)
    assert loss(3.0 * t + 2.0, t).item() == pytest.approx(0.0, abs=1e-5)
    assert loss(4.0 * s - 1.0, t).item() == pytest.approx(loss(s, t).item(), rel=1e-5)
    # plain KD is not scale invariant: the standardization is what removes it
    assert KDLoss(T=2.0, alpha=1.0)(3.0 * t, t).item() > 0.05


def test_attention_map_normalisation_by_hand():
    a = torch.zeros(1, 2, 2, 2)
    a[0, 0] = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    a[0, 1] = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    # mean over channels of a^2: [[1, 0], [2, 2]]; unit-normalised by sqrt(1 + 4 + 4) = 3
    want = torch.tensor([[1.0, 0.0, 2.0, 2.0]]) / 3.0
    q = attention_map(a, p=2)
    assert torch.allclose(q, want)
    assert torch.allclose(q.norm(dim=1), torch.ones(1))
    assert torch.allclose(attention_map(5.0 * a), q)  # invariant to feature scale


def test_attention_transfer_value_and_spatial_mismatch_error():
    torch.manual_seed(2)
    fs, ft = torch.randn(3, 4, 5, 5), torch.randn(3, 7, 5, 5)  # channels may differ
    at = AttentionTransferLoss(beta=10.0, names=["s:t"])
    want = 10.0 / 2 * (attention_map(fs) - attention_map(ft)).pow(2).mean()
    assert at(None, None, None, (fs,), (ft,)).item() == pytest.approx(want.item(), rel=1e-6)
    assert at(None, None, None, (fs,), (fs.clone(),)).item() == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(PassError, match=r"pair s:t.*\[3, 4, 5, 5\].*\[3, 7, 4, 4\].*spatial size"):
        at(None, None, None, (fs,), (torch.randn(3, 7, 4, 4),))


def test_gradient_reversal_flips_and_scales_the_gradient():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = grad_reverse(x, 0.5)
    assert torch.equal(y, x)
    (y * torch.tensor([3.0, 4.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-1.5, -2.0]))


def test_ctkd_temperature_gradient_ascends_the_kd_loss():
    torch.manual_seed(3)
    s, t = torch.randn(8, 10), torch.randn(8, 10) * 4
    loss = CTKDLoss(T=4.0, alpha=1.0, lambda_max=1.0, warmup=0.5)
    loss.set_progress(0, 10)
    assert loss.lam == 0.0  # curriculum starts with no adversarial signal
    loss.set_progress(5, 10)
    assert loss.lam == pytest.approx(1.0)
    loss.set_progress(2, 10)
    lam = loss.lam
    assert 0.0 < lam < 1.0
    loss(s, t).backward()
    # numerical d(loss)/d(raw) without reversal
    eps = 1e-3
    with torch.no_grad():
        loss.raw += eps
        up = loss(s, t).item()
        loss.raw -= 2 * eps
        down = loss(s, t).item()
        loss.raw += eps
    numeric = (up - down) / (2 * eps)
    assert abs(numeric) > 1e-4
    assert loss.raw.grad.item() == pytest.approx(-lam * numeric, rel=2e-2)
    # one SGD step on the reversed gradient raises the loss (T is the adversary)
    before = loss(s, t).item()
    with torch.no_grad():
        loss.raw -= 0.5 * loss.raw.grad
    assert loss(s, t).item() > before


def test_make_loss_names_and_errors():
    assert isinstance(make_loss("kd", T=3.0), KDLoss)
    assert isinstance(make_loss("ctkd"), CTKDLoss)
    assert isinstance(make_loss("logit-std"), LogitStdKDLoss)
    combo = make_loss("at+ctkd", beta=50.0, T=3.0)
    assert isinstance(combo, CombinedLoss) and isinstance(combo.logit_loss, CTKDLoss) and combo.at.beta == 50.0
    assert make_loss("at").uses_features and not make_loss("kd").uses_features
    with pytest.raises(PassError, match="unknown distillation loss 'dk'.*at\\+kd"):
        make_loss("dk")
    with pytest.raises(PassError, match="no attention-transfer term"):
        make_loss("kd", beta=1.0)
    with pytest.raises(PassError, match="'kd'.*unexpected keyword argument 'tau'"):
        make_loss("kd", tau=1.0)


def test_mismatched_teacher_student_logits_raise():
    with pytest.raises(PassError, match=r"student gives \[2, 10\], teacher gives \[2, 100\]"):
        KDLoss()(torch.randn(2, 10), torch.randn(2, 100), torch.tensor([0, 1]))
    with pytest.raises(PassError, match="needs labels"):
        KDLoss(alpha=0.5)(torch.randn(2, 10), torch.randn(2, 10))
