"""Accuracy on the digits CNN: 50% channels + <= 10 epochs fine-tune recovers; 50% magnitude masks lose little."""

from __future__ import annotations

import pytest
import torch

from slimfx import ir, models
from slimfx.passes import PassContext, create_pass


@pytest.fixture
def one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: more threads only fight over the 2 cores
    yield
    torch.set_num_threads(prev)


def test_digits_cnn_prune_then_finetune_recovers_and_masks_cost_little(one_thread):
    spec = models.get("digits_cnn")
    model = spec.trained(progress=False).eval()
    data = models.load_dataset("digits")
    x = spec.example_inputs(batch=1)

    def acc(m):
        return models.accuracy(m, "digits")

    dense = acc(model)
    assert dense > 0.95

    g = ir.capture(model, x)
    # no eval_fn: the last epoch is scored, nothing is picked on the test split
    ctx = PassContext(example_inputs=x, train_data=(data.train_x, data.train_y), quiet=True, seed=0)
    res = create_pass("prune-channels", {"sparsity": 0.5, "criterion": "bn-scale"}).run(g, ctx)
    g = res.graph_after(g)
    assert res.stats["macs_ratio"] <= 0.27
    pruned = acc(ir.lower(g).eval())
    ft = create_pass("finetune", {"epochs": 10, "lr": 3e-3}).run(g, ctx)
    recovered = acc(ir.lower(g).eval())
    assert ft.changed and recovered > pruned
    assert recovered >= dense - 0.005, (dense, pruned, recovered)

    g = ir.capture(model, x)
    res = create_pass("prune-weights", {"sparsity": 0.5, "scope": "global"}).run(g, PassContext(example_inputs=x))
    assert res.stats["sparsity"] == 0.5
    create_pass("materialize-masks").run(g, PassContext(example_inputs=x))
    assert acc(ir.lower(g).eval()) >= dense - 0.02
