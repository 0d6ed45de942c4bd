"""Op traits and the registries users extend: a user's op goes through capture, fold, prune, quantize and
export when it declares its traits (or registers a pruning rule), and pruning names the trait it lacks."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings

from slimfx import ir
from slimfx.exporters.onnx import EMITTERS, export_onnx, register_emitter
from slimfx.ir import capture_export
from slimfx.ir.ops import OPS
from slimfx.passes import PassContext, create_pass
from slimfx.passes.prune import PRUNING_RULES, analyze, register_pruning_rule, rule_for
from tests.generators import random_model

capture_mod = importlib.import_module("slimfx.ir.capture")  # the module (ir.capture is the function)


@pytest.fixture(autouse=True)
def _restore_registries():
    """Registrations are global: each test's are undone after it."""
    tables = [OPS, PRUNING_RULES, EMITTERS, capture_mod._FUNCTIONS, capture_mod._METHODS, capture_mod._MODULES,
              capture_mod._WRAPPED, capture_export._CONVERTERS]
    saved = [dict(t) for t in tables]
    yield
    for t, s in zip(tables, saved, strict=True):
        t.clear()
        t.update(s)


# --- a user's activation: a Python function with a converter, an op with traits, an ONNX emitter -------

def my_swish(x):
    return x * torch.sigmoid(2.0 * x)


def _register_swish(**traits):
    ir.register_op("my_swish", my_swish, **traits)
    ir.register_converter(my_swish, lambda x: ("my_swish", (x,), {}))

    @register_emitter("my_swish")
    def _emit(ctx, node):
        x = ctx.value(node.inputs[0])
        return ctx.emit("Mul", [x, ctx.emit("Sigmoid", [ctx.emit("Mul", [x, ctx.value(2.0, dtype=torch.float32)])])])


class SwishNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = my_swish(self.bn(self.c1(x)))
        y = my_swish(self.c2(y))
        return self.fc(y.mean((2, 3)))


def _swish_net() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    m = SwishNet().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m, (torch.randn(2, 3, 8, 8),)


def test_a_converter_maps_a_user_function_at_capture_and_lowers_bit_exact():
    _register_swish(elementwise=1)
    m, inputs = _swish_net()
    g = ir.capture(m, inputs, method="fx")
    assert [n.op for n in g].count("my_swish") == 2
    assert "sigmoid" not in {n.op for n in g}  # recorded as one call, not traced through
    assert torch.equal(ir.lower(g)(*inputs), m(*inputs))


def test_an_elementwise_user_op_folds_prunes_quantizes_and_exports(tmp_path):
    _register_swish(elementwise=1)
    assert ir.get_op("my_swish").channels == "same"  # derived from elementwise=1
    m, inputs = _swish_net()
    ref = m(*inputs)
    g = ir.capture(m, inputs)
    ctx = PassContext(inputs, calibration_data=[(torch.randn(8, 3, 8, 8),) for _ in range(2)], quiet=True)

    res = create_pass("fold-batchnorm", {}).run(g, ctx)
    assert res.stats["folded"] == 1
    torch.testing.assert_close(ir.lower(g)(*inputs), ref, rtol=1e-4, atol=1e-5)

    res = create_pass("prune-channels", {"sparsity": 0.5}).run(g, ctx)
    g = res.graph_after(g)
    ir.verify(g)
    assert {tuple(r["sources"]): r["kept_channels"] for r in res.stats["groups"]} == {("c1",): 4, ("c2",): 3}
    assert g.params["c1.weight"].shape[0] == 4 and g.params["c2.weight"].shape[1] == 4
    assert not res.stats.get("missing_traits")

    res = create_pass("quantize", {"scheme": "int8-static"}).run(g, ctx)
    ir.verify(g)
    assert res.stats["quantized_ops"] == 3
    assert all(u.op == "my_swish" for u in g.find("my_swish"))  # stays float between the quantized layers

    out = export_onnx(g, tmp_path / "m.onnx", inputs=inputs)
    assert out.validation.passed


def test_an_op_without_a_channel_trait_is_refused_by_name_and_listed_as_blocked(caplog):
    _register_swish()  # no traits: pruning cannot know how channels flow through it
    assert ir.get_op("my_swish").channels is None and rule_for("my_swish") is None
    m, inputs = _swish_net()
    g = ir.capture(m, inputs)
    res = create_pass("prune-channels", {"sparsity": 0.5}).run(g, PassContext(inputs))
    ir.verify(g)
    assert res.stats["missing_traits"] == {"my_swish": "channels"}
    why = {b["source"]: b["why"] for b in res.stats["blocked"] if b["op"] == "my_swish"}
    assert set(why) == {"c1", "c2"}
    assert "op 'my_swish' has no channel trait and no pruning rule" in why["c1"]
    assert "register_pruning_rule('my_swish'" in why["c1"] and "ir.register_op('my_swish'" in why["c1"]
    assert not res.changed and g.params["c1.weight"].shape[0] == 8
    assert "my_swish" in caplog.text


def test_a_weighted_user_op_is_quantized_and_pruned_like_linear():
    def my_linear(x, weight, bias=None):
        return torch.nn.functional.linear(x, weight, bias)

    ir.register_op("my_linear", my_linear, weighted=ir.Weighted(channel_dim=-1), quant="weight")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(8, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    m, x = Net().eval(), torch.randn(4, 6)
    g = ir.capture(m, (x,))
    g.node("a").op = "my_linear"  # as if a converter had spelled it so
    assert ir.count_macs(g) == 4 * (8 * 6 + 3 * 8)
    deps = analyze(g)
    assert [grp.sources() for grp in deps.groups] == [["a"]]
    ctx = PassContext((x,), calibration_data=[(torch.randn(16, 6),)], quiet=True)
    res = create_pass("quantize", {"scheme": "int8-static"}).run(g, ctx)
    assert res.stats["quantized_ops"] == 2 and g.node("a").inputs[1].op == "dequantize"


# --- a pruning rule for a user module's op --------------------------------------------------------------

class ChannelScale(nn.Module):
    """y = x * scale[c]: a per-channel param the pruning rule must shrink with the channels."""

    def __init__(self, c: int):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, c))

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1)


def _channel_scale(x, scale):
    return x * scale.view(1, -1, 1, 1)


class ScaleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.s = ChannelScale(8)
        self.c2 = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c2(torch.relu(self.s(self.c1(x))))


def _register_channel_scale():
    ir.register_op("channel_scale", _channel_scale)  # no traits: only a rule says how channels flow
    ir.register_converter(ChannelScale, lambda mod, path, x: ("channel_scale", (x, ir.Param(f"{path}.scale")), {}))


def test_a_module_converter_keeps_the_module_whole_and_reads_its_params():
    _register_channel_scale()
    torch.manual_seed(0)
    m, x = ScaleNet().eval(), torch.randn(2, 3, 4, 4)
    g = ir.capture(m, (x,), method="fx")
    node = g.node("s")
    assert node.op == "channel_scale" and node.module_path == "s" and node.inputs[1] == ir.Param("s.scale")
    assert torch.equal(ir.lower(g)(x), m(x))


def test_prune_channels_uses_a_registered_rule_for_a_user_op():
    _register_channel_scale()
    torch.manual_seed(0)
    m, x = ScaleNet().eval(), torch.randn(2, 3, 4, 4)
    g = ir.capture(m, (x,))
    assert analyze(g).groups == []  # without a rule the channels of c1 stop at channel_scale
    calls = []

    @register_pruning_rule("channel_scale")
    def _rule(an, node):
        calls.append(node.name)
        ch = an.channels_at(node.inputs[0], 1, node, "channel_scale")
        if ch is None:
            an.freeze_params(node)
        else:
            an.member(node.inputs[1], 0, ch, "norm", node)
        return an.value(node.inputs[0])

    assert rule_for("channel_scale") is _rule
    res = create_pass("prune-channels", {"sparsity": 0.5, "criterion": "bn-scale"}).run(g, PassContext((x,)))
    g = res.graph_after(g)
    ir.verify(g)
    assert calls and res.changed
    kept = g.params["s.scale"]
    assert kept.shape == (4,) and torch.equal(kept, torch.linspace(0.5, 2.0, 8)[4:])  # the 4 largest |scale|
    assert g.params["c1.weight"].shape[0] == 4 and g.params["c2.weight"].shape[1] == 4
    # the pruned graph computes the dense one with those channels removed
    dense = ScaleNet().eval()
    dense.load_state_dict(m.state_dict())
    with torch.no_grad():
        dense.s.scale[:4] = 0.0
    torch.testing.assert_close(ir.lower(g)(x), dense(x), rtol=1e-5, atol=1e-6)


def test_a_rule_can_fix_attrs_after_pruning():
    def _scaled_sum(x, *, channels):
        return x.sum(1, keepdim=True) / channels

    ir.register_op("scaled_sum", _scaled_sum)

    @register_pruning_rule("scaled_sum")
    def _rule(an, node):
        ch = an.channels_at(node.inputs[0], 1, node, "scaled_sum")

        def fix(n, keep):
            n.attrs = {**n.attrs, "channels": int(keep.sum())}

        an.add_fixup(node, ch, fix)
        return an.zeros(node.meta)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 8, 1)

        def forward(self, x):
            return self.c(x).sum(1, keepdim=True) / 8

    m, x = Net().eval(), torch.randn(2, 3, 4, 4)
    g = ir.capture(m, (x,))
    s = g.find("sum")[0]
    div = next(iter(s.users))
    s.op, s.attrs = "scaled_sum", {"channels": 8}
    g.replace_all_uses(div, s)
    g.erase(div)
    ir.verify(g)
    g = create_pass("prune-channels", {"sparsity": 0.25}).run(g, PassContext((x,))).graph_after(g)
    assert g.params["c.weight"].shape[0] == 6 and g.node(s.name).attrs["channels"] == 6


# --- a torch custom op: one converter for both front ends -----------------------------------------------

@torch.library.custom_op("slimfx_test::shifted_relu", mutates_args=())
def shifted_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x - 0.5)


@shifted_relu.register_fake
def _(x):
    return torch.empty_like(x)


def test_a_converter_for_a_torch_op_serves_fx_and_export():
    ir.register_op("shifted_relu", lambda x: torch.relu(x - 0.5), elementwise=1)
    ir.register_converter(torch.ops.slimfx_test.shifted_relu, lambda x: ("shifted_relu", (x,), {}))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.ops.slimfx_test.shifted_relu(self.fc(x))

    m, x = Net().eval(), torch.randn(3, 4)
    for method in ("fx", "export"):
        g = ir.capture(m, (x,), method=method)
        assert "shifted_relu" in {n.op for n in g}, method
        torch.testing.assert_close(ir.lower(g)(x), m(x))


def test_a_converter_to_an_unregistered_op_is_a_capture_error():
    ir.register_converter(my_swish, lambda x: ("not_an_op", (x,), {}))
    m, inputs = _swish_net()
    with pytest.raises(ir.CaptureError, match=r"'not_an_op'.*ir.register_op\('not_an_op'"):
        ir.capture(m, inputs, method="fx")


# --- the table itself --------------------------------------------------------------------------------------

def test_every_canonical_op_has_a_pruning_rule_and_queries_follow_registration():
    assert [op for op in OPS if rule_for(op) is None] == []
    assert sorted(ir.ops_with(weighted=True)) == ["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "linear"]
    assert "my_swish" not in ir.ops_with(elementwise=1)
    ir.register_op("my_swish", my_swish, elementwise=1, quant="transparent")
    assert "my_swish" in ir.ops_with(elementwise=1) and "my_swish" in ir.ops_with(quant="transparent")
    with pytest.raises(ValueError, match="channels='sideways'"):
        ir.register_op("bad", my_swish, channels="sideways")
    with pytest.raises(TypeError, match="not an op trait"):
        ir.ops_with(colour="red")


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=random_model())
def test_user_ops_with_the_traits_of_built_in_ones_analyze_the_same(case):
    """Traits alone decide: every op of the graph that has no rule of its own, registered again under a new
    name with the same traits, gives the same channel groups, blocked channels and members."""
    model, inputs = case
    g = ir.capture(model, inputs)
    deps = analyze(g)
    before = (deps.report(), deps.blocked, sorted(deps.members))
    for op in {n.op for n in g if n.op in OPS and n.op not in PRUNING_RULES}:
        d = OPS[op]
        traits = {f.name: getattr(d, f.name) for f in dataclasses.fields(d) if f.name not in ("name", "impl")}
        ir.register_op(f"user_{op}", d.impl, **traits)
        for n in g.find(op):
            n.op = f"user_{op}"
    deps = analyze(g)
    blocked = [{**b, "op": b["op"].removeprefix("user_"), "why": b["why"].replace("'user_", "'")}
               for b in deps.blocked]
    assert (deps.report(), blocked, sorted(deps.members)) == before
