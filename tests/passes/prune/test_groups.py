"""Dependency analysis: which channels are coupled, which are blocked and why, and that removing
dead units is exact on hand-written and random architectures."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from slimfx import ir
from slimfx.passes.prune.groups import BLOCK, analyze, apply, keep_every_axis
from tests.generators import random_model
from tests.passes.prune.helpers import kill_units


def _cap(model: nn.Module, *inputs: torch.Tensor) -> ir.Graph:
    return ir.capture(model.eval(), inputs)


def _by_source(deps):
    return {tuple(g.sources()): g for g in deps.groups}


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = x + self.a(x)
        y = y * torch.sigmoid(self.b(y))
        return self.head(y.mean((2, 3)))


def test_residual_add_and_mul_couple_every_branch():
    deps = analyze(_cap(Residual(), torch.randn(1, 3, 8, 8)))
    assert [g.sources() for g in deps.groups] == [["stem", "a", "b"]]
    g = deps.groups[0]
    assert g.channels == 8 and len(g.units) == 8 and g.kind == "channels"
    # one unit = stem channel c, a channel c, b channel c
    assert all(len(labs) == 3 for labs in g.unit_labels.values())
    assert {b["source"] for b in deps.blocked} == {"head"}  # logits: graph output


class CatSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 8, 1)
        self.d = nn.Conv2d(5, 2, 1)
        self.fc = nn.Linear(2 * 16 + 3 * 16, 3)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        z = self.c(y)
        p, q = torch.chunk(z, 2, dim=1)
        r = self.d(torch.cat([p, x[:, :1]], 1))
        return self.fc(torch.cat([r, q[:, :3]], 1).flatten(1))


def test_cat_offsets_chunk_and_flatten_follow_indices():
    x = torch.randn(1, 3, 4, 4)
    g = _cap(CatSplit(), x)
    deps = analyze(g)
    groups = _by_source(deps)
    assert ("a",) in groups and ("b",) in groups  # cat does not couple its inputs
    # c's output is chunked: the first half feeds d, the second half is sliced by fixed indices -> blocked
    c = groups[("c",)]
    assert c.blocked_channels == 4 and len(c.units) == 4
    assert any(b["source"] == "c" and "indexing" in b["why"] for b in deps.blocked)
    # c's weight columns follow cat offsets: columns 0..3 are a's channels, 4..9 b's
    cols = deps.members[("c.weight", 1)].labels
    a_sp = next(s for s in deps.spaces if s.node == "a")
    assert cols[:4].tolist() == list(range(a_sp.start, a_sp.start + 4))
    # fc columns: each of d's 2 channels covers 16 = 4*4 flattened features
    fcl = deps.members[("fc.weight", 1)].labels
    d_sp = next(s for s in deps.spaces if s.node == "d")
    assert fcl[:16].unique().tolist() == [d_sp.start] and fcl[16:32].unique().tolist() == [d_sp.start + 1]
    # removing half of a, b and c's free chunk keeps the graph exact when those channels are dead
    _exact_after_removal(g, deps, (x,), frac=0.5, seed=1)


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw1 = nn.Conv2d(3, 8, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.squeeze = nn.Conv2d(8, 4, 1, groups=4)  # one output per group: whole groups go
        self.pw2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.pw2(self.squeeze(self.gconv(F.relu6(self.dw(self.bn1(self.pw1(x)))))))


def test_depthwise_couples_channels_and_grouped_convs_keep_their_group_count_or_lose_whole_groups():
    x = torch.randn(1, 3, 6, 6)
    g = _cap(Depthwise(), x)
    deps = analyze(g)
    groups = _by_source(deps)
    # depthwise: channel c in is channel c out; gconv (4 in, 4 out per group): a unit is the same input position
    # of both groups, so pw1 channels c and c + 4 go together
    first = groups[("pw1", "dw")]
    assert first.kind == "groups" and len(first.units) == 4
    assert all(len(labs) == 4 for labs in first.unit_labels.values())  # pw1 c, c+4 and dw c, c+4
    # gconv's outputs: the same position of both groups; squeeze (2 in, 1 out per group) removes whole groups,
    # which couples gconv's output positions 2j, 2j+1 of each group: 2 units of 4 channels
    second = groups[("gconv", "squeeze")]
    assert len(second.units) == 2
    work = g.copy()
    apply(work, deps, [first.units[0], second.units[0]])
    ir.propagate_shapes(work, x)
    ir.verify(work)
    assert work.node("dw").attrs["groups"] == 6 and work.node("gconv").attrs["groups"] == 2
    assert work.params["gconv.weight"].shape == (4, 3, 3, 3)
    assert work.node("squeeze").attrs["groups"] == 2 and work.params["squeeze.weight"].shape == (2, 2, 1, 1)
    assert work.params["bn1.running_mean"].shape == (6,)
    _exact_after_removal(g, deps, (x,), frac=0.5, seed=0)


class Attention(nn.Module):
    def __init__(self, d=16, heads=4, seq=5):
        super().__init__()
        self.h, self.hd, self.s = heads, d // heads, seq
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 24), nn.Linear(24, d)
        self.cls = nn.Linear(d, 3)

    def forward(self, x):
        B = x.size(0)
        q = self.q(x).reshape(B, self.s, self.h, self.hd).permute(0, 2, 1, 3)
        k = self.k(x).reshape(B, self.s, self.h, self.hd).permute(0, 2, 1, 3)
        v = self.v(x).reshape(B, self.s, self.h, self.hd).permute(0, 2, 1, 3)
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * 0.5, dim=-1)
        ctx = torch.matmul(att, v).permute(0, 2, 1, 3).reshape(B, self.s, self.h * self.hd)
        x = x + self.o(ctx)
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.cls(x.mean(1))


def test_attention_heads_are_units_and_reshape_sizes_follow():
    x = torch.randn(2, 5, 16)
    g = _cap(Attention(), x)
    deps = analyze(g)
    groups = _by_source(deps)
    heads = groups[("q", "k", "v")]
    assert heads.kind == "heads" and len(heads.units) == 4
    assert all(len(labs) == 3 * 4 for labs in heads.unit_labels.values())  # q, k, v rows of one head
    assert len(groups[("fc1",)].units) == 24
    # the residual stream is blocked: x is a graph input it is added to
    assert not any("o" in grp.sources() for grp in deps.groups)
    work = g.copy()
    apply(work, deps, heads.units[:2] + groups[("fc1",)].units[:12])
    ir.propagate_shapes(work, x)
    ir.verify(work)
    assert work.params["q.weight"].shape == (8, 16) and work.params["o.weight"].shape == (16, 8)
    assert work.params["fc2.weight"].shape == (16, 12)
    assert [n.attrs["shape"][2] for n in work.find("reshape")][:3] == [2, 2, 2]
    _exact_after_removal(g, deps, (x,), frac=0.5, seed=3)


class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(6, 6, 1)
        self.c = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = torch.flip(self.a(x), dims=[1])  # an op the analysis cannot see through
        return self.c(self.b(y))


def test_apply_refuses_to_empty_a_branch_and_keep_every_axis_gives_one_back():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(2, 2, 1)
            self.d = nn.Conv2d(2, 3, 1)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)
            return self.d(y + self.c(y))  # the residual joins both branches' channels into one group

    g = _cap(Cat(), torch.randn(1, 1, 4, 4))
    deps = analyze(g)
    grp = next(grp for grp in deps.groups if "a" in grp.sources())
    assert len(grp.units) == 2
    with pytest.raises(ValueError, match="empties axis"):
        apply(g.copy(), deps, grp.units[:1])
    assert keep_every_axis(deps, grp.units[:1]) == []


def test_unknown_ops_stop_the_group_and_say_where():
    deps = analyze(_cap(Opaque(), torch.randn(1, 3, 4, 4)))
    assert [grp.sources() for grp in deps.groups] == [["b"]]
    why = next(b for b in deps.blocked if b["source"] == "a")
    assert "flip" in why["why"] or "opaque" in why["why"] or why["op"] == "opaque"


def _exact_after_removal(g: ir.Graph, deps, inputs: tuple, frac: float, seed: int,
                         removed: list[int] | None = None) -> None:
    """Removing units (`removed`, or a random `frac` of every group) whose producers are zeroed changes nothing."""
    if removed is None:
        rng = random.Random(seed)
        removed = []
        for grp in deps.groups:
            k = min(len(grp.units) - 1, int(round(frac * len(grp.units))))
            removed += rng.sample(grp.units, max(0, k))
        removed = keep_every_axis(deps, removed)
    dense = g.copy()
    kill_units(dense, deps, set(removed))
    with torch.no_grad():
        ref = ir.lower(dense)(*inputs)
    pruned = dense.copy()
    apply(pruned, deps, removed)
    ir.propagate_shapes(pruned, *inputs)
    ir.verify(pruned)
    assert ir.count_params(pruned) <= ir.count_params(dense)
    with torch.no_grad():
        out = ir.lower(pruned)(*inputs)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=random_model(), frac=st.floats(0.0, 0.9), seed=st.integers(0, 100))
def test_removing_dead_units_is_exact_on_random_architectures(case, frac, seed):
    model, inputs = case
    # sigmoid(0) != 0, so a dead channel comes back to life after one; a squeeze-excite gate multiplies the
    # (dead) channel it gates, so it may be one
    assume(not any(isinstance(m, nn.Sigmoid) for name, m in model.named_modules() if not name.endswith(".gate")))
    g = ir.capture(model, inputs)
    deps = analyze(g)
    assert all(int(deps.roots[u]) != BLOCK for grp in deps.groups for u in grp.units)
    _exact_after_removal(g, deps, inputs, frac, seed)
