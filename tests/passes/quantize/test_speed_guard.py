"""Never slower than fp32 by default (issue #17): quantize folds batch norms a recipe forgot, and its speed
guard keeps float the layers whose integer kernel loses, or the whole model when int8 still loses. The
guard's timing comes from PassContext.measure_ms; here a fake runtime makes the decisions deterministic."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import slimfx
from slimfx import ir
from slimfx.errors import RecipeError
from slimfx.passes import PassContext, create_pass
from slimfx.passes.quantize.qdq import through_noops
from slimfx.passes.quantize.speed import MARGIN, decide, layer_graph, quantized_layers, storage_choice


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn1(self.c1(x)))
        y = torch.relu(self.bn2(self.c2(y)))
        return self.fc(self.drop(y.mean(dim=(2, 3))))


def _setup():
    torch.manual_seed(0)
    m = Net().eval()
    for bn in (m.bn1, m.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 8, 8)
    return m, ir.capture(m, (x,)), x


def fake_runtime(slow: set[str] = frozenset(), int8_factor: float = 0.5):
    """ms = 1 per float layer; a graph with integer weights costs int8_factor per layer, 3 for layers in
    `slow`. Records the graphs it timed."""
    seen = []

    def measure(graph, inputs, budget_s):
        seen.append(graph)
        cost = 0.0
        for n in graph:
            if n.op in ("conv2d", "linear"):
                w, xin = n.inputs[1], n.inputs[0]
                while isinstance(xin, ir.Node) and xin.op in ("identity", "dropout"):
                    xin = xin.inputs[0]
                # an integer kernel: integer weights and a quantized input (weight-only layers compute in float)
                integer = isinstance(w, ir.Node) and w.op == "dequantize" and isinstance(xin, ir.Node) \
                    and xin.op == "dequantize"
                cost += (3.0 if n.name in slow else int8_factor) if integer else 1.0
        return [cost * inp[0].shape[0] for inp in inputs]
    measure.seen = seen
    return measure


def _ctx(x, measure=None):
    return PassContext((x,), calibration_data=[(torch.randn(8, 3, 8, 8),)], quiet=True, measure_ms=measure)


def test_quantize_folds_batch_norms_a_recipe_forgot_and_says_so():
    m, g, x = _setup()
    res = create_pass("quantize", {}).run(g, _ctx(x))
    assert not g.find("batch_norm")
    assert any("ran fold-batchnorm first" in n and "folded 2" in n for n in res.stats["notes"])
    ref = m(x)
    assert torch.nn.functional.cosine_similarity(ref.flatten(), ir.lower(g)(x).flatten(), dim=0) > 0.99
    # opted out: the batch norms stay (and stay float)
    m, g, x = _setup()
    res = create_pass("quantize", {"prerequisites": False}).run(g, _ctx(x))
    assert len(g.find("batch_norm")) == 2 and not any("fold-batchnorm" in n for n in res.stats["notes"])
    # folded already: no note
    m, g, x = _setup()
    create_pass("fold-batchnorm").run(g, _ctx(x))
    res = create_pass("quantize", {}).run(g, _ctx(x))
    assert not any("fold-batchnorm" in n for n in res.stats["notes"])


def test_layer_graph_is_the_integer_kernel_from_integer_input_to_integer_output():
    m, g, x = _setup()
    q = g.copy()
    create_pass("quantize", {}).run(q, _ctx(x))
    c2 = q.node("c2")
    sub = layer_graph(q, c2)
    assert [n.op for n in sub.inputs] == ["input"] and sub.inputs[0].meta.dtype == torch.uint8
    assert sub.output_nodes()[0].op == "quantize"  # after c2's ReLU
    # the int32 bias's scale s_x * s_w is an IR fact (a mul of the two scales), carried into the layer graph
    assert [n.op for n in sub if n.op not in ("input", "output", "dequantize")] == ["mul", "conv2d", "relu",
                                                                                     "quantize"]
    ir.verify(sub)
    assert {n.name for n in quantized_layers(q)} == {"c1", "c2", "fc"}
    # kept float between int8 neighbours: dequantize, the float conv, its ReLU, the quantize the next layer reads
    sub_f = layer_graph(q, c2, g.node("c2"))
    ir.verify(sub_f)
    assert sub_f.inputs[0].meta.dtype == torch.uint8
    assert [n.op for n in sub_f if n.op not in ("input", "output")] == ["dequantize", "conv2d", "relu", "quantize"]
    assert isinstance(sub_f.node("c2").inputs[1], ir.Param) and sub_f.node("c2").inputs[1].name == "c2.weight"
    # inside a float prefix: float in, float out (no dequantize, no quantize)
    sub_b = layer_graph(q, c2, g.node("c2"), bare=True)
    ir.verify(sub_b)
    assert sub_b.inputs[0].meta.dtype == torch.float32 and sub_b.output_nodes()[0].op == "relu"
    assert [n.op for n in sub_b if n.op not in ("input", "output")] == ["conv2d", "relu"]
    # the first conv reads the model's input: as int8 it pays for the input's quantize, as float it does not
    c1_i, c1_f = layer_graph(q, q.node("c1")), layer_graph(q, q.node("c1"), g.node("c1"))
    assert c1_i.inputs[0].meta.dtype == c1_f.inputs[0].meta.dtype == torch.float32
    assert [n.op for n in c1_i if n.op not in ("input", "output")][:2] == ["quantize", "dequantize"]
    assert [n.op for n in c1_f if n.op not in ("input", "output")] == ["conv2d", "relu", "quantize"]
    # the linear reads its quantized input through an inference dropout (which vanishes on export)
    fc = layer_graph(q, q.node("fc"))
    assert fc.inputs[0].meta.dtype == torch.uint8 and fc.output_nodes()[0].op == "linear"
    ir.verify(fc)
    assert [n.op for n in layer_graph(g, g.node("fc")) if n.op not in ("input", "output")] == ["linear"]


def test_speed_guard_keeps_float_the_layers_whose_int8_kernel_is_slower():
    m, g, x = _setup()
    measure = fake_runtime(slow={"c1"})
    res = create_pass("quantize", {"speed_guard_batches": [1, 4]}).run(g, _ctx(x, measure))
    g = res.graph_after(g)
    guard = res.stats["speed_guard"]
    assert list(guard["kept_float"]) == ["c1"] and "3.00x the float one" in guard["kept_float"]["c1"]
    assert guard["layer_ratio"]["c2"] == 0.5 and guard["batches"] == [1, 4]
    assert isinstance(g.node("c1").inputs[1], ir.Param) and g.node("c2").inputs[1].op == "dequantize"
    assert "c1" in res.stats["skipped"]
    assert any("speed guard kept 1 layer(s) float" in n and "c1" in n for n in res.stats["notes"])
    # the whole models timed side by side: all int8 (3 + 0.5 + 0.5) / 3, with c1 float (1 + 0.5 + 0.5) / 3
    assert guard["model_ratio"] == {"int8": {"b1": 1.333, "b4": 1.333},
                                    "int8, slower layers float": {"b1": 0.667, "b4": 0.667},
                                    "float": {"b1": 1.0, "b4": 1.0}}
    assert guard["chosen"] == "int8, slower layers float"


def test_speed_guard_keeps_all_layers_int8_when_the_model_with_the_slow_ones_float_is_not_faster():
    m, g, x = _setup()
    measure = fake_runtime(slow={"c1"})

    def whole_models_disagree(graph, inputs, budget_s):  # alone c1 loses; in the model it does not
        if graph.has_node("fc") and graph.has_node("c1"):
            integer = isinstance(graph.node("c1").inputs[1], ir.Node)
            return [(1.5 if integer else 2.5) * inp[0].shape[0] for inp in inputs]
        return measure(graph, inputs, budget_s)

    res = create_pass("quantize", {}).run(g, _ctx(x, whole_models_disagree))
    guard = res.stats["speed_guard"]
    assert guard["chosen"] == "int8" and list(guard["slower_layers"]) == ["c1"] and guard["kept_float"] == {}
    assert "not clearly faster" in guard["note"] and res.graph_after(g).node("c1").inputs[1].op == "dequantize"


def _prefix_runtime(alone: dict[str, float], int8_model_ms: float):
    """Layers timed alone cost as `alone` says in int8 (1.0 in float, 0.5 when not listed); whole models
    (they have fc) cost `int8_model_ms`, 1.0 with their first two layers float, 2.0 all float."""
    def measure(graph, inputs, budget_s):
        if graph.has_node("fc") and graph.has_node("c1"):
            integer = [isinstance(graph.node(n).inputs[1], ir.Node) for n in ("c1", "c2", "fc")]
            ms = 2.0 if not any(integer) else 1.0 if not any(integer[:2]) else int8_model_ms if all(integer) else 1.4
            return [ms * inp[0].shape[0] for inp in inputs]
        cost = 0.0
        for n in graph:
            if n.op in ("conv2d", "linear"):
                integer = isinstance(n.inputs[1], ir.Node) and n.inputs[1].op == "dequantize"
                cost += alone.get(n.name, 0.5) if integer else 1.0
        return [cost * inp[0].shape[0] for inp in inputs]
    return measure


def test_speed_guard_keeps_a_float_prefix_when_the_first_layers_together_are_clearly_faster_float():
    """c1 and c2 alone are not slower in int8 beyond the margin (1.02x: no 'slower' layer), but they are not
    faster either; kept float together (the model reads its float input into float layers, one quantize before
    fc) the model is clearly faster: the guard keeps that float prefix and says so."""
    m, g, x = _setup()
    res = create_pass("quantize", {}).run(g, _ctx(x, _prefix_runtime({"c1": 1.02, "c2": 1.02}, 1.5)))
    out = res.graph_after(g)
    guard = res.stats["speed_guard"]
    assert guard["slower_layers"] == {} and guard["float_prefix"] == ["c1", "c2"]
    assert guard["prefix_ratio"] == {"c1": 1.02, "c2": 1.02, "fc": 0.5}
    # every prefix length was a candidate, timed with the whole models; the longer one won
    assert guard["model_ratio"]["int8, float prefix of 1"] == {"b1": 0.7, "b32": 0.7}
    assert guard["chosen"] == "int8, float prefix of 2" and list(guard["kept_float"]) == ["c1", "c2"]
    assert "float prefix: int8 kernel alone 1.02x the bare float layer" in guard["kept_float"]["c1"]
    assert guard["decisions"] == {"model": "int8", "kept_float": ["c1", "c2"], "batches": [1, 32]}
    assert guard["prefix_vs_int8"]["int8, float prefix of 2"]["verdict"] == "faster"
    assert isinstance(out.node("c1").inputs[1], ir.Param) and isinstance(out.node("c2").inputs[1], ir.Param)
    assert out.node("fc").inputs[1].op == "dequantize"
    assert any("kept 2 layer(s) float as a float prefix" in n for n in res.stats["notes"])
    # the prefix ends at the first layer whose int8 kernel is faster alone; a prefix no faster stays int8
    m, g, x = _setup()
    res = create_pass("quantize", {}).run(g, _ctx(x, _prefix_runtime({"c1": 1.02}, 1.02)))
    guard = res.stats["speed_guard"]
    assert guard["float_prefix"] == ["c1"] and guard["chosen"] == "int8" and guard["kept_float"] == {}
    assert "not clearly faster" in guard["note"] and res.graph_after(g).node("c1").inputs[1].op == "dequantize"


def test_speed_guard_keeps_the_whole_model_float_when_int8_still_loses():
    m, g, x = _setup()
    res = create_pass("quantize", {}).run(g, _ctx(x, fake_runtime(int8_factor=1.2)))
    out = res.graph_after(g)
    assert out is not g and not out.find("quantize") and not out.find("batch_norm")  # folded, float
    assert res.stats["speed_guard"]["kept_model_float"] is True and res.stats["quantized_ops"] == 0
    assert any("kept the whole model float" in n and "1.20x" in n for n in res.stats["notes"])
    assert torch.allclose(ir.lower(out)(x), m(x), atol=1e-5)


@pytest.mark.parametrize("scheme", ["sign", "fixed-point"])
def test_storage_schemes_keep_their_weights_and_compute_in_float_when_int8_loses(scheme):
    m, g, x = _setup()
    res = create_pass("quantize", {"scheme": scheme}).run(g, _ctx(x, fake_runtime(int8_factor=1.3)))
    out = res.graph_after(g)
    guard = res.stats["speed_guard"]
    assert guard["chosen"] == "weight-only" and guard["decisions"]["model"] == "float"
    assert guard["model_ratio"]["int8"]["b1"] == pytest.approx(1.3) and guard["model_ratio"]["weight-only"]["b1"] == 1
    # the stored weights are the scheme's integers, no activation is quantized any more
    assert not out.find("quantize") and res.stats["quantized_ops"] > 0 and res.stats["weight_only"] is True
    weights = [n.inputs[1] for n in out if n.op in ("conv2d", "linear")]
    assert all(w.op == "dequantize" and out.params[w.inputs[0].name].dtype == torch.int8 for w in weights)
    if scheme == "sign":  # the middle layer's weights are still +-1 (first and last int8)
        assert set(out.params[weights[1].inputs[0].name].unique().tolist()) <= {-1, 1}
    assert any("computes them in float" in n and "1.30x" in n for n in res.stats["notes"])
    # where int8 wins, the model stays as quantized
    m, g, x = _setup()
    res = create_pass("quantize", {"scheme": scheme}).run(g, _ctx(x, fake_runtime(int8_factor=0.5)))
    assert res.stats["speed_guard"]["chosen"] == "int8" and res.graph_after(g).find("quantize")


@pytest.mark.parametrize("b1_factor, chosen, kept", [(1.08, "weight-only", []), (1.03, "int8, float prefix of 1", ["c1"]),
                                                      (1.01, "int8", [])])
def test_storage_schemes_never_keep_int8_slower_than_float_at_one_batch_size(b1_factor, chosen, kept, tmp_path):
    """int8-static keeps a model faster overall that is within 10% at one batch size (falling back loses its
    format); a storage scheme keeps its weights in every form, so integer kernels more than STORAGE_TIE (2%)
    slower at batch 1 are not kept: the first layers computed in float (a float prefix) when that brings batch
    1 within the tie and is faster than the rest, else all of them (weight-only). Each integer layer costs
    b1_factor of its float time at batch 1 and 0.6 at batch 32: with 3 layers a prefix of 1 runs
    (1 + 2 * b1_factor) / 3 at batch 1."""
    def measure(graph, inputs, budget_s):
        base = fake_runtime(int8_factor=1.0)(graph, inputs, budget_s)
        ints = fake_runtime(int8_factor=2.0)(graph, inputs, budget_s)
        out = []
        for inp, b, i in zip(inputs, base, ints):
            n_int = i - b  # the integer layers' count times the batch size
            out.append(b + n_int * ((b1_factor if inp[0].shape[0] == 1 else 0.6) - 1))
        return out

    m, g, x = _setup()
    res = create_pass("quantize", {"scheme": "fixed-point"}).run(g, _ctx(x, measure))
    out, guard = res.graph_after(g), res.stats["speed_guard"]
    assert guard["chosen"] == chosen and guard["model_ratio"]["int8"]["b1"] == pytest.approx(b1_factor)
    assert guard["model_ratio"]["int8"]["b32"] == pytest.approx(0.6)
    assert list(guard["kept_float"]) == kept and guard["decisions"]["kept_float"] == kept
    assert guard["decisions"]["model"] == ("float" if chosen == "weight-only" else "int8")
    # every form stores the scheme's integer weights; the prefix's layers read float activations
    assert all(n.inputs[1].op == "dequantize" for n in out if n.op in ("conv2d", "linear"))
    integer_input = {n.name: through_noops(n.inputs[0]).op == "dequantize" for n in out if n.op in ("conv2d", "linear")}
    assert integer_input == {"c1": chosen == "int8", "c2": chosen != "weight-only", "fc": chosen != "weight-only"}
    # replaying the recorded decisions rebuilds the same form without timing
    m2, g2, _ = _setup()
    res2 = create_pass("quantize", {"scheme": "fixed-point", "speed_guard": _report_with(tmp_path, guard["decisions"])}).run(
        g2, _ctx(x))
    assert res2.stats["speed_guard"]["chosen"] == chosen
    assert torch.equal(ir.lower(res2.graph_after(g2))(x), ir.lower(out)(x))


@pytest.mark.parametrize("ratios, chosen", [
    ({"int8": (1.04, 0.84), "p1": (1.00, 0.75), "p2": (1.21, 1.44)}, "p1"),  # digits_cnn fixed-point8, measured
    ({"int8": (1.01, 0.84), "p1": (1.00, 0.90)}, "int8"),  # both within the tie: the faster overall
    ({"int8": (1.03, 0.70), "p1": (1.025, 0.75)}, "weight-only"),  # none within 2% at batch 1
    ({"int8": (0.90, 1.03)}, "weight-only"),  # slower at batch 32 counts too
    ({"int8": (0.5, 1.02)}, "int8"),
])
def test_storage_choice_keeps_the_fastest_integer_form_not_slower_than_float_at_any_batch_size(ratios, chosen):
    verdicts = {k: decide([[a, b]] * 3, [[1.0, 1.0]] * 3, [1, 32]) for k, (a, b) in ratios.items()}
    assert storage_choice(verdicts) == chosen


def test_speed_guard_is_skipped_and_says_so_without_a_runtime_or_off():
    m, g, x = _setup()
    res = create_pass("quantize", {}).run(g, _ctx(x))
    assert res.stats["speed_guard"].startswith("skipped: no runtime")
    assert "--no-bench on the command line, bench_seconds=0 in slimfx.compile" in res.stats["speed_guard"]
    measure = fake_runtime(slow={"c1"})
    m, g, x = _setup()
    res = create_pass("quantize", {"speed_guard": False}).run(g, _ctx(x, measure))
    assert not measure.seen and "speed_guard" not in res.stats


@pytest.mark.parametrize("batches", [[], [0, 1]])
def test_speed_guard_batches_must_be_batch_sizes(batches):
    with pytest.raises(slimfx.errors.PassError, match="speed_guard_batches.*e.g. \\[1, 32\\]"):
        create_pass("quantize", {"speed_guard_batches": batches})
    with pytest.raises(RecipeError, match="speed_guard_batches"):
        slimfx.Recipe("r", passes=[("quantize", {"speed_guard_batches": batches})])


def test_compile_runs_the_guard_on_onnxruntime_and_reports_what_it_kept_float():
    m, g, x = _setup()
    recipe = slimfx.Recipe("q", passes=[("quantize", {"speed_guard_seconds": 0.2})])
    result = slimfx.compile(m, (x,), recipe, calibration_data=[(torch.randn(8, 3, 8, 8),)], bench_seconds=0.05,
                            quiet=True, formats="onnx")
    stats = result.report["passes"][0]["stats"]
    guard = stats["speed_guard"]
    assert isinstance(guard, dict) and set(guard["layer_ratio"]) == {"c1", "c2", "fc"}
    # timed for real: which model wins depends on the machine; the report says which and why
    assert guard["chosen"] in guard["model_ratio"] and set(guard["model_ratio"]["float"]) == {"b1", "b32"}
    for name, why in guard["slower_layers"].items():
        assert guard["layer_ratio"][name] > 1 + guard["layer_spread"][name] >= 1.05 and "(batch 1:" in why
    assert any("ran fold-batchnorm first" in h for h in result.report["headline"])


# --- the decision rule and its modes (issue #17 item 6: decisions that do not flip on noise) -----------------


FLOAT_MS = [[1.0, 10.0], [1.1, 10.5], [1.02, 10.2], [1.5, 14.0], [1.01, 10.1]]  # best 1.0 / 10.0, second +1%


@pytest.mark.parametrize("int8_ms, verdict, slower_at", [
    ([[1.3, 12.0], [1.31, 12.1], [2.0, 20.0], [1.35, 12.5], [1.32, 12.2]], "slower", (1, 32)),
    ([[0.6, 7.0], [0.61, 7.1], [0.9, 7.5], [0.62, 7.05], [0.7, 9.0]], "faster", ()),
    ([[1.03, 10.1], [1.04, 10.2], [1.5, 15.0], [1.05, 10.3], [1.06, 10.4]], "tie", ()),  # within the 5% margin
    # noisy int8 timings (its second best 20% above its best): 1.15x is within the noise, a tie
    ([[1.15, 11.5], [1.38, 13.8], [1.5, 15.0], [1.6, 16.0], [1.4, 14.0]], "tie", ()),
    ([[1.25, 8.0], [1.26, 8.1], [1.3, 8.2], [1.27, 8.3], [1.28, 8.4]], "tie", (1,)),  # even overall, slow at batch 1
])
def test_decide_calls_a_difference_only_beyond_the_noise(int8_ms, verdict, slower_at):
    """Best of the rounds against best of the rounds; a spoiled round (the third) changes nothing."""
    v = decide(int8_ms, FLOAT_MS, [1, 32])
    assert v.verdict == verdict and v.slower_at == slower_at
    assert v.per_batch[0] == pytest.approx(min(r[0] for r in int8_ms) / 1.0)


def noisy_runtime(int8_factor: float, seed: int, jitter: float = 0.03, spoiled: float = 0.2):
    """fake_runtime on a busy machine: every timing off by up to +-`jitter`, and a `spoiled` share of them
    1.3-2.5x too slow (a neighbour took the core; interference only adds time)."""
    import random

    rng = random.Random(seed)
    base = fake_runtime(int8_factor=int8_factor)

    def measure(graph, inputs, budget_s):
        return [t * rng.uniform(1 - jitter, 1 + jitter) * (rng.uniform(1.3, 2.5) if rng.random() < spoiled else 1)
                for t in base(graph, inputs, budget_s)]
    return measure


@pytest.mark.parametrize("int8_factor, expected", [(1.02, "int8"), (0.6, "int8"), (1.3, "float")])
def test_whole_model_decision_does_not_flip_on_timing_noise(int8_factor, expected):
    """Twenty runs on a noisy runtime (jitter, and one timing in five spoiled): one decision. A model 1.02x of
    fp32 is a tie (kept int8), one 1.3x is clearly slower (kept float)."""
    chosen = set()
    for seed in range(20):
        m, g, x = _setup()
        res = create_pass("quantize", {}).run(g, _ctx(x, noisy_runtime(int8_factor, seed)))
        chosen.add(res.stats["speed_guard"]["decisions"]["model"])
    assert chosen == {expected}


def test_the_report_gives_the_measured_numbers_and_the_rule():
    m, g, x = _setup()
    res = create_pass("quantize", {"speed_guard_rounds": 4}).run(g, _ctx(x, fake_runtime(int8_factor=1.2)))
    guard = res.stats["speed_guard"]
    assert guard["rounds"] == 4 and f"at least {MARGIN:.0%}" in guard["rule"]
    assert guard["model_verdict"]["int8"]["verdict"] == "slower" and guard["model_verdict"]["int8"]["b1"] == 1.2
    assert len(guard["model_ms"]["float"]) == 4  # every round's milliseconds, per batch size
    assert guard["decisions"] == {"model": "float", "kept_float": [], "batches": [1, 32]}


def _report_with(tmp_path, decisions):
    f = tmp_path / "report.json"
    import json

    f.write_text(json.dumps({"passes": [{"name": "fold-batchnorm", "stats": {}},
                                        {"name": "quantize", "stats": {"speed_guard": {"decisions": decisions}}}]}))
    return str(f)


def test_recorded_decisions_replay_without_timing(tmp_path):
    m, g, x = _setup()
    measured = create_pass("quantize", {}).run(g, _ctx(x, fake_runtime(slow={"c1"})))
    decisions = measured.stats["speed_guard"]["decisions"]
    assert decisions["kept_float"] == ["c1"] and decisions["model"] == "int8"
    path = _report_with(tmp_path, decisions)

    def no_timing(*a):
        raise AssertionError("a replayed guard must not time anything")

    m, g2, x = _setup()
    res = create_pass("quantize", {"speed_guard": path}).run(g2, _ctx(x, no_timing))
    out = res.graph_after(g2)
    assert ir.graph_diff(out, measured.graph_after(g)) is None
    assert res.stats["speed_guard"]["mode"] == f"replay {path}" and list(res.stats["speed_guard"]["kept_float"]) == ["c1"]
    # without a runtime at all (the API without latency), replaying still works
    m, g3, x = _setup()
    res = create_pass("quantize", {"speed_guard": path}).run(g3, _ctx(x))
    assert isinstance(res.graph_after(g3).node("c1").inputs[1], ir.Param)
    # a bare decisions file keeping the whole model float
    f = tmp_path / "float.json"
    f.write_text('{"model": "float", "kept_float": []}')
    m, g4, x = _setup()
    res = create_pass("quantize", {"speed_guard": str(f)}).run(g4, _ctx(x))
    assert not res.graph_after(g4).find("quantize") and res.stats["quantized_ops"] == 0


def test_off_and_measure_spell_false_and_true():
    m, g, x = _setup()
    measure = fake_runtime()
    res = create_pass("quantize", {"speed_guard": "off"}).run(g, _ctx(x, measure))
    assert not measure.seen and "speed_guard" not in res.stats
    m, g, x = _setup()
    res = create_pass("quantize", {"speed_guard": "measure"}).run(g, _ctx(x, measure))
    assert measure.seen and res.stats["speed_guard"]["mode"] == "measure"


@pytest.mark.parametrize("content, words", [
    (None, ["no decisions file", "speed_guard = \"measure\""]),
    ("{not json", ["not readable JSON"]),
    ('{"passes": [{"name": "quantize", "stats": {"speed_guard": "skipped: no runtime"}}]}', ["holds no speed-guard"]),
    ('{"model": "fast"}', ["is not a decisions file"]),
])
def test_bad_decisions_files_are_recipe_errors_before_any_work(tmp_path, content, words):
    f = tmp_path / "d.json"
    if content is not None:
        f.write_text(content)
    with pytest.raises(RecipeError) as e:
        slimfx.Recipe("r", passes=[("quantize", {"speed_guard": str(f)})])
    for w in words:
        assert w in str(e.value) and str(f) in str(e.value), str(e.value)


def test_decisions_for_another_model_are_caught_by_check_graph(tmp_path):
    m, g, x = _setup()
    q = create_pass("quantize", {"speed_guard": _report_with(tmp_path, {"model": "int8", "kept_float": ["conv9"]})})
    assert "keeps float conv9, which this model does not have" in q.check_graph(g)


@pytest.mark.parametrize("int8_factor, expected", [(1.3, "float"), (0.5, "int8")])
def test_int8_dynamic_is_weighed_as_a_whole_model(int8_factor, expected):
    m, g, x = _setup()
    measure = fake_runtime(int8_factor=int8_factor)
    res = create_pass("quantize", {"scheme": "int8-dynamic"}).run(g, _ctx(x, measure))
    guard = res.stats["speed_guard"]
    assert guard["decisions"]["model"] == expected and guard["layer_ratio"] == {}
    assert all(gr.has_node("fc") for gr in measure.seen)  # only whole models were timed
    assert bool(res.graph_after(g).find("dequantize")) == (expected == "int8")


def test_against_the_original_keeps_int8_that_beats_the_original_but_not_the_pruned_float():
    m, g, x = _setup()
    original = g.copy()  # stands for the unpruned model: three times the float cost
    base = fake_runtime(int8_factor=1.3)

    def measure(graph, inputs, budget_s):
        return [3 * t for t in base(graph, inputs, budget_s)] if graph is original else base(graph, inputs, budget_s)

    ctx = _ctx(x, measure)
    ctx.teacher = original
    res = create_pass("quantize", {"speed_guard_against": "original"}).run(g, ctx)
    guard = res.stats["speed_guard"]
    assert guard["against"] == "original" and guard["decisions"]["model"] == "int8"
    assert guard["model_verdict"]["int8"]["verdict"] == "slower"  # than the float graph quantize started from
    assert guard["original_verdict"]["int8"]["verdict"] == "faster"  # but not than the original
    m, g, x = _setup()
    res = create_pass("quantize", {}).run(g, _ctx(x, base))
    assert res.stats["speed_guard"]["decisions"]["model"] == "float"


def test_against_the_original_a_variant_with_layers_float_that_is_slower_than_the_float_graph_gives_way_to_it():
    """The mlp `default` case: pruned, then quantized with the original as the bar. Keeping the slow layer c1
    float clears the original's bar (the pruned model is much faster than the original) but is still slower
    than the pruned float graph quantize started from: the float graph wins, not the half-float model.
    Layers cost as in fake_runtime (c1 3x in int8, the others 0.9x); each activation quantize costs 0.8 in a
    whole model (layer by layer the guard sees only the kernels)."""
    m, g, x = _setup()
    original = g.copy()
    base = fake_runtime(slow={"c1"}, int8_factor=0.9)

    def measure(graph, inputs, budget_s):
        times = base(graph, inputs, budget_s)
        if graph is original:
            return [2.0 * t for t in times]
        if graph.has_node("fc") and graph.has_node("c1"):  # a whole model
            overhead = 0.8 * sum(1 for n in graph if n.op == "quantize" and not isinstance(n.inputs[0], ir.Param))
            times = [t + overhead * inp[0].shape[0] for t, inp in zip(times, inputs)]
        return times

    ctx = _ctx(x, measure)
    ctx.teacher = original
    res = create_pass("quantize", {"speed_guard_against": "original"}).run(g, ctx)
    guard = res.stats["speed_guard"]
    fewer = "int8, slower layers float"
    assert guard["original_verdict"]["int8"]["verdict"] == "slower"
    assert guard["original_verdict"][fewer]["verdict"] != "slower"  # it clears the original's bar
    assert guard["model_verdict"][fewer]["verdict"] == "slower"  # but not the float graph's
    assert guard["decisions"]["model"] == "float" and not res.graph_after(g).find("quantize")
