"""Every zoo model captures, verifies and lowers bit-exactly, in eval and in train mode."""

import copy

import pytest
import torch

from slimfx import ir, models


@pytest.mark.parametrize("name", models.names())
def test_zoo_lowering_is_bit_exact_on_fresh_inputs(name):
    spec = models.get(name)
    model = spec.build(seed=0).eval()
    g = ir.capture(model, spec.example_inputs(batch=2, seed=0))
    ir.verify(g)
    assert "opaque" not in {n.op for n in g}, f"{name} has ops the IR does not know"
    gm = ir.lower(g)
    for batch, seed in ((1, 1), (5, 2)):
        x = spec.example_inputs(batch=batch, seed=seed)
        with torch.no_grad():
            assert torch.equal(gm(*x), model(*x))


@pytest.mark.parametrize("name", models.names())
def test_zoo_lowering_is_bit_exact_in_train_mode(name):
    spec = models.get(name)
    model = spec.build(seed=0).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = ir.capture(model, spec.example_inputs(batch=2, seed=0))
    assert g.training and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "capture changed the model"
    reference = copy.deepcopy(model)
    gm = ir.lower(g, copy_params=True)
    assert gm.training
    x = spec.example_inputs(batch=4, seed=3)
    torch.manual_seed(7)
    a = reference(*x)
    torch.manual_seed(7)
    b = gm(*x)  # dropout draws the same mask from the same RNG state
    assert torch.equal(a, b)
    for key, buf in reference.named_buffers():  # batch-norm statistics moved the same way
        assert torch.equal(gm.get_buffer(key), buf), key
