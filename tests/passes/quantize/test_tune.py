"""Accuracy-budget tuning (issue #17 item 5): the quantize step keeps float the layers a budget needs, in at most
`tune_evaluations` full evaluations, and lists every evaluation. A stub evaluator (accuracy falls with the output
noise of the quantized model) makes the budget deterministic and counts the evaluations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import slimfx
from slimfx import ir
from slimfx.errors import PassError, RecipeError
from slimfx.passes import PassContext, create_pass
from slimfx.passes.quantize.tune import rank


class Deep(nn.Module):
    """Six linears; two of them hold an outlier weight, so their per-tensor int8 scale is coarse and quantizing
    them costs most."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(16, 16) for _ in range(6)])
        with torch.no_grad():
            for i in (1, 4):
                self.layers[i].weight[0, 0] = 6.0

    def forward(self, x):
        for i, lin in enumerate(self.layers):
            x = lin(x)
            if i < 5:
                x = torch.relu(x)
        return x


X = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
NOISE_COST = 30.0


def stub_eval(model: nn.Module):
    """accuracy = 1 - 20 * relative output noise against the float model; counts its calls."""
    with torch.no_grad():
        ref = model_ref(X)
    calls = []

    def eval_fn(module):
        calls.append(1)
        with torch.no_grad():
            out = module(X)
        noise = float(((out - ref) ** 2).mean() / (ref ** 2).mean())
        return max(0.0, 1.0 - NOISE_COST * noise)
    eval_fn.calls = calls
    return eval_fn


model_ref = Deep().eval()


def _run(budget: dict, target="latency", evaluations=5, bits=8):
    g = ir.capture(model_ref, (X[:2],))
    ev = stub_eval(model_ref)
    ctx = PassContext((X[:2],), calibration_data=[(X[:128],)], eval_fn=ev, quiet=True)
    opts = {"per_channel": False, "bits": bits, "tune_target": target, "tune_evaluations": evaluations, **budget}
    res = create_pass("quantize", opts).run(g, ctx)
    return res.graph_after(g), res.stats, ev


@pytest.mark.parametrize("drop", [0.0005, 0.002, 0.01, 0.05, 0.09])
@pytest.mark.parametrize("target", ["latency", "size"])
def test_budget_met_within_the_evaluation_bound(drop, target):
    g, st, ev = _run({"max_accuracy_drop": drop}, target)
    tune = st["tune"]
    assert len(ev.calls) == tune["evaluations"] <= 5
    assert tune["budget"] == {"max_accuracy_drop": drop} and tune["target"] == target
    assert st["within_budget"] and st["accuracy_drop"] <= drop + 1e-12
    # what the stats say was kept float is float in the graph, and the rest is int8
    floats = set(st["fallback_layers"])
    for n in g.find("linear"):
        assert isinstance(n.inputs[1], ir.Param) == (n.name in floats), n.name
    if floats and tune["chosen"] is not None:  # the graph scores what the chosen evaluation scored
        assert stub_eval(model_ref)(ir.lower(g)) == pytest.approx(tune["trials"][tune["chosen"]]["accuracy"])
    for t in tune["trials"]:
        assert set(t) >= {"float_layers", "accuracy", "accuracy_drop", "sqnr_db", "size_bytes", "latency_ms"}


def test_a_budget_plain_int8_meets_costs_two_evaluations_and_keeps_nothing_float():
    g, st, ev = _run({"max_accuracy_drop": 0.09}, bits=8)
    assert len(ev.calls) == 2 and st["fallback_layers"] == [] and st["tune"]["chosen"] == 0
    assert len(g.find("dequantize")) >= 6


def test_the_evaluation_bound_holds_for_any_limit():
    for limit in (2, 3, 4):
        _, st, ev = _run({"max_accuracy_drop": 0.0005}, evaluations=limit)
        assert len(ev.calls) <= limit and st["tune"]["evaluations"] == len(ev.calls)


def test_the_layers_with_outliers_are_kept_float_and_nothing_else():
    _, st, ev = _run({"max_accuracy_drop": 0.01})
    assert sorted(st["fallback_layers"]) == ["layers_1", "layers_4"] and len(ev.calls) <= 5
    assert [r["name"] for r in st["tune"]["ranking"]][:2] == ["layers_1", "layers_4"]
    assert st["tune"]["trials"][0]["accuracy_drop"] > 0.01  # plain int8 does not meet it


def test_a_budget_nothing_meets_keeps_the_model_float_and_says_so():
    g, st, ev = _run({"max_accuracy_drop": 0.0})  # every int8 layer adds noise, and the stub charges for any
    assert len(ev.calls) <= 5 and st["tune"]["chosen"] is None and not g.find("dequantize")
    assert st["accuracy_drop"] == 0.0 and "whole model stays float" in st["tune"]["why"]


def test_min_sqnr_db_alone_needs_no_eval_fn():
    g = ir.capture(model_ref, (X[:2],))
    ctx = PassContext((X[:2],), calibration_data=[(X[:128],)], quiet=True)
    res = create_pass("quantize", {"per_channel": False, "bits": 4, "min_sqnr_db": 25.0}).run(g, ctx)
    tune = res.stats["tune"]
    assert tune["evaluations"] <= 5 and tune["budget"] == {"min_sqnr_db": 25.0}
    chosen = tune["trials"][tune["chosen"]]
    assert chosen["sqnr_db"] >= 25.0 and tune["trials"][0]["sqnr_db"] < 25.0


def test_size_target_picks_the_smallest_configuration_within_budget():
    _, st, _ = _run({"max_accuracy_drop": 0.002}, "size")
    tune = st["tune"]
    good = [t for t in tune["trials"] if t["within_budget"]]
    if good:
        assert tune["trials"][tune["chosen"]]["size_bytes"] == min(t["size_bytes"] for t in good)


def test_rank_puts_most_noise_per_cost_first():
    g = ir.capture(model_ref, (X[:2],))
    rows = [{"name": f"layers_{i}", "sqnr_db": s} for i, s in enumerate([40, 10, 30, 30, 20, float("inf")])]
    assert [n for n, _, _ in rank(rows, g, "size")][:3] == ["layers_1", "layers_4", "layers_2"]


# --- the recipe's [tune] table -----------------------------------------------------------------------------

def test_tune_table_sets_the_quantize_steps_options():
    r = slimfx.Recipe("t", passes=[("fold-batchnorm", {}), ("quantize", {})],
                      tune={"max_accuracy_drop": 0.003, "target": "size", "max_evaluations": 4})
    q = r.build_passes()[1]
    assert (q.max_accuracy_drop, q.min_sqnr_db, q.tune_target, q.tune_evaluations) == (0.003, None, "size", 4)
    assert r.passes[1] == ("quantize", {})  # the recipe's own steps are left as written
    assert slimfx.Recipe("u", passes=[("quantize", {})]).build_passes()[0].max_accuracy_drop is None


@pytest.mark.parametrize("tune, words", [
    ({"max_accuracy_drop": -0.1}, ["tune.max_accuracy_drop must be a fraction", "-0.1"]),
    ({"max_accuracy_drop": 1.5}, ["tune.max_accuracy_drop", "0.003 for 0.3 points"]),
    ({"max_accuracy_drop": float("nan")}, ["tune.max_accuracy_drop", "nan"]),
    ({"max_accuracy_drop": "half"}, ["tune.max_accuracy_drop", "'half'"]),
    ({"max_accuracy_drop": True}, ["tune.max_accuracy_drop", "True"]),
    ({"min_sqnr_db": float("inf")}, ["tune.min_sqnr_db must be decibels", "inf"]),
    ({"max_accuracy_drop": 0.01, "max_evaluations": 1}, ["tune.max_evaluations must be an integer", "from 2 to 50"]),
    ({"max_accuracy_drop": 0.01, "max_evaluations": 5.5}, ["tune.max_evaluations", "5.5"]),
    ({"max_accuracy_drop": 0.01, "max_evaluations": 10 ** 9}, ["tune.max_evaluations", "1000000000"]),
    ({"max_accuracy_drop": 0.01, "target": "speed"}, ["tune.target must be one of 'latency', 'size'", "'speed'"]),
    ({"max_accuracy_drop": 0.01, "budget": 3}, ["unknown key tune.budget", "[tune] accepts"]),
    ({"max_accuracy_drop": 0.01, "max_evaluation": 3}, ["did you mean 'max_evaluations'"]),
    ({"target": "size"}, ["[tune] needs a budget"]),
])
def test_hostile_tune_values_are_recipe_errors(tune, words):
    with pytest.raises(RecipeError) as e:
        slimfx.Recipe("t", passes=[("quantize", {})], tune=tune)
    for w in words:
        assert w in str(e.value), str(e.value)


POINTS_WORDS = ["0.3 allows losing 30 points", "for 0.3 points write 0.003"]


@pytest.mark.parametrize("build", [
    lambda: slimfx.Recipe("t", passes=[("quantize", {})], tune={"max_accuracy_drop": 0.3}),
    lambda: slimfx.Recipe("t", passes=[("quantize", {})], validate={"max_accuracy_drop": 0.3}),
    lambda: create_pass("quantize", {"max_accuracy_drop": 0.3}),
    lambda: slimfx.Recipe("t", passes=[("quantize", {"max_accuracy_drop": 0.3})]),
])
def test_max_accuracy_drop_written_in_points_is_refused_everywhere_the_key_exists(build):
    """0.3 meant as 0.3 points would be a 30-point budget: refused, with what to write instead."""
    with pytest.raises((RecipeError, PassError)) as e:
        build()
    for w in ["max_accuracy_drop", *POINTS_WORDS]:
        assert w in str(e.value), str(e.value)


def test_max_accuracy_drop_below_ten_points_is_accepted():
    assert create_pass("quantize", {"max_accuracy_drop": 0.099}).max_accuracy_drop == 0.099
    r = slimfx.Recipe("t", passes=[("quantize", {})], tune={"max_accuracy_drop": 0.003},
                      validate={"max_accuracy_drop": 0.099})
    assert r.build_passes()[0].max_accuracy_drop == 0.003 and r.validate.max_accuracy_drop == 0.099
    with pytest.raises(RecipeError, match="for 0.1 points write 0.001"):
        slimfx.Recipe("t", passes=[("quantize", {})], tune={"max_accuracy_drop": 0.1})


@pytest.mark.parametrize("table", ["tune", "validate"])
def test_cli_max_accuracy_drop_in_points_exits_2(tmp_path, table):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[[passes]]\nname = "quantize"\n[{table}]\nmax_accuracy_drop = 0.3\n')
    r = subprocess.run([sys.executable, "-m", "slimfx", "compile", "mlp", "--recipe", str(recipe), "--out",
                        str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2, r.stderr
    for w in [f"{table}.max_accuracy_drop", *POINTS_WORDS, str(recipe)]:
        assert w in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_tune_needs_a_quantize_step_and_one_place_for_the_budget():
    with pytest.raises(RecipeError, match="recipe has none; add a \\[\\[passes\\]\\] table with name = \"quantize\""):
        slimfx.Recipe("t", passes=[("dce", {})], tune={"max_accuracy_drop": 0.01})
    with pytest.raises(RecipeError, match="sets 'max_accuracy_drop', which \\[tune\\] sets too"):
        slimfx.Recipe("t", passes=[("quantize", {"max_accuracy_drop": 0.02})], tune={"max_accuracy_drop": 0.01})
    with pytest.raises(RecipeError, match="'tune' must be a table"):
        slimfx.Recipe("t", passes=[("quantize", {})], tune=3)


ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("table, word", [
    ("max_accuracy_drop = -1", "tune.max_accuracy_drop must be a fraction"),
    ("max_accuracy_drop = 0.01\ntarget = \"fast\"", "tune.target must be one of"),
    ("max_accuracy_drop = 0.01\nmax_evaluations = 0", "tune.max_evaluations"),
])
def test_cli_hostile_tune_exits_2_before_any_work(tmp_path, table, word):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[[passes]]\nname = "quantize"\n[tune]\n{table}\n')
    r = subprocess.run([sys.executable, "-m", "slimfx", "compile", "mlp", "--recipe", str(recipe), "--out",
                        str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2, r.stderr
    assert word in r.stderr and str(recipe) in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_compile_reports_each_tune_evaluation(tmp_path):
    model = Deep().eval()
    labels = model(X).argmax(1)
    data = slimfx.Data(calibration=[(X[:128],)], validation=[((X[128:],), labels[128:])])
    recipe = slimfx.Recipe("t", passes=[("quantize", {"bits": 4, "per_channel": False, "speed_guard": False})],
                           tune={"max_accuracy_drop": 0.02, "max_evaluations": 4})
    r = slimfx.compile(model, (X[:2],), recipe, data=data, quiet=True, bench_seconds=0, out_dir=tmp_path / "o")
    tune = r.report["tune"]
    assert tune["evaluations"] <= 4 and tune["budget"] == {"max_accuracy_drop": 0.02}
    assert json.loads((tmp_path / "o" / "report.json").read_text())["tune"]["trials"] == tune["trials"]
    acc0, acc1 = r.report["validation"]["accuracy_original"], r.report["validation"]["accuracy_compiled"]
    assert acc0 - acc1 <= 0.02 + 1e-9  # the budget holds on the deployed ONNX file too
    assert any("tuned to max_accuracy_drop 0.02" in h for h in r.report["headline"])


def test_latency_target_times_the_choice_against_plain_int8():
    def measure(graph, inputs, budget_s):  # a float linear costs 1, an int8 one 0.5
        cost = sum(0.5 if isinstance(n.inputs[1], ir.Node) else 1.0 for n in graph.find("linear"))
        return [cost * inp[0].shape[0] for inp in inputs]

    g = ir.capture(model_ref, (X[:2],))
    ctx = PassContext((X[:2],), calibration_data=[(X[:128],)], eval_fn=stub_eval(model_ref), quiet=True,
                      measure_ms=measure)
    res = create_pass("quantize", {"per_channel": False, "max_accuracy_drop": 0.01, "speed_guard": False}).run(g, ctx)
    tune = res.stats["tune"]
    chosen = tune["trials"][tune["chosen"]]
    assert sorted(chosen["float_layers"]) == ["layers_1", "layers_4"]
    assert chosen["latency_ms"] == {"b1": 4.0, "b32": 128.0} and tune["trials"][0]["latency_ms"] == {"b1": 3.0, "b32": 96.0}
    assert tune["latency_vs_plain_int8"].startswith("1.33x of plain int8's time") and "cost time" in tune["latency_vs_plain_int8"]


class SiluNet(nn.Module):
    """conv -> SiLU -> conv -> GELU -> linear: quantize rewrites silu as x * sigmoid(x) before planning, so the
    ranges the tuner and the sensitivity analysis calibrate must be of that rewritten graph."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8 * 36, 4)

    def forward(self, x):
        return self.fc(nn.functional.gelu(self.c2(nn.functional.silu(self.c1(x)))).flatten(1))


@pytest.mark.parametrize("budget", [{"min_sqnr_db": 60.0}, {"max_accuracy_drop": 0.0}])
def test_tune_quantizes_a_model_with_silu(budget):
    m = SiluNet().eval()
    x = torch.randn(64, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    ref = m(x).argmax(1)
    g = ir.capture(m, (x[:2],))
    ctx = PassContext((x[:2],), calibration_data=[(x,)], quiet=True,
                      eval_fn=lambda mod: float((mod(x).argmax(1) == ref).float().mean()) - 0.1 * (mod(x) - m(x)).abs().mean().item())
    res = create_pass("quantize", {"bits": 3, "per_channel": False, **budget}).run(g, ctx)
    tune = res.stats["tune"]
    assert tune["evaluations"] >= 2 and tune["trials"][0]["within_budget"] is False
    assert tune["trials"][-1]["float_layers"], tune


def test_quant_sensitivity_runs_on_a_model_with_silu():
    m = SiluNet().eval()
    x = torch.randn(32, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    g = ir.capture(m, (x[:2],))
    before = str(g)
    rows = create_pass("quant-sensitivity").run(g, PassContext((x[:2],), calibration_data=[(x,)], quiet=True)).stats["layers"]
    assert {"c1", "c2", "fc"} <= {r["name"] for r in rows} and all(r["sqnr_db"] > 0 for r in rows)
    assert str(g) == before  # an analysis: the graph is unchanged


@pytest.mark.parametrize("int8_cost, shipped", [(3.0, "the whole model float"), (0.5, None)])
def test_the_tune_section_says_when_the_speed_guard_ships_something_else(int8_cost, shipped):
    """The guard runs on the tuned model; when it kept the whole model float, the report's `tune` section still
    named the tuner's float layers as what was chosen and the headline lost the tuning note, so report.json told
    of a partly int8 model that was not the one written."""
    def measure(graph, inputs, budget_s):  # a float linear costs 1, an int8 one int8_cost
        cost = sum(int8_cost if isinstance(n.inputs[1], ir.Node) else 1.0 for n in graph.find("linear"))
        return [cost * inp[0].shape[0] for inp in inputs]

    g = ir.capture(model_ref, (X[:2],))
    ctx = PassContext((X[:2],), calibration_data=[(X[:128],)], eval_fn=stub_eval(model_ref), quiet=True,
                      measure_ms=measure)
    res = create_pass("quantize", {"per_channel": False, "max_accuracy_drop": 0.01}).run(g, ctx)
    tune, notes = res.stats["tune"], res.stats["notes"]
    assert sorted(tune["float_layers"]) == ["layers_1", "layers_4"]
    assert any(n.startswith("tuned to max_accuracy_drop 0.01") for n in notes), notes
    if shipped is None:
        assert "shipped" not in tune and res.graph_after(g).find("quantize")
    else:
        assert tune["shipped"].startswith(shipped) and "speed guard" in tune["shipped"]
        assert not res.graph_after(g).find("quantize")
        assert any("speed guard kept the whole model float" in n for n in notes), notes
