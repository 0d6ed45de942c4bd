"""The pattern rewriter: matching by op and data flow, the safety rules, explain, and PatternPass."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings

from slimfx import ir
from slimfx.ir import Param
from slimfx.ir.errors import PassError
from slimfx.passes import PassContext, PassManager, Pattern, PatternPass, register_pass, rewrite
from tests.generators import random_model


def linear_relu(x, w, b):
    return F.relu(F.linear(x, w, b))


class MLP(nn.Module):
    def __init__(self, share: bool = False):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.share = share

    def forward(self, x):
        h = self.fc1(x)
        y = torch.relu(h)
        if self.share:
            y = y + h  # h escapes the linear-relu match
        y = torch.relu(self.fc2(y))
        return self.fc3(y)


def capture(model, *shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    return ir.capture(model.eval(), (x,)), x


def fused_linear_relu(graph, m):
    """Replacement used by several tests: an opaque-free equivalent (clamp(min=0) of the linear)."""
    lin = m.insert("linear", (m["x"], m["w"], m["b"]))
    return m.insert("clamp", (lin,), {"min": 0.0, "max": None})


def test_pattern_is_captured_into_canonical_ir():
    p = Pattern(linear_relu)
    assert [n.op for n in p.ops] == ["linear", "relu"] and p.anchor_op == "relu"
    assert "linear(%x, %w, %b)" in str(p)


def test_matches_bind_params_and_nodes_and_rewrite_preserves_outputs():
    torch.manual_seed(0)
    model = MLP()
    g, x = capture(model, 2, 4)
    ms = Pattern(linear_relu).find(g)
    assert [m.anchor.name for m in ms] == ["relu", "relu_1"]
    m = ms[0]
    assert m["x"] is g.inputs[0] and m["w"] == Param("fc1.weight") and m["linear"] is g.node("fc1")
    assert torch.equal(m.param("b"), model.fc1.bias.detach())
    n = rewrite(g, linear_relu, fused_linear_relu)
    assert n == 2 and not g.find("relu") and len(g.find("clamp")) == 2
    ir.verify(g)
    torch.testing.assert_close(ir.lower(g)(x), model(x))


def test_a_match_whose_inner_value_has_other_users_is_rejected():
    g, _ = capture(MLP(share=True), 2, 4)
    p = Pattern(linear_relu)
    assert [m.anchor.name for m in p.find(g)] == ["relu_1"]  # the fc1 one is rejected, fc2 still matches
    why = p.explain(g, condition=lambda m: m.anchor.name == "relu")
    assert "%fc1" in why and "also used by %add" in why
    assert rewrite(g, p, fused_linear_relu) == 1
    assert g.node("fc1").op == "linear" and g.node("relu").op == "relu"


class AddOrder(nn.Module):
    def forward(self, x, y):
        a = torch.sigmoid(x) + y  # pattern order
        b = y + torch.sigmoid(x)  # swapped
        c = torch.sigmoid(x) * y  # commutative mul, other op
        d = torch.sigmoid(x) - y  # sub is not commutative
        return a, b, c, d


def test_commutative_ops_match_either_operand_order():
    x, y = torch.randn(3), torch.randn(3)
    g = ir.capture(AddOrder(), (x, y))
    adds = Pattern(lambda a, b: torch.sigmoid(a) + b).find(g)
    assert len(adds) == 2 and all(m["a"] is g.inputs[0] and m["b"] is g.inputs[1] for m in adds)
    assert len(Pattern(lambda a, b: b * torch.sigmoid(a)).find(g)) == 1
    assert len(Pattern(lambda a, b: torch.sigmoid(a) - b).find(g)) == 1
    assert Pattern(lambda a, b: b - torch.sigmoid(a)).find(g) == []


class Pools(nn.Module):
    def forward(self, x):
        return F.max_pool2d(x, 3, 1, 1) + F.max_pool2d(x, 2, 1) .sum() + F.max_pool2d(x, 3, 2, 1).mean()


def test_a_constant_attribute_matches_only_that_value():
    g = ir.capture(Pools(), (torch.randn(1, 2, 8, 8),))
    assert len(g.find("max_pool2d")) == 3
    k3 = Pattern(lambda x: F.max_pool2d(x, kernel_size=3)).find(g)
    assert sorted(m.anchor.attrs["stride"] for m in k3) == [(1, 1), (2, 2)]  # stride left open
    assert len(Pattern(lambda x: F.max_pool2d(x, kernel_size=2)).find(g)) == 1
    assert len(Pattern(lambda x: F.max_pool2d(x, kernel_size=3, stride=2)).find(g)) == 1
    assert Pattern(lambda x: F.max_pool2d(x, kernel_size=5)).find(g) == []
    assert Pattern(lambda x: F.max_pool2d(x, 3, 1, 1), exact_attrs=True).find(g)[0].anchor.attrs["stride"] == (1, 1)


def test_explain_names_the_first_mismatching_node():
    class ConvRelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3)

        def forward(self, x):
            return torch.relu(self.conv(x))

    g = ir.capture(ConvRelu(), (torch.randn(1, 2, 5, 5),))
    p = Pattern(linear_relu)
    assert p.find(g) == []
    why = p.explain(g)
    assert "Closest: graph node %relu" in why
    assert "first mismatch: pattern node %linear wants op 'linear'; graph node %conv is 'conv2d'" in why
    assert "module 'conv'" in why
    assert "no graph node has op 'relu'" in Pattern(lambda x: torch.relu(torch.tanh(x))).explain(
        ir.capture(nn.Tanh(), (torch.randn(2),)))
    attr_why = Pattern(lambda x, w, b: F.relu(F.conv2d(x, w, b, stride=2))).explain(g)
    assert "pattern node %conv2d (conv2d) wants stride=(2, 2); graph node %conv has stride=(1, 1)" in attr_why
    assert "condition rejected" in Pattern(lambda x: torch.relu(x)).explain(g, condition=lambda m: False)


def test_arguments_used_twice_must_bind_the_same_value():
    class Silu(nn.Module):
        def forward(self, x, y):
            return x * torch.sigmoid(x) + y * torch.sigmoid(x)

    g = ir.capture(Silu(), (torch.randn(3), torch.randn(3)))
    ms = Pattern(lambda a: a * torch.sigmoid(a)).find(g)
    assert len(ms) == 1 and ms[0]["a"] is g.inputs[0]


def test_arguments_with_defaults_also_match_constants():
    class NoBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3, bias=False)

        def forward(self, x):
            return torch.relu(self.fc(x)) * 2.0

    g = ir.capture(NoBias(), (torch.randn(2, 3),))
    assert Pattern(linear_relu).find(g) == []
    assert "constant None" in Pattern(linear_relu).explain(g)
    m = Pattern(lambda x, w, b=None: F.relu(F.linear(x, w, b))).find(g)
    assert len(m) == 1 and m[0]["b"] is None
    scaled = Pattern(lambda x, s=1.0: x * s).find(g)
    assert len(scaled) == 1 and scaled[0]["s"] == 2.0


def test_replacement_may_return_an_existing_value():
    class DoubleRelu(nn.Module):
        def forward(self, x):
            return torch.relu(torch.relu(x)) + 1

    x = torch.randn(5)
    g = ir.capture(DoubleRelu(), (x,))
    assert rewrite(g, lambda a: torch.relu(torch.relu(a)), lambda graph, m: m["relu"]) == 1
    assert len(g.find("relu")) == 1
    ir.verify(g)
    torch.testing.assert_close(ir.lower(g)(x), DoubleRelu()(x))


def test_bad_patterns_are_reported():
    with pytest.raises(PassError, match="must return one value computed by a torch op"):
        Pattern(lambda x: x)
    with pytest.raises(PassError, match="cannot be traced"):
        Pattern(lambda x: torch.relu(x) if x.sum() > 0 else x)


@register_pass("test-linear-relu-to-clamp")
class LinearReluToClamp(PatternPass):
    """Rewrites relu(linear) as clamp(linear, min=0), only for layers wider than `min_features`."""

    min_features: int = 0
    pattern = staticmethod(linear_relu)

    def condition(self, match):
        return match.param("w").shape[0] > self.min_features

    def replace(self, graph, match):
        return fused_linear_relu(graph, match)


def test_pattern_pass_runs_in_a_pipeline_with_options():
    torch.manual_seed(0)
    model = MLP()
    g, x = capture(model, 2, 4)
    recs = PassManager(["test-linear-relu-to-clamp{min_features=8}"], check_numerics=1e-6).run(
        g, PassContext(example_inputs=(x,)))
    assert recs[0].stats == {"rewritten": 0}
    recs = PassManager([LinearReluToClamp(min_features=7)], check_numerics=1e-6).run(
        recs.graph, PassContext(example_inputs=(x,)))
    assert recs[0].stats == {"rewritten": 2} and recs[0].changed and len(recs.graph.find("clamp")) == 2


def test_matching_visits_each_candidate_once():
    """Anchored matching: work grows with the number of anchor-op nodes, not with graph size squared."""
    g = ir.Graph()
    x = g.create_node("input", name="x", meta=ir.TensorMeta((4,), torch.float32))
    v = x
    for _ in range(3000):
        v = g.create_node("tanh", (v,), meta=x.meta)
        v = g.create_node("relu", (v,), meta=x.meta)
    g.set_outputs(v)
    p = Pattern(lambda a: torch.relu(torch.tanh(a)))
    visited = []
    real_attempt = p._attempt
    p._attempt = lambda node, *rest: visited.append(node.op) or real_attempt(node, *rest)  # count, not time
    assert rewrite(g, p, lambda graph, m: m.insert("sigmoid", (m["a"],))) == 3000
    assert len(visited) == 3000 and set(visited) == {"relu"}  # each anchor tried once, nothing else
    assert len(g) == 3000 + 2
    ir.verify(g)


@settings(max_examples=10, deadline=None)
@given(random_model())
def test_rewriting_random_models_keeps_outputs_and_finds_every_occurrence(case):
    model, (x,) = case
    g = ir.capture(model, (x,))
    expected = sum(1 for n in g.find("relu") if isinstance(n.inputs[0], ir.Node)
                   and n.inputs[0].op == "conv2d" and len(n.inputs[0].users) == 1)

    def conv_then_clamp(graph, m):
        conv = m.insert("conv2d", m["conv2d"].inputs, m["conv2d"].attrs)
        return m.insert("clamp", (conv,), {"min": 0.0, "max": None})

    n = rewrite(g, lambda x, w, b=None: F.relu(F.conv2d(x, w, b)), conv_then_clamp)
    assert n == expected
    ir.verify(g)
    with torch.no_grad():
        torch.testing.assert_close(ir.lower(g)(x), model(x))


PATTERNS = [linear_relu, lambda x: x * torch.sigmoid(x), lambda x: x + 0, lambda x, b=None: torch.relu(x + b),
            lambda x, w, b=None: F.relu(F.conv2d(x, w, b)), lambda a, b: torch.sigmoid(a) * torch.tanh(b),
            lambda x, w, b=None: F.conv2d(x, w, b, stride=2)]


@settings(max_examples=15, deadline=None)
@given(random_model())
def test_the_compiled_matcher_agrees_with_walking_the_pattern(case):
    """`_attempt` runs generated code; `_match` walks the pattern (and explains). Same matches, same bindings."""
    model, (x,) = case
    g = ir.capture(model, (x,))
    for fn in PATTERNS:
        p = Pattern(fn)
        for node in g.find(p.anchor_op):
            fast = p._attempt(node, g)
            try:
                slow = p._match(node, g)
            except Exception:  # noqa: BLE001 - _Fail: no match
                slow = None
            assert (fast is None) == (slow is None), (p.name, node.name)
            if fast is not None:
                assert fast.values == slow.values and fast.nodes == slow.nodes
