"""Registry contract, shapes, fx capture and seeded determinism of every zoo model."""

from __future__ import annotations

import pytest
import torch
import torch.fx

from slimfx import models

EXPECTED = ["mlp", "digits_cnn", "resnet20", "mobilenetv2", "tiny_bert"]


def test_names_and_get_contract():
    assert models.names() == EXPECTED
    for name in EXPECTED:
        spec = models.get(name)
        assert spec.name == name
        assert isinstance(spec.description, str) and spec.description
        assert spec.num_classes >= 2
        assert spec.dataset in models.dataset_names()


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError) as info:
        models.get("resnet9000")
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "resnet9000" in msg and all(n in msg for n in EXPECTED)


@pytest.mark.parametrize("name", EXPECTED)
def test_build_is_eval_and_outputs_logits(name):
    spec = models.get(name)
    module = spec.build()
    assert not module.training
    assert all(not m.training for m in module.modules())
    for batch in (1, 2, 5):
        (x,) = spec.example_inputs(batch)
        with torch.no_grad():
            out = module(x)
        assert out.shape == (batch, spec.num_classes)
        assert torch.isfinite(out).all()


def test_example_inputs_dtype_and_range():
    (x,) = models.get("tiny_bert").example_inputs(4)
    assert x.dtype == torch.int64 and x.shape == (4, 64)
    assert x.min() >= 0 and x.max() < models.get("tiny_bert").build().tok_emb.num_embeddings
    (img,) = models.get("resnet20").example_inputs(2)
    assert img.dtype == torch.float32 and img.shape == (2, 3, 32, 32)
    assert torch.equal(models.get("mlp").example_inputs(3, seed=7)[0], models.get("mlp").example_inputs(3, seed=7)[0])


@pytest.mark.parametrize("name", EXPECTED)
def test_symbolic_trace_matches_eager(name):
    spec = models.get(name)
    module = spec.build(seed=1)
    traced = torch.fx.symbolic_trace(module)
    for batch, seed in ((1, 0), (3, 1)):
        inputs = spec.example_inputs(batch, seed=seed)
        with torch.no_grad():
            assert torch.equal(traced(*inputs), module(*inputs))


def test_build_is_seeded_and_leaves_global_rng_alone():
    spec = models.get("digits_cnn")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = spec.build(seed=0), spec.build(seed=0), spec.build(seed=1)
    assert torch.equal(torch.rand(1), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["fc1.weight"], sc["fc1.weight"])


def test_tiny_bert_attention_is_explicit():
    module = models.get("tiny_bert").build()
    attn = module.layers[0].attn
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert isinstance(getattr(attn, proj), torch.nn.Linear)
    assert (attn.num_heads, attn.head_dim) == (4, 32)
    assert len(module.layers) == 4
    assert torch.equal(module.position_ids, torch.arange(64))
    traced = torch.fx.symbolic_trace(module)
    targets = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert torch.matmul in targets and torch.softmax in targets
