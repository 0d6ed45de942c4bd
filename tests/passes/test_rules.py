"""Rewrite rules as values: replacements written like patterns, @precompute params, the fixed-point
driver (convergence, its bound, linear work) and the built-in passes made of rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings

from slimfx import ir
from slimfx.ir import Param
from slimfx.ir.errors import PassError
from slimfx.passes import (
    PassContext,
    PassManager,
    PatternPass,
    Rule,
    RulePass,
    RuleSet,
    apply_rules,
    call,
    precompute,
    register_pass,
)
from slimfx.passes.cleanup import noop_rules
from slimfx.passes.fuse import fold_rules
from tests.generators import random_model


def silu_rule() -> Rule:
    return Rule(lambda x: x * torch.sigmoid(x), lambda x: F.silu(x), name="silu")


class Silus(nn.Module):
    def forward(self, x):
        y = x * torch.sigmoid(x)
        return torch.sigmoid(y) * y + 1


def test_a_replacement_is_a_plain_function_of_the_pattern_arguments():
    x = torch.randn(4, 3)
    g = ir.capture(Silus(), (x,))
    counts = apply_rules(g, RuleSet([silu_rule()]))
    assert counts == {"silu": 2}
    assert [n.op for n in g if n.op not in ("input", "output")] == ["silu", "silu", "add"]
    ir.verify(g)
    torch.testing.assert_close(ir.lower(g)(x), Silus()(x))


class StridedConvBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, groups=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_an_op_the_pattern_has_once_is_rebuilt_with_its_attrs_name_and_weights_named_as_before():
    torch.manual_seed(0)
    m = StridedConvBn().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1), m.bn.running_var.uniform_(0.5, 2), m.bn.weight.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    g = ir.capture(m, (x,))
    assert apply_rules(g, fold_rules()) == {"conv1d": 0, "conv2d": 1, "conv3d": 0, "conv_transpose1d": 0, "conv_transpose2d": 0,
                                            "linear": 0}
    conv = g.node("conv")  # the matched conv, keeping its name, module path and attrs (stride 2, padding 1)
    assert conv.attrs["stride"] == (2, 2) and conv.attrs["padding"] == (1, 1) and conv.module_path == "conv"
    assert conv.inputs[1] == Param("conv.weight") and conv.inputs[2] == Param("conv.bias")
    assert sorted(g.params) == ["conv.bias", "conv.weight"]  # the statistics nobody reads are dropped
    assert not torch.equal(g.params["conv.weight"], m.conv.weight.detach())  # new tensor, user's untouched
    ir.verify(g)
    with torch.no_grad():
        torch.testing.assert_close(ir.lower(g)(x), m(x), rtol=1e-5, atol=1e-5)
    kept = ir.capture(m, (x,))
    apply_rules(kept, fold_rules(), drop_params=False)  # for a caller that sweeps params itself
    assert "bn.running_mean" in kept.params and not kept.find("batch_norm")


@precompute
def doubled(w):
    return w * 2


def test_precompute_runs_at_rewrite_time_and_a_shared_param_gets_a_new_name():
    class TwoScaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 3))

        def forward(self, x):
            return F.linear(x, self.w) * 2 + F.linear(x, self.w) * 2

    rule = Rule(lambda x, w, two=2: F.linear(x, w) * two, lambda x, w: F.linear(x, doubled(w)),
                lambda m: isinstance(m["w"], Param) and m["two"] == 2, name="fold-scale")
    x = torch.randn(2, 3)
    m = TwoScaled()
    g = ir.capture(m, (x,))
    assert apply_rules(g, rule) == {"fold-scale": 2}
    lins = g.find("linear")
    names = sorted(p.name for n in lins for p in n.params())
    assert names == ["w", "w_1"]  # the first rewrite could not replace `w` (the second linear still read it)
    assert not g.find("mul") and sorted(g.params) == ["w", "w_1"]
    with torch.no_grad():
        torch.testing.assert_close(ir.lower(g)(x), m(x))


def test_precompute_refuses_a_computed_value_naming_the_rule():
    class Computed(nn.Module):
        def forward(self, x, w):
            return F.linear(x, w) * 2

    rule = Rule(lambda x, w, two=2: F.linear(x, w) * two, lambda x, w: F.linear(x, doubled(w)), name="fold-scale")
    g = ir.capture(Computed(), (torch.randn(2, 3), torch.randn(3, 3)))
    with pytest.raises(PassError, match=r"rule 'fold-scale'.*%w .*isinstance\(match\['w'\], Param\)"):
        apply_rules(g, rule)


def test_precompute_is_a_plain_function_outside_tracing():
    assert torch.equal(doubled(torch.ones(2)), torch.full((2,), 2.0))


class Chain(nn.Module):
    def forward(self, x):
        return torch.relu(torch.relu(torch.relu(torch.relu(x * 1.0) + 0) * 1))


def test_rules_apply_until_nothing_matches_including_matches_a_rewrite_creates():
    x = torch.randn(5)
    g = ir.capture(Chain(), (x,))
    rules = noop_rules() + RuleSet([Rule(lambda x: torch.relu(torch.relu(x)), lambda x: torch.relu(x),
                                         name="relu-relu")])
    counts = apply_rules(g, rules)
    # the no-ops go first, which makes relu(relu(relu(relu(x)))): three rewrites, each making the next match
    assert counts["relu-relu"] == 3 and counts["mul"] == 2 and counts["add"] == 1
    assert [n.op for n in g if n.op not in ("input", "output")] == ["relu"]
    assert apply_rules(g, rules) == dict.fromkeys(counts, 0)  # a fixed point
    torch.testing.assert_close(ir.lower(g)(x), Chain()(x))


def test_rules_that_keep_rewriting_stop_at_the_bound_with_the_rules_named():
    g = ir.capture(nn.ReLU(), (torch.randn(3),))
    forever = Rule(lambda x: torch.relu(x), lambda x: torch.relu(x), name="relu-again")
    with pytest.raises(PassError, match=r"rules \[relu-again\] do not converge.*after 50 rewrites.*"
                                        r"'relu-again' \(50 rewrites\); next at %relu"
                                        r".*make a condition reject what a replacement produces"):
        apply_rules(g, forever, max_rewrites=50)
    ir.verify(g)  # stopped between rewrites: still a valid graph


def test_an_inner_value_read_outside_the_match_is_kept_when_the_rule_is_not_exclusive():
    class Shared(nn.Module):
        def forward(self, x):
            r = torch.relu(x)
            return torch.relu(r), torch.exp(r)

    x = torch.randn(4)
    twice = Rule(lambda x: torch.relu(torch.relu(x)), lambda x: torch.relu(x), name="relu-relu")
    g = ir.capture(Shared(), (x,))
    assert apply_rules(g, twice) == {"relu-relu": 0}  # exclusive: the inner relu is also read by exp
    assert "also used by %exp" in twice.explain(g)
    shared = Rule(twice.pattern, lambda x: torch.relu(x), name="relu-relu", exclusive=False)
    assert apply_rules(g, shared) == {"relu-relu": 1}
    relus = g.find("relu")
    assert len(relus) == 2 and all(r.inputs[0] is g.inputs[0] for r in relus)  # exp keeps its relu
    ir.verify(g)
    torch.testing.assert_close(ir.lower(g)(x), Shared()(x))


def test_a_replacement_with_the_anchor_op_twice_rebuilds_the_anchor_only_as_its_output():
    class AbsNeg(nn.Module):
        def forward(self, x):
            return torch.abs(-x) + 1

    x = torch.randn(6)
    g = ir.capture(AbsNeg(), (x,))
    anchor = g.find("abs")[0]
    rule = Rule(lambda x: torch.abs(torch.neg(x)), lambda x: torch.abs(torch.abs(x)), name="abs-neg")
    assert apply_rules(g, rule) == {"abs-neg": 1}
    outer, inner = anchor, anchor.inputs[0]
    assert outer.graph is g and inner.op == "abs" and inner.inputs[0] is g.inputs[0]  # no cycle
    assert not g.find("neg")
    ir.verify(g)
    torch.testing.assert_close(ir.lower(g)(x), AbsNeg()(x))


def test_call_spells_any_canonical_op_and_binds_attrs_to_arguments():
    g = ir.Graph()
    meta = ir.TensorMeta((2,), torch.float32)
    x = g.create_node("input", name="x", meta=meta)
    a = g.create_node("identity", (x,), meta=meta)
    b = g.create_node("dropout", (a,), {"p": 0.5, "training": False}, meta=meta)
    g.set_outputs(b)
    drop = Rule(lambda x, p=None: call("dropout", x, p=p), lambda x: x, lambda m: m["p"] == 0.5, name="drop")
    assert [m["p"] for m in drop.find(g)] == [0.5]
    assert apply_rules(g, noop_rules()) == {**{r.name: 0 for r in noop_rules()}, "identity": 1, "dropout": 1}
    assert g.outputs is x
    with pytest.raises(PassError, match="call\\('no_such_op', ...\\) names no canonical op"):
        Rule(lambda x: call("no_such_op", x), lambda x: x)


def test_bad_rules_are_refused_with_what_to_do():
    with pytest.raises(PassError, match="not arguments of the pattern \\(x\\)"):
        Rule(lambda x: torch.relu(x), lambda y: y)
    with pytest.raises(PassError, match="give a replacement function"):
        Rule(lambda x: torch.relu(x))
    with pytest.raises(PassError, match="rule names must be unique.*relu"):
        RuleSet([Rule(lambda x: torch.relu(x), lambda x: x, name="relu"),
                 Rule(lambda x: torch.tanh(x), lambda x: x, name="relu")])
    with pytest.raises(PassError, match="belongs in a replacement"):
        Rule(lambda w: doubled(w) + 1, lambda w: w)


def test_the_driver_tries_each_candidate_once_when_rewrites_make_no_new_matches():
    """Linear work: a rewrite looks again only at what it touched, not at the whole graph."""
    g = ir.Graph()
    x = g.create_node("input", name="x", meta=ir.TensorMeta((4,), torch.float32))
    v = x
    for _ in range(3000):
        v = g.create_node("tanh", (v,), meta=x.meta)
        v = g.create_node("relu", (v,), meta=x.meta)
    g.set_outputs(v)
    rule = Rule(lambda a: torch.relu(torch.tanh(a)), lambda a: torch.sigmoid(a), name="r")
    visited = []
    real = rule.pattern._attempt
    rule.pattern._attempt = lambda node, *rest: visited.append(node.op) or real(node, *rest)
    assert apply_rules(g, rule) == {"r": 3000}
    assert len(visited) == 3000 and set(visited) == {"relu"}
    assert len(g) == 3000 + 2
    ir.verify(g)


@register_pass("test-fuse-silu-rules")
class FuseSiluRules(RulePass):
    """x * sigmoid(x) -> silu(x), as a RulePass."""

    def rule_set(self) -> RuleSet:
        return RuleSet([silu_rule()])


@register_pass("test-fuse-silu-pattern")
class FuseSiluPattern(PatternPass):
    """x * sigmoid(x) -> silu(x), as a PatternPass with a plain replacement."""

    pattern = staticmethod(lambda x: x * torch.sigmoid(x))
    replacement = staticmethod(lambda x: F.silu(x))


def test_rule_and_pattern_passes_run_in_a_pipeline():
    x = torch.randn(4, 3)
    for name, stats in (("test-fuse-silu-rules", {"rewritten": 2, "silu": 2}),
                        ("test-fuse-silu-pattern", {"rewritten": 2})):
        g = ir.capture(Silus(), (x,))
        (rec,) = PassManager([name], check_numerics=1e-6).run(g, PassContext(example_inputs=(x,)))
        assert rec.stats == stats and rec.changed and len(g.find("silu")) == 2


@settings(max_examples=10, deadline=None)
@given(random_model())
def test_builtin_rules_reach_a_fixed_point_on_random_models(case):
    model, (x,) = case
    g = ir.capture(model, (x,))
    rules = noop_rules() + fold_rules()
    apply_rules(g, rules)
    assert not [(r.name, m.anchor.name) for r in rules for m in r.find(g)]  # nothing left to rewrite
    ir.verify(g)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(ir.lower(g)(x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@register_pass("test-tanh-gelu-loose")
class _TanhGeluLoose(PatternPass):
    """Exact GELU to its tanh form, with the pattern's attributes left loose: it matches its own result."""

    preserves_outputs = False
    pattern = staticmethod(lambda x: F.gelu(x))
    replacement = staticmethod(lambda x: F.gelu(x, approximate="tanh"))


@register_pass("test-tanh-gelu-exact")
class _TanhGeluExact(_TanhGeluLoose):
    """The same with exact_attrs = True (docs/passes.md)."""

    exact_attrs = True


def test_a_pattern_pass_with_loose_attributes_that_recreates_its_match_points_to_exact_attrs():
    g = ir.capture(nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4), nn.GELU()).eval(),
                   (torch.randn(2, 4),))
    with pytest.raises(PassError, match=r"do not converge.*`exact_attrs = True` on a PatternPass"):
        PassManager(["test-tanh-gelu-loose"], failure_dumps=False).run(g.copy())
    run = PassManager(["test-tanh-gelu-exact"]).run(g)
    assert run[0].stats == {"rewritten": 2}
    assert [n.attrs["approximate"] for n in run.graph.find("gelu")] == ["tanh", "tanh"]


def test_a_rules_explanation_is_named_after_the_rule_not_its_lambda():
    silu = Rule(lambda x: x * torch.sigmoid(x), lambda x: F.silu(x), name="silu")
    g = ir.capture(nn.Sequential(nn.Linear(2, 2), nn.ReLU()).eval(), (torch.randn(1, 2),))
    assert silu.explain(g).startswith("rule 'silu': no graph node has op 'mul'")  # was: pattern '<lambda>'
