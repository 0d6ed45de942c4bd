"""prune50 on the architecture families of public model zoos (issue 15 item 7): squeeze-excite gates with
hardsigmoid/hardswish (MobileNetV3), MBConv with SiLU, SE and stochastic depth (EfficientNet), 7x7 depthwise
convs, channels-last LayerNorm, Linear MLPs and layer-scale gammas (ConvNeXt), a ViT with a class token,
nn.MultiheadAttention's packed q/k/v and whole heads, and ShuffleNet's channel shuffle. The models are in
families.py, written as torchvision writes them."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimfx import ir
from slimfx.passes import PassContext, PassManager
from slimfx.passes.prune.channels import importance, plan, reach, sections
from slimfx.passes.prune.groups import analyze, keep_every_axis
from slimfx.recipe import load_recipe
from tests.passes.prune import families
from tests.passes.prune.helpers import export_and_validate
from tests.passes.prune.test_groups import _exact_after_removal


def _prune50(model: nn.Module, x: torch.Tensor) -> tuple[ir.Graph, ir.Graph, dict]:
    """The prune50 recipe's passes as the driver runs them (no train data: its finetune step is skipped)."""
    g = ir.capture(model, (x,))
    passes = load_recipe("prune50").build_passes()
    res = PassManager(passes).run(g, PassContext(example_inputs=(x,)))
    stats = next(r.stats for r in res if r.name == "prune-channels")
    return g, res.graph, stats


def _group(stats: dict, source: str) -> dict:
    return next(g for g in stats["groups"] if source in g["sources"])


@pytest.mark.parametrize("name,size", [("mobilenet_v3", 64), ("efficientnet", 64), ("convnext", 64), ("vit", 32),
                                       ("shufflenet_v2", 64)])
def test_prune50_shrinks_each_family_like_a_plain_residual_net(name, size):
    torch.manual_seed(0)
    model = families.randomize(families.FAMILIES[name]())
    x = torch.randn(2, 3, size, size)
    dense, pruned, stats = _prune50(model, x)
    # half of every group's channels: 1x1 convs and linears go to 0.25, depthwise convs, the stem (3 fixed input
    # channels) and the classifier (fixed classes) to 0.5; that weighs out at about 0.30-0.33 for these nets
    assert stats["macs_ratio"] <= 0.35, stats["unprunable"]
    assert ir.count_macs(pruned) <= 0.35 * ir.count_macs(dense)
    # only the logits layer keeps its channels, and the report says why
    assert [(u["layer"], u["why"]) for u in stats["unprunable"]] == \
        [(stats["blocked"][0]["source"], ["%output (output): graph output (never pruned)"])]
    with torch.no_grad():
        out = ir.lower(pruned).eval()(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    export_and_validate(pruned, (x,))


def test_squeeze_excite_inner_channels_are_a_group_and_the_gate_joins_the_gated_stream():
    torch.manual_seed(0)
    _, pruned, stats = _prune50(families.randomize(families.MobileNetV3Like()), torch.randn(1, 3, 64, 64))
    # block 4: expand conv, depthwise conv and the SE's fc2 (the gate multiplies their channels) are one group
    gated = _group(stats, "features.4.block.0.0")
    assert {"features.4.block.0.0", "features.4.block.1.0", "features.4.block.2.fc2"} <= set(gated["sources"])
    assert gated["channels"] == 48 and gated["kept_channels"] == 24
    squeeze = _group(stats, "features.4.block.2.fc1")  # the SE's bottleneck is a group of its own
    assert squeeze["sources"] == ["features.4.block.2.fc1"] and squeeze["kept_channels"] == squeeze["channels"] // 2
    assert pruned.params["features.4.block.2.fc1.weight"].shape == (8, 24, 1, 1)
    assert pruned.params["features.4.block.2.fc2.weight"].shape == (24, 8, 1, 1)
    assert pruned.node("features_4_block_1_0").attrs["groups"] == 24  # depthwise follows its input's group


def test_convnext_layer_scale_channels_last_norm_and_mlp_shrink_with_the_stream():
    torch.manual_seed(0)
    _, pruned, stats = _prune50(families.randomize(families.ConvNeXtLike()), torch.randn(1, 3, 64, 64))
    stream = _group(stats, "features.0.0")  # stem conv + every block of stage 0 (residual stream)
    assert "features.1.0.block.0" in stream["sources"] and "features.1.0.block.5" in stream["sources"]
    assert pruned.params["features.1.0.layer_scale"].shape == (6, 1, 1)
    assert pruned.params["features.1.0.block.2.weight"].shape == (6,)  # channels-last LayerNorm
    assert pruned.params["features.0.1.weight"].shape == (6,)  # LayerNorm2d (permute, layer_norm, permute)
    assert pruned.params["features.1.0.block.3.weight"].shape == (24, 6)  # MLP: 4C hidden units, C inputs
    assert pruned.node("features_1_0_block_0").attrs["groups"] == 6


def test_vit_prunes_whole_heads_through_packed_qkv_and_the_class_token_with_the_stream():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    _, pruned, stats = _prune50(families.randomize(families.ViTLike()), x)
    heads = next(g for g in stats["groups"] if g["kind"] == "heads")
    assert heads["units"] == 4 and heads["removed_units"] == 2
    assert pruned.params["layers.0.self_attention.in_proj_weight"].shape == (3 * 16, 16)
    assert pruned.params["layers.0.self_attention.out_proj.weight"].shape == (16, 16)
    assert pruned.params["class_token"].shape == (1, 1, 16) and pruned.params["pos_embedding"].shape == (1, 17, 16)
    assert pruned.params["layers.0.mlp.0.weight"].shape == (32, 16)


def test_channel_shuffle_keeps_the_same_channels_of_both_halves():
    """ShuffleNetV2: cat of two branches, view (B, 2, C/2, H, W), transpose, view back, chunk: the halves must
    lose the same channels, and `b, c, h, w = x.size()` only reads the batch."""

    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
            self.c = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)
            b, c, h, w = y.size()
            y = torch.transpose(y.view(b, 2, c // 2, h, w), 1, 2).contiguous().view(b, c, h, w)
            p, q = y.chunk(2, dim=1)
            y = torch.cat([p, torch.relu(self.c(q))], 1)
            return self.fc(y.mean((2, 3)))

    x = torch.randn(2, 3, 6, 6)
    g = ir.capture(Shuffle().eval(), (x,))
    deps = analyze(g)
    grp = next(grp for grp in deps.groups if "a" in grp.sources())
    assert {"a", "b"} <= set(grp.sources()) and len(grp.units) == 8  # channel j of a goes with channel j of b
    assert not any(b["source"] in ("a", "b") for b in deps.blocked)
    _exact_after_removal(g, deps, (x,), frac=0.5, seed=0)


def test_shufflenet_split_halves_lose_the_same_fraction_and_the_pruned_net_is_exact():
    """ShuffleNetV2's stride-1 blocks chunk their input: one half passes through, the other feeds branch2's first
    conv. The stream's units reach different layers by half, so the lowest-scoring half of the whole group could
    come from the pass-through part and leave branch2 at full width (MACs 0.45). Balanced, each part loses half:
    every conv reading the stream loses half its inputs, and the net goes to about 0.34 like the others."""
    torch.manual_seed(0)
    model = families.randomize(families.ShuffleNetV2Like())
    x = torch.randn(2, 3, 64, 64)
    dense, pruned, stats = _prune50(model, x)
    assert stats["macs_ratio"] <= 0.35
    for name, w in dense.params.items():  # branch2's first conv of each stride-1 block reads the split half
        if name.endswith("branch2.0.weight") and ".0.branch2" not in name:
            assert pruned.params[name].shape[1] == w.shape[1] // 2, name
    # the plan the pass makes removes exactly what its analysis says: zeroing the producers of its units and
    # removing them changes nothing (the dense graph with folded batch norms, as prune-channels sees it)
    folded = PassManager(load_recipe("prune50").build_passes()[:1]).run(ir.capture(model, (x,)),
                                                                        PassContext(example_inputs=(x,))).graph
    deps = analyze(folded)
    scores, _ = importance(folded, deps, "l2")
    removed = keep_every_axis(deps, plan(deps, scores, {grp.id: 0.5 for grp in deps.groups}), scores)
    stream = next(grp for grp in deps.groups if len(sections(grp, reach(deps))) > 1)
    assert len([u for u in stream.units if u in set(removed)]) == len(stream.units) // 2
    _exact_after_removal(folded, deps, (x,), frac=0.5, seed=0, removed=removed)


def test_sections_split_a_group_by_what_its_units_reach():
    """Balanced removal in a chunked group: of 8 channels, 4 pass through and 4 feed a conv; the 4 scored lowest
    are all in the pass-through part, yet each part loses 2. A plain group is one section."""

    class Chunked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 1), nn.Linear(8, 2)

        def forward(self, x):
            p, q = self.a(x).chunk(2, dim=1)
            return self.fc(torch.cat([p, self.b(q)], 1).mean((2, 3)))

    g = ir.capture(Chunked().eval(), (torch.randn(1, 3, 4, 4),))
    deps = analyze(g)
    grp = next(grp for grp in deps.groups if "a" in grp.sources())
    parts = sections(grp, reach(deps))
    assert sorted(len(p) for p in parts) == [4, 4]
    through = next(p for p in parts if not any(k[0] == "b.weight" for k in reach(deps)[p[0]]))
    scores = torch.ones(deps.num_labels)
    scores[through] = 0.0  # the pass-through channels score lowest
    removed = set(plan(deps, scores, {grp.id: 0.5}))
    assert [len(removed & set(p)) for p in parts] == [2, 2]
    plain = next(grp for grp in deps.groups if "b" in grp.sources() and "a" not in grp.sources())
    assert len(sections(plain, reach(deps))) == 1


@pytest.mark.parametrize("name", ["mobilenet_v3", "efficientnet"])
def test_removing_dead_units_of_a_family_is_exact(name):
    """Channels whose producers are zeroed carry zeros through SE gates (hardsigmoid(0) * 0), hardswish, SiLU
    and stochastic depth, so removing them must not change the output (batch norms kept: they are exact too)."""
    torch.manual_seed(1)
    model = families.randomize(families.FAMILIES[name]())
    x = torch.randn(2, 3, 64, 64)
    g = ir.capture(model, (x,))
    _exact_after_removal(g, analyze(g), (x,), frac=0.5, seed=2)


def test_a_layer_that_keeps_its_channels_is_named_with_the_reason():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            y = self.a(x)
            y = y + self.b(y)
            z = torch.roll(self.c(y), 1, 1)  # capture keeps it as a call: pruning cannot see through it
            return self.fc((y + z).mean((2, 3)))

    deps = analyze(ir.capture(Mixed().eval(), (torch.randn(1, 3, 4, 4),)))
    why = {u["layer"]: u["why"] for u in deps.unprunable}
    assert set(why) == {"a", "b", "c", "fc"}
    assert "roll" in why["c"][0] and why["fc"] == ["%output (output): graph output (never pruned)"]
    # a and b (the residual stream) are blocked where it meets the opaque call's fixed-size result
    assert why["a"] == why["b"] and "fixed-size operand" in why["a"][0]
