"""prune-channels: options, criteria, bad input, zoo models, and random architectures end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimfx import ir, models
from slimfx.ir.errors import PassError
from slimfx.passes import PassContext, create_pass, parse_pass_spec
from tests.generators import random_model
from tests.passes.prune.helpers import export_and_validate


def _prune(model: nn.Module, inputs: tuple, **opts):
    g = ir.capture(model.eval(), inputs)
    res = create_pass("prune-channels", opts).run(g, PassContext(example_inputs=inputs))
    g = res.graph_after(g)  # the pruned graph (a new one)
    ir.verify(g)
    return g, res


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.c2(F.relu(self.bn(self.c1(x))))


def _chain() -> Chain:
    m = Chain()
    with torch.no_grad():
        m.c1.weight.copy_(torch.tensor([1.0, 0.1, 3.0, 0.2]).view(4, 1, 1, 1).expand(4, 2, 1, 1))
        m.c2.weight.fill_(0.5)
        m.bn.weight.copy_(torch.tensor([0.1, 2.0, 0.3, 4.0]))
    return m


@pytest.mark.parametrize("criterion,kept", [("l1", [0, 2]), ("l2", [0, 2]), ("bn-scale", [1, 3])])
def test_criteria_keep_the_most_important_channels(criterion, kept):
    m = _chain()
    x = torch.randn(1, 2, 3, 3)
    g, res = _prune(m, (x,), sparsity=0.5, criterion=criterion)
    assert g.params["c1.weight"].shape == (2, 2, 1, 1)
    torch.testing.assert_close(g.params["c1.weight"], m.c1.weight[kept].detach())
    torch.testing.assert_close(g.params["bn.weight"], m.bn.weight[kept].detach())
    assert g.params["c2.weight"].shape == (3, 2, 1, 1)
    assert res.stats["groups"][0]["kept_channels"] == 2


def test_taylor_needs_data_and_uses_it():
    m = _chain()
    x = torch.randn(8, 2, 3, 3)
    g = ir.capture(m.eval(), (x[:1],))
    p = create_pass("prune-channels", {"criterion": "taylor"})
    assert "needs" in p.check_context(PassContext(example_inputs=(x[:1],)))
    with pytest.raises(PassError, match="taylor"):
        p.run(g, PassContext(example_inputs=(x[:1],)))
    y = torch.randint(0, 3, (8, 3, 3))
    res = p.run(g, PassContext(example_inputs=(x[:1],), train_data=[((x,), y)]))
    assert res.stats["groups"][0]["kept_channels"] == 2 and res.graph.params["c1.weight"].shape[0] == 2


def test_the_pruned_graph_is_a_new_graph_and_the_given_one_is_left_as_it_was():
    x = torch.randn(1, 2, 3, 3)
    g = ir.capture(_chain().eval(), (x,))
    before, conv = str(g), g.node("c1")
    res = create_pass("prune-channels", {"sparsity": 0.5}).run(g, PassContext(example_inputs=(x,)))
    new = res.graph
    assert new is not g and res.graph_after(g) is new and all(n.graph is new for n in new)
    assert conv.graph is g and str(g) == before and g.params["c1.weight"].shape[0] == 4  # nothing swapped
    assert new.params["c1.weight"].shape[0] == 2 and new.node("c1") is not conv
    ir.verify(g), ir.verify(new)
    nothing = create_pass("prune-channels", {"sparsity": 0.0}).run(g, PassContext(example_inputs=(x,)))
    assert not nothing.changed and nothing.graph is None and nothing.graph_after(g) is g


def test_bad_input_is_rejected_or_clamped():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(PassError, match=r"option 'sparsity' must be in \[0, 1\)"):
            create_pass("prune-channels", {"sparsity": bad})
    with pytest.raises(PassError, match="round_to"):
        create_pass("prune-channels", {"round_to": 0})
    x = torch.randn(1, 2, 3, 3)
    g = ir.capture(_chain().eval(), (x,))
    with pytest.raises(PassError, match="protect pattern 'nothing.\\*' names no"):
        create_pass("prune-channels", {"protect": ["nothing.*"]}).run(g, PassContext(example_inputs=(x,)))
    # 0.99 of 4 channels would leave none: clamped to one channel, a working graph
    g, res = _prune(_chain(), (x,), sparsity=0.99)
    assert g.params["c1.weight"].shape[0] == 1 and res.stats["groups"][0]["kept_channels"] == 1
    assert torch.isfinite(ir.lower(g)(x)).all()
    with pytest.raises(PassError, match="out of reach"):
        _prune(_chain(), (x,), target_macs=0.01)


def test_protect_overrides_and_round_to_on_resnet20():
    spec = models.get("resnet20")
    x = spec.example_inputs(batch=1)
    g, res = _prune(spec.build(seed=0), x, sparsity=0.3, round_to=8, protect=["conv1"],
                    overrides={"layer3.*": 0.75})
    rows = {r["group"]: r for r in res.stats["groups"]}
    assert rows["conv1"]["protected"] and rows["conv1"]["kept_channels"] == 16
    assert rows["layer3.1.conv1"]["kept_channels"] == 16  # 75% of 64
    assert all(r["kept_channels"] % 8 == 0 for r in rows.values())
    assert rows["layer2.0.conv1"]["kept_channels"] == 24  # 70% of 32 = 22.4 -> nearest multiple of 8


def test_resnet20_half_channels_and_target_macs():
    spec = models.get("resnet20")
    x = spec.example_inputs(batch=1)
    g, res = _prune(spec.build(seed=0), x, sparsity=0.5)
    assert res.stats["macs_ratio"] <= 0.27
    assert not g.find("mask") and g.params["fc.weight"].shape == (10, 32)
    export_and_validate(g, x)
    g2, res2 = _prune(spec.build(seed=0), x, target_macs=0.4)
    assert 0.33 <= res2.stats["macs_ratio"] <= 0.4
    assert ir.count_macs(g2) == res2.stats["macs_after"]


def test_tiny_bert_half_heads_and_ffn():
    spec = models.get("tiny_bert")
    x = spec.example_inputs(batch=2)
    g, res = _prune(spec.build(seed=0), x, sparsity=0.5, protect=["tok_emb"])
    kinds = {r["group"]: (r["kind"], r["units"], r["removed_units"]) for r in res.stats["groups"]}
    assert kinds["layers.0.attn.q_proj"] == ("heads", 4, 2) and kinds["layers.3.fc1"] == ("channels", 512, 256)
    assert res.stats["macs_ratio"] <= 0.55
    out = ir.lower(g)(*x)
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    assert g.params["layers.0.attn.out_proj.weight"].shape == (128, 64)
    export_and_validate(g, x)


def test_masks_are_sliced_with_their_weights():
    x = torch.randn(1, 2, 3, 3)
    g = ir.capture(_chain().eval(), (x,))
    ctx = PassContext(example_inputs=(x,))
    g = parse_pass_spec("prune-weights{sparsity=0.25}").run(g, ctx).graph_after(g)
    g = parse_pass_spec("prune-channels{sparsity=0.5}").run(g, ctx).graph_after(g)
    ir.verify(g)
    assert g.params["c1.weight_mask"].shape == g.params["c1.weight"].shape == (2, 2, 1, 1)
    assert len(g.find("mask")) == 2
    g = create_pass("materialize-masks").run(g, ctx).graph_after(g)
    assert not g.find("mask")
    export_and_validate(g, (x,))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=random_model(), frac=st.floats(0.0, 0.9), criterion=st.sampled_from(["l1", "l2", "bn-scale"]))
def test_random_architectures_prune_verify_lower_and_export(case, frac, criterion):
    model, inputs = case
    g, res = _prune(model, inputs, sparsity=frac, criterion=criterion)
    assert res.stats["macs_after"] <= res.stats["macs_before"]
    assert all(r["kept_channels"] >= 1 for r in res.stats["groups"])
    with torch.no_grad():
        out = ir.lower(g)(*inputs)
    assert torch.isfinite(out).all()
    export_and_validate(g, inputs)


def test_a_pooler_reading_the_first_token_prunes_on_the_export_front_end():
    """BERT's pooler (`hidden[:, 0]` -> linear): torch.export's front end names that indexing node `%slice`, a name
    fx lowers as `slice_1`; the pruned graph's shapes must still be refreshed on it (it was left at the old width
    and the pass failed as a 'bug in the dependency analysis')."""
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.ffn, self.pooler, self.head = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 16), \
                nn.Linear(16, 3)

        def forward(self, x):
            h = self.emb(x)
            h = h + F.relu(self.ffn(h))
            return self.head(torch.tanh(self.pooler(h[:, 0])))

    x = torch.randn(2, 5, 6)
    g = ir.capture(Pooled().eval(), (x,), method="export")
    assert g.has_node("slice")  # the name that fx renames
    res = create_pass("prune-channels", {"sparsity": 0.5}).run(g, PassContext(example_inputs=(x,)))
    pruned = res.graph_after(g)
    ir.verify(pruned)
    assert res.stats["macs_ratio"] < 0.6
    assert ir.lower(pruned)(x).shape == (2, 3)
    export_and_validate(pruned, (x,))


def test_bn_scale_says_in_the_report_which_groups_fell_back_to_l2_and_why():
    # The fallback note was a {group: text} dict; the report's headline lists a pass's notes, so it showed
    # only "prune-channels: conv" -- and a recipe that folds batch norms first gets l2 in every group.
    import slimfx

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc1, self.fc2 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
            return self.fc2(torch.relu(self.fc1(h)))

    torch.manual_seed(0)
    model, example = Net().eval(), (torch.randn(2, 3, 8, 8),)
    for passes, groups in (([("prune-channels", {"criterion": "bn-scale"})], "fc1"),
                           ([("fold-batchnorm", {}), ("prune-channels", {"criterion": "bn-scale"})], "conv, fc1")):
        recipe = slimfx.Recipe(name="p", passes=passes, export={"formats": ["onnx"]})
        headline = slimfx.compile(model, example, recipe=recipe, bench_seconds=0, quiet=True).report["headline"]
        notes = [h for h in headline if h.startswith("prune-channels: criterion")]
        assert len(notes) == 1 and "bn-scale" in notes[0] and "l2" in notes[0], headline
        assert f"({groups})" in notes[0] and "fold-batchnorm" in notes[0], notes


def test_convs_left_at_widths_onnxruntime_runs_slowly_are_named_with_round_to_as_the_remedy():
    # Pruned by 30%, a ConvNeXt block keeps 22 of 32 channels; onnxruntime's conv kernels take a slow path for
    # widths that are not multiples of 8 (a pruned ConvNeXt ran 3x slower than the original at batch 32, a ResNet
    # as slowly as the original) and nothing said why. The pass notes it; round_to = 8 keeps the note away.
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw, self.dw, self.out = nn.Conv2d(3, 32, 1), nn.Conv2d(32, 32, 7, padding=3, groups=32), nn.Conv2d(32, 4, 1)

        def forward(self, x):
            return self.out(F.gelu(self.dw(self.pw(x))))

    torch.manual_seed(0)
    x = (torch.randn(1, 3, 8, 8),)
    g = ir.capture(Block().eval(), x)
    ctx = PassContext(example_inputs=x)
    res = create_pass("prune-channels", {"sparsity": 0.3}).run(g, ctx)
    assert [n.attrs["groups"] for n in res.graph.find("conv2d") if n.attrs.get("groups", 1) > 1] == [22]
    notes = [n for n in res.stats.get("notes", []) if "multiples of 8" in n]
    assert len(notes) == 1 and "round_to = 8" in notes[0], res.stats.get("notes")
    assert "3 conv layers" in notes[0] and "pw (3->22 channels), dw (22->22 channels), out (22->4 channels)" in notes[0]
    res8 = create_pass("prune-channels", {"sparsity": 0.3, "round_to": 8}).run(g, ctx)
    assert [n.attrs["groups"] for n in res8.graph.find("conv2d") if n.attrs.get("groups", 1) > 1] == [24]
    assert not res8.stats.get("notes")
    assert not create_pass("prune-channels", {"sparsity": 0.5}).run(g, ctx).stats.get("notes")  # 16: fast
