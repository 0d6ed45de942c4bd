"""Property test: random architectures export to ONNX and match their lowering in onnxruntime at
batch 1 and 7. Uses a small local generator until the lead's tests/generators.py lands on main."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ir
from exporters import to_onnx_model, validate_onnx, with_batch

ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish,
        "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "leaky": nn.LeakyReLU, "identity": nn.Identity}


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Net(nn.Module):
    def __init__(self, features: nn.Module, head: nn.Module, pool: str):
        super().__init__()
        self.features, self.head, self.pool = features, head, pool

    def forward(self, x):
        x = self.features(x)
        if self.pool == "adaptive":
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        elif self.pool == "mean":
            x = x.mean((2, 3))
        else:
            x = x.view(x.size(0), -1)
        return self.head(x)


class Tokens(nn.Module):
    """Sequence model: embedding, then attention-ish mixing and an MLP, pooled over tokens."""

    def __init__(self, d: int, heads: int, act: nn.Module, sdpa: bool, causal: bool):
        super().__init__()
        self.emb, self.qkv, self.mlp = nn.Embedding(20, d), nn.Linear(d, 3 * d), nn.Sequential(nn.Linear(d, d), act)
        self.ln, self.heads, self.sdpa, self.causal = nn.LayerNorm(d), heads, sdpa, causal

    def forward(self, ids):
        x = self.emb(ids)
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln(x)).chunk(3, -1)
        q, k, v = [t.reshape(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v)]
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            y = (q @ k.transpose(-1, -2) * (1.0 / (q.size(-1) ** 0.5))).softmax(-1) @ v
        x = x + y.transpose(1, 2).reshape(B, T, C)
        return self.mlp(x).mean(1)


def _init_bn(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@st.composite
def random_cnn(draw):
    c, hw = draw(st.integers(1, 4)), draw(st.sampled_from([4, 6, 8]))
    cin, layers = c, []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "dwconv", "residual", "pool", "bn"]))
        act = ACTS[draw(st.sampled_from(sorted(ACTS)))]()
        if kind == "pool":
            layers.append(draw(st.sampled_from([nn.MaxPool2d(2), nn.AvgPool2d(2)])))
        elif kind == "residual":
            h = cin * draw(st.integers(1, 3))
            layers.append(Residual(nn.Sequential(nn.Conv2d(cin, h, 1), nn.BatchNorm2d(h), act,
                                                 nn.Conv2d(h, cin, 3, padding=1, bias=False))))
        elif kind == "dwconv":
            layers += [nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), act]
        elif kind == "bn":
            layers += [nn.BatchNorm2d(cin), act]
        else:
            cout = draw(st.integers(1, 8))
            layers += [nn.Conv2d(cin, cout, draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 2])),
                                 padding=1), act]
            cin = cout
    features = nn.Sequential(*layers)
    x = torch.randn(2, c, hw, hw, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    with torch.no_grad():
        feat = features.eval()(x)
    if min(feat.shape[2:]) < 1:
        features = nn.Sequential()
        feat = x
    pool = draw(st.sampled_from(["adaptive", "mean", "flatten"]))
    width = feat.shape[1] if pool != "flatten" else feat[0].numel()
    hidden = draw(st.integers(2, 16))
    head = nn.Sequential(nn.Linear(width, hidden), ACTS[draw(st.sampled_from(sorted(ACTS)))](), nn.Linear(hidden, 5))
    model = Net(features, head, pool)
    _init_bn(model, 0)
    return model.eval(), (x,)


@st.composite
def random_tokens(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    d = heads * draw(st.integers(2, 6))
    model = Tokens(d, heads, ACTS[draw(st.sampled_from(sorted(ACTS)))](), draw(st.booleans()), draw(st.booleans()))
    t = draw(st.integers(1, 9))
    ids = torch.randint(0, 20, (2, t), generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    return model.eval(), (ids,)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(random_cnn(), random_tokens()))
def test_random_architectures_export_and_match(case):
    model, x = case
    g = ir.capture(model, x)
    proto = to_onnx_model(g, inputs=x)  # includes onnx.checker full_check (strict shape inference)
    rep = validate_onnx(proto, model, [with_batch(x, 1), with_batch(x, 7)], atol=1e-5, rtol=1e-5)
    assert rep.passed, f"{rep.summary()}\n{g}"
