"""Cross-layer equalization (exact rewrite, balanced ranges), bias correction, sensitivity, fallback."""

import math

import pytest
import torch
import torch.nn as nn

from slimfx import ir
from slimfx.ir.errors import PassError
from slimfx.passes import PassContext, PassManager, create_pass
from slimfx.passes.quantize.sensitivity import graph_outputs, sqnr_db


class Chain(nn.Module):
    """conv -> relu -> conv -> relu6 -> depthwise conv -> relu6 -> conv: every kind of equalizable pair."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c(nn.functional.relu6(self.dw(nn.functional.relu6(self.b(torch.relu(self.a(x)))))))


def _spread_channels(m: nn.Module, seed: int = 0) -> nn.Module:
    """Give output channels very different ranges, as batch-norm folding does in trained nets."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d):
                s = torch.exp(torch.randn(mod.out_channels, generator=g) * 1.2)
                mod.weight.mul_(s.reshape(-1, 1, 1, 1))
                if mod.bias is not None:
                    mod.bias.mul_(s)
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(torch.exp(torch.randn(mod.num_features, generator=g)))
                mod.running_var.copy_(torch.exp(torch.randn(mod.num_features, generator=g)))
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.3)
                mod.bias.copy_(torch.randn(mod.num_features, generator=g) * 0.3)
    return m.eval()


def _ratio(w: torch.Tensor, axis: int) -> float:
    r = w.abs().transpose(0, axis).reshape(w.shape[axis], -1).amax(dim=1)
    return float(r.max() / r.min())


def test_equalize_is_exact_and_balances_ranges():
    torch.manual_seed(0)
    m = _spread_channels(Chain())
    x = torch.randn(4, 3, 8, 8) * 2
    g = ir.capture(m, (x,))
    before = _ratio(g.params["dw.weight"], 0)
    res = create_pass("equalize", {}).run(g, PassContext((x,)))
    ir.verify(g)
    assert res.stats["pairs"] == 3 and res.stats["per_channel_clamps"] == 2
    torch.testing.assert_close(ir.lower(g)(x), m(x), rtol=1e-4, atol=1e-4)  # the rewrite is exact
    assert _ratio(g.params["dw.weight"], 0) < before / 3
    # equalized: output range of channel i of `b` equals the input range of channel i of `dw`
    rb = g.params["b.weight"].abs().reshape(16, -1).amax(1)
    rdw = g.params["dw.weight"].abs().reshape(16, -1).amax(1)
    assert float((rb.log() - rdw.log()).abs().mean()) < 0.7


def test_equalize_without_relu6_crossing_leaves_relu6_pairs_alone():
    m = _spread_channels(Chain())
    x = torch.randn(2, 3, 8, 8)
    g = ir.capture(m, (x,))
    res = create_pass("equalize", {"through_relu6": False}).run(g, PassContext((x,)))
    assert res.stats["pairs"] == 1 and not g.find("clamp")
    torch.testing.assert_close(ir.lower(g)(x), m(x), rtol=1e-4, atol=1e-4)


def _mobilenet_graph():
    from slimfx import models

    spec = models.get("mobilenetv2")
    m = _spread_channels(spec.build(seed=0))
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    g = ir.capture(m, (x[:1],))
    create_pass("fold-batchnorm").run(g, PassContext((x[:1],)))
    return g, x


def test_mobilenetv2_per_tensor_int8_gains_sqnr_from_equalization_and_bias_correction():
    g, x = _mobilenet_graph()
    cal = [(x[i:i + 16],) for i in range(0, 48, 16)]
    test = [(x[48:],)]
    ref = graph_outputs(g, test)
    results = {}
    for name, steps in {"plain": ["quantize"], "cle": ["equalize", "quantize"],
                        "cle+bc": ["equalize", "quantize", "bias-correction"]}.items():
        q = g.copy()
        ctx = PassContext((x[:1],), calibration_data=cal, quiet=True)
        PassManager([create_pass(p, {"per_channel": False, "calibration": "minmax"} if p == "quantize" else {})
                     for p in steps]).run(q, ctx)
        ir.verify(q)
        results[name] = sqnr_db(ref, graph_outputs(q, test))
    assert results["cle"] > results["plain"] + 1.0, results
    assert results["cle+bc"] > results["plain"] + 1.0, results


def test_bias_correction_removes_mean_shift():
    torch.manual_seed(0)
    m = _spread_channels(Chain())
    x = torch.randn(64, 3, 8, 8)
    g = ir.capture(m, (x[:1],))
    ctx = PassContext((x[:1],), calibration_data=[(x[:32],), (x[32:],)], quiet=True)
    plain = g.copy()
    create_pass("quantize", {"per_channel": False, "bits": 4}).run(plain, ctx)
    before = (ir.lower(plain)(x) - m(x)).mean(dim=(0, 2, 3)).abs().mean()
    # the recipe step `bias-correction` after quantize is quantize's bias_correction option
    pm = PassManager(["quantize{per_channel=false, bits=4}", "bias-correction"], check_numerics=1e-4)
    assert str(pm.passes[0]).count("bias_correction=True") == 1
    run = pm.run(g, ctx)
    after = (ir.lower(g)(x) - m(x)).mean(dim=(0, 2, 3)).abs().mean()
    assert run[0].stats["bias_correction"]["corrected"] == 4 and not run[1].changed
    assert after < 0.5 * before
    assert g.params[g.node("c").inputs[2].inputs[0].name].dtype == torch.int32  # still an int32 bias


def test_bias_correction_needs_quantize_first():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(PassError, match="must come after a 'quantize'"):
        PassManager(["dce", "bias-correction"])
    q = create_pass("quantize", {"scheme": "int8-dynamic", "bias_correction": True})
    assert q.needs_calibration and "bias_correction needs calibration data" in q.check_context(
        PassContext((x,), calibration_data=[]))


def test_sensitivity_and_fallback_keep_the_worst_layer_float():
    torch.manual_seed(0)
    m = _spread_channels(Chain())
    x = torch.randn(64, 3, 8, 8)
    g = ir.capture(m, (x[:1],))
    with torch.no_grad():
        labels = m(x).flatten(1).argmax(1)

    def eval_fn(module):
        with torch.no_grad():
            return float((module(x).flatten(1).argmax(1) == labels).float().mean())

    ctx = PassContext((x[:1],), calibration_data=[(x[:32],)], eval_fn=eval_fn, quiet=True)
    res = create_pass("quant-sensitivity", {"per_channel": False}).run(g, ctx)
    rows = res.stats["layers"]
    assert [r["name"] for r in rows] and {r["name"] for r in rows} == {"a", "b", "dw", "c"}
    assert all(math.isfinite(r["sqnr_db"]) and r["accuracy_drop"] is not None for r in rows)
    assert not g.find("quantize")  # analysis only
    q = g.copy()
    res = create_pass("quantize", {"per_channel": False, "bits": 3, "max_accuracy_drop": 0.02}).run(q, ctx)
    ir.verify(q)
    st = res.stats
    assert st["within_budget"] and st["accuracy_drop"] <= 0.02 and st["tune"]["evaluations"] <= 5
    # 3-bit per-tensor weights: even one int8 layer costs more than the budget, so the tuner keeps all float
    assert sorted(st["fallback_layers"]) == ["a", "b", "c", "dw"] and st["tune"]["chosen"] is None
    for name in st["fallback_layers"]:
        assert isinstance(q.node(name).inputs[1], ir.Param)  # kept float
    assert eval_fn(ir.lower(q)) == pytest.approx(st["accuracy"])
    with pytest.raises(PassError, match="eval"):
        create_pass("quantize", {"max_accuracy_drop": 0.01}).run(g.copy(), PassContext((x[:1],), calibration_data=[(x,)]))
