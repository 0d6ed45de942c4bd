"""prune-weights / materialize-masks: exact sparsity, explicit masks that survive training and export."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimfx import ir
from slimfx.ir.errors import PassError
from slimfx.passes import PassContext, create_pass
from slimfx.passes.finetune import train_graph
from slimfx.passes.prune.masks import layer_sparsity
from tests.passes.prune.helpers import export_and_validate


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


X = torch.randn(4, 1, 4, 4)


def _graph() -> ir.Graph:
    return ir.capture(Net().eval(), (X,))


def _run(g: ir.Graph, **opts):
    seed = opts.pop("_seed", 0)
    return create_pass("prune-weights", opts).run(g, PassContext(example_inputs=(X,), seed=seed))


def test_layer_scope_zeros_the_smallest_weights_per_layer():
    g = _graph()
    dense = {k: v.clone() for k, v in g.params.items()}
    res = _run(g, sparsity=0.5)
    ir.verify(g)
    assert len(g.find("mask")) == 3
    rows = {r["layer"]: r for r in res.stats["layers"]}
    assert rows["fc1"]["zeros"] == 32 * 128 // 2 and rows["conv"]["zeros"] == 36
    m = g.params["fc1.weight_mask"]
    w = dense["fc1.weight"].abs()
    assert w[m == 0].max() <= w[m == 1].min()  # magnitude: every pruned weight is smaller than every kept one
    assert torch.equal(g.params["fc1.weight"], dense["fc1.weight"])  # weights untouched: the mask is explicit
    gm = ir.lower(g)
    assert torch.equal(gm.get_parameter("fc1.weight").detach(), dense["fc1.weight"])
    ref = Net().eval()
    ref.fc1.weight.data *= m
    ref.fc2.weight.data *= g.params["fc2.weight_mask"]
    ref.conv.weight.data *= g.params["conv.weight_mask"]
    torch.testing.assert_close(gm(X), ref(X))


def test_global_scope_overrides_skip_and_random():
    g = _graph()
    res = _run(g, sparsity=0.6, scope="global", overrides={"fc2": 0.1}, skip=["conv"])
    rows = {r["layer"]: r for r in res.stats["layers"]}
    assert rows["conv"]["zeros"] == 0 and not any(n.inputs[0].name == "conv.weight" for n in g.find("mask"))
    assert rows["fc2"]["zeros"] == round(0.1 * 160)
    assert rows["fc1"]["zeros"] == round(0.6 * 4096)  # only fc1 is in the global pool
    a, b, c = _graph(), _graph(), _graph()
    _run(a, sparsity=0.5, criterion="random", _seed=1)
    _run(b, sparsity=0.5, criterion="random", _seed=1)
    _run(c, sparsity=0.5, criterion="random", _seed=2)
    assert torch.equal(a.params["fc1.weight_mask"], b.params["fc1.weight_mask"])
    assert not torch.equal(a.params["fc1.weight_mask"], c.params["fc1.weight_mask"])


def test_masks_survive_training_and_materialize_for_export():
    g = _graph()
    _run(g, sparsity=0.7)
    y = torch.randint(0, 5, (4,))
    hist = train_graph(g, (X.repeat(8, 1, 1, 1), y.repeat(8)), epochs=3, lr=1e-2, quiet=True)
    assert hist["loss"][-1] < hist["loss"][0]
    before = ir.lower(g)(X)
    res = create_pass("materialize-masks").run(g, PassContext(example_inputs=(X,)))
    assert res.stats["materialized"] == 3 and not g.find("mask")
    assert not any(k.endswith("_mask") for k in g.params)
    ir.verify(g)
    torch.testing.assert_close(ir.lower(g)(X), before)
    assert all(abs(r["sparsity"] - 0.7) < 0.01 for r in layer_sparsity(g))
    export_and_validate(g, (X,))


def test_repruning_keeps_earlier_zeros_and_bad_options_fail():
    g = _graph()
    _run(g, sparsity=0.3)
    first = g.params["fc1.weight_mask"].clone()
    _run(g, sparsity=0.5)
    assert len(g.find("mask")) == 3
    assert bool((g.params["fc1.weight_mask"] <= first).all())
    assert abs(float((g.params["fc1.weight_mask"] == 0).float().mean()) - 0.5) < 0.01
    for bad in (1.0, -0.01):
        with pytest.raises(PassError, match=r"option 'sparsity' must be in \[0, 1\)"):
            create_pass("prune-weights", {"sparsity": bad})
    with pytest.raises(PassError, match="overrides"):
        create_pass("prune-weights", {"overrides": {"fc1": 2.0}})
    with pytest.raises(PassError, match="skip pattern 'decoder.\\*' names no"):
        _run(_graph(), skip=["decoder.*"])


def test_a_recipe_that_exports_onnx_with_masks_left_in_is_refused_before_any_work(monkeypatch, tmp_path):
    # prune-weights without materialize-masks ran every pass, then failed to export with "no emitter for this op
    # ... Rewrite that line of the model" (the line of a conv); the fix is a recipe step.
    import slimfx
    import slimfx.driver as driver
    from slimfx.ir.errors import ExportError, RecipeError

    def no_passes(*a, **k):
        raise AssertionError("the passes ran before the refusal")

    torch.manual_seed(0)
    model, example = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), (torch.randn(2, 8),)
    monkeypatch.setattr(driver, "_run_passes", no_passes)
    masks_left = slimfx.Recipe(name="m", passes=[("prune-weights", {"sparsity": 0.5}), ("finetune", {})],
                               export={"formats": ["onnx"]})
    with pytest.raises(RecipeError, match=r"passes\[0\] \(name = 'prune-weights'\).*materialize-masks"):
        slimfx.compile(model, example, recipe=masks_left, bench_seconds=0, quiet=True)
    monkeypatch.undo()
    g = ir.capture(model, example)
    g = create_pass("prune-weights", {"sparsity": 0.5}).run(g, PassContext(example_inputs=example)).graph_after(g)
    from slimfx.exporters import export_onnx

    with pytest.raises(ExportError, match=r"pruning mask.*materialize-masks") as e:
        export_onnx(g, tmp_path / "m.onnx", inputs=example)
    assert "Rewrite that line" not in str(e.value)
