"""Property test: random architectures (the project's MLP/CNN generator, plus attention models)
export to ONNX and match the original in onnxruntime at batch 1 and 7."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimfx import ir
from slimfx.exporters import to_onnx_model, validate_onnx, with_batch
from tests.generators import ACTIVATIONS as ACTS
from tests.generators import random_model


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


@st.composite
def random_tokens(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    d = heads * draw(st.integers(2, 6))
    model = Tokens(d, heads, ACTS[draw(st.sampled_from(sorted(ACTS)))](), draw(st.booleans()), draw(st.booleans()))
    t = draw(st.integers(1, 9))
    ids = torch.randint(0, 20, (2, t), generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    return model.eval(), (ids,)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(random_model(), random_tokens()))
def test_random_architectures_export_and_match(case):
    model, x = case
    g = ir.capture(model, x)
    proto = to_onnx_model(g, inputs=x)  # includes onnx.checker full_check (strict shape inference)
    rep = validate_onnx(proto, model, [with_batch(x, 1), with_batch(x, 7)], atol=1e-5, rtol=1e-5)
    assert rep.passed, f"{rep.summary()}\n{g}"
