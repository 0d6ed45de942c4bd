"""The gate fails closed (NaN, any output, any threshold) and --out is all or nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import slimfx
from slimfx.driver import strict_json
from slimfx.errors import GateError, SlimfxError
from slimfx.passes import Pass, PassResult, register_pass
from slimfx.recipe import Recipe
from tests.slimfx.fixtures.user_models import small

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "user_models.py"


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 16)
        self.head_a = nn.Linear(16, 4)
        self.head_b = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.head_a(h), {"aux": self.head_b(h)}


@register_pass("test-scale-param")
@dataclass
class ScaleParam(Pass):
    """Multiplies one param by a factor (NaN allowed): a stand-in for a broken lossy pass."""

    preserves_outputs = False
    param: str = ""
    factor: float = 0.0

    def run(self, graph, ctx) -> PassResult:
        graph.params[self.param] = graph.params[self.param] * self.factor
        return PassResult(True, {"scaled": self.param})


def _recipe(passes: list[dict], validate: dict | None = None) -> Recipe:
    return Recipe.from_dict({"passes": passes, "validate": validate or {}, "export": {"formats": ["onnx"]}},
                            name="test")


def _two_heads():
    torch.manual_seed(0)
    return TwoHeads().eval(), (torch.randn(4, 6),)


def test_nan_in_the_compiled_output_fails_whatever_the_thresholds(tmp_path):
    model, example = _two_heads()
    recipe = _recipe([{"name": "test-scale-param", "param": "head_b.weight", "factor": float("nan")}])
    with pytest.raises(GateError, match=r"cannot be trusted.*output\[1\]\['aux'\] has \d+ NaN/Inf"):
        slimfx.compile(model, example, recipe, out_dir=tmp_path / "out", bench_seconds=0, quiet=True)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_every_output_is_compared_and_the_worst_one_fails_the_gate(tmp_path):
    model, example = _two_heads()
    broken = _recipe([{"name": "test-scale-param", "param": "head_b.weight", "factor": 0.0}], {"min_sqnr_db": 20})
    with pytest.raises(GateError, match=r"min_sqnr_db: output SQNR .* \(output\[1\]\['aux'\]\) on the generated data") as e:
        slimfx.compile(model, example, broken, out_dir=tmp_path / "out", bench_seconds=0, quiet=True)
    assert e.value.report["gate"]["passed"] is False and e.value.report["validation"]["sqnr_db"] < 20  # the numbers
    fine = _recipe([{"name": "test-scale-param", "param": "head_b.weight", "factor": 1.0}], {"min_sqnr_db": 100})
    result = slimfx.compile(model, example, fine, out_dir=tmp_path / "ok", bench_seconds=0, quiet=True)
    names = [o["name"] for o in result.report["validation"]["outputs"]]
    assert names == ["output[0]", "output[1]['aux']"] and result.report["gate"]["passed"]


def test_numbers_come_from_256_generated_inputs_without_data_and_the_headline_says_so(tmp_path):
    model, example = small()
    result = slimfx.compile(model, example, "cleanup", out_dir=tmp_path / "o", bench_seconds=0, quiet=True)
    assert result.report["validation"]["split"] == "generated" and result.report["validation"]["samples"] >= 256
    assert any("generated inputs" in h for h in result.report["headline"])
    text = (tmp_path / "o" / "report.md").read_text()
    assert "generated inputs" in text and "gate: passed" in text


def test_a_heavy_model_is_checked_on_fewer_generated_inputs_within_the_budget_and_the_report_says_so(
        tmp_path, monkeypatch):
    import slimfx.data as data
    import slimfx.driver as driver

    model, example = small()
    macs = slimfx.compile(model, example, "cleanup", bench_seconds=0, quiet=True).report["baseline"]["macs"]
    budget = macs * 100  # the report counts MACs per input: 100 inputs' worth, 96 of them
    monkeypatch.setattr(data, "GENERATED_MACS_BUDGET", budget)
    monkeypatch.setattr(driver, "GENERATED_MACS_BUDGET", budget)
    result = slimfx.compile(model, example, "cleanup", out_dir=tmp_path / "o", bench_seconds=0, quiet=True)
    assert result.report["validation"]["samples"] == 96
    assert any("96 generated inputs (256 for a model under" in h for h in result.report["headline"])


def test_generated_sample_count_keeps_256_for_light_models_and_bounds_heavy_ones():
    from slimfx.data import GENERATED_MACS_BUDGET, generated_sample_count

    assert generated_sample_count(None) == 256 and generated_sample_count(10**6) == 256
    assert generated_sample_count(int(1.82e9)) == 128  # a 224x224 ResNet-18
    assert generated_sample_count(int(GENERATED_MACS_BUDGET)) == 64  # never fewer than the minimum


def test_labelled_validation_data_is_the_gate_split_and_test_gives_the_accuracy(tmp_path):
    model, example = small()
    x_val, x_test = torch.randn(40, 3, 8, 8), torch.randn(30, 3, 8, 8)
    with torch.no_grad():
        y_val, y_test = model(x_val).argmax(1), model(x_test).argmax(1)
    y_test[:3] = (y_test[:3] + 1) % 5  # 27/30 right
    data = slimfx.Data(validation=(x_val, y_val), test=(x_test, y_test))
    result = slimfx.compile(model, example, "cleanup", data=data, out_dir=tmp_path / "o", bench_seconds=0,
                            quiet=True)
    r = result.report
    assert r["validation"]["split"] == "validation" and r["validation"]["samples"] == 40
    assert r["validation"]["accuracy_original"] == 1.0 and r["data"]["accuracy_split"] == "test"
    assert r["baseline"]["accuracy"] == pytest.approx(0.9) and r["compressed"]["accuracy"] == pytest.approx(0.9)


def test_a_failed_gate_after_recovery_with_the_users_data_advises_what_is_left(tmp_path):
    """With train and validation data given, 'give training and validation data' was the advice still."""
    model, example = _two_heads()
    x = torch.randn(64, 6)
    with torch.no_grad():
        y = model(x)[0].argmax(1)
    broken = _recipe([{"name": "test-scale-param", "param": "head_a.weight", "factor": -1.0}],
                     {"min_top1_agreement": 0.9})
    with pytest.raises(GateError, match="on the validation data") as e:
        slimfx.compile(model, example, broken, data=slimfx.Data(train=(x[:32], y[:32]), validation=(x[32:], y[32:])),
                       bench_seconds=0, quiet=True)
    assert "give training and validation data" not in str(e.value)
    assert "add a finetune step" in str(e.value) and "--keep-rejected" in str(e.value)  # its recipe has none
    # a recipe that trains: the advice names its own epochs options, with their values
    model, example = small()
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    trains = _recipe([{"name": "test-scale-param", "param": "fc.bias", "factor": -5.0},
                      {"name": "finetune", "epochs": 1, "lr": 1e-6}], {"min_top1_agreement": 0.9})
    with pytest.raises(GateError) as e:
        slimfx.compile(model, example, trains, data=slimfx.Data(train=(x[:32], y[:32]), validation=(x[32:], y[32:])),
                       bench_seconds=0, quiet=True)
    assert "give the recovery steps more epochs (finetune's `epochs` (now 1))" in str(e.value), str(e.value)


def test_max_accuracy_drop_without_labels_fails_closed(tmp_path):
    model, example = small()
    recipe = _recipe([{"name": "fold-batchnorm"}], {"max_accuracy_drop": 0.01})
    with pytest.raises(GateError, match="max_accuracy_drop: needs labelled validation data"):
        slimfx.compile(model, example, recipe, out_dir=tmp_path / "out", bench_seconds=0, quiet=True)
    assert not (tmp_path / "out").exists()


def test_a_failed_gate_with_keep_rejected_writes_only_the_rejected_folder(tmp_path):
    model, example = _two_heads()
    broken = _recipe([{"name": "test-scale-param", "param": "head_a.weight", "factor": -1.0}],
                     {"min_top1_agreement": 0.9})
    with pytest.raises(GateError, match="rejected files are in .*out.rejected") as e:
        slimfx.compile(model, example, broken, out_dir=tmp_path / "out", keep_rejected=True, bench_seconds=0,
                       quiet=True)
    assert "min_top1_agreement" in str(e.value) and "generated data" in str(e.value)
    assert "give training and validation data" in str(e.value)  # none was given: recovery could not run
    assert not (tmp_path / "out").exists()
    kept = json.loads((tmp_path / "out.rejected" / "report.json").read_text())
    assert kept["gate"]["passed"] is False and (tmp_path / "out.rejected" / "model.onnx").exists()


def test_an_existing_out_is_refused_before_any_work_and_replaced_whole_with_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    model, example = small()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(SlimfxError, match="already exists and is not empty.*force"):
        slimfx.compile(model, example, "cleanup", out_dir=out, bench_seconds=0, quiet=True)
    assert not calls and (out / "stale.txt").exists()
    slimfx.compile(model, example, "cleanup", out_dir=out, force=True, bench_seconds=0, quiet=True)
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.pt", "report.json", "report.md"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no stage or old copy left beside it


def _a_file(d: Path) -> Path:
    (d / "f").write_text("x")
    return d / "f"


@pytest.mark.parametrize("make_out, words", [
    (_a_file, "exists and is not a directory"),
    (lambda d: 3, "must be a path"),
    (lambda d: "", "is empty"),
    (lambda d: Path("."), "working directory"),
])
def test_impossible_outs_are_refused(tmp_path, monkeypatch, make_out, words):
    monkeypatch.chdir(tmp_path)
    model, example = small()
    with pytest.raises(SlimfxError, match=words):
        slimfx.compile(model, example, "cleanup", out_dir=make_out(tmp_path), force=True, quiet=True)


def test_outputs_honour_the_umask(tmp_path):
    model, example = small()
    old = os.umask(0o027)
    try:
        slimfx.compile(model, example, "cleanup", out_dir=tmp_path / "o", bench_seconds=0, quiet=True)
    finally:
        os.umask(old)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "o" / "report.json").stat().st_mode & 0o777 == 0o640


def test_report_json_is_strict():
    assert strict_json({"a": float("inf"), "b": [float("nan"), 1.5], "c": torch.tensor(2.0)}) == \
        {"a": None, "b": [None, 1.5], "c": 2.0}


def test_sigterm_mid_compile_leaves_nothing_and_exits_143(tmp_path):
    """A pass that blocks (a plugin that marks its start and sleeps) makes the signal land mid-compile on any
    machine: polling for the stage raced with a compile that finished first on a loaded one."""
    work = tmp_path / "work"
    work.mkdir()
    started = tmp_path / "started"
    (tmp_path / "slow.py").write_text(
        "import pathlib, time\n"
        "from slimfx.passes import Pass, PassResult, register_pass\n\n\n"
        "@register_pass('test-block')\n"
        "class Block(Pass):\n"
        "    def run(self, graph, ctx):\n"
        f"        pathlib.Path({str(started)!r}).touch()\n"
        "        time.sleep(120)\n"
        "        return PassResult(changed=False)\n")
    recipe = tmp_path / "slow.toml"
    recipe.write_text('plugins = ["slow.py"]\n\n[[passes]]\nname = "test-block"\n')
    proc = subprocess.Popen([sys.executable, "-m", "slimfx", "compile", f"{FIXTURES}:small", "--recipe",
                             str(recipe), "--out", str(work / "out")], cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not started.exists() and proc.poll() is None:
        time.sleep(0.01)
    assert started.exists(), f"the pass never ran: {proc.communicate()}"
    assert list(work.glob(".out.slimfx-*")), "the outputs were not staged while the passes ran"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert list(work.iterdir()) == []


def test_an_fp16_model_compiles_with_cleanup_and_its_gate_is_held_to_fp16_precision(tmp_path):
    model, example = small()
    model, example = model.half(), (example[0].half(),)
    result = slimfx.compile(model, example, "cleanup", out_dir=tmp_path / "o", bench_seconds=0, quiet=True)
    assert result.report["gate"]["passed"] and 50 < result.report["validation"]["sqnr_db"] < 80
    strict = _recipe([{"name": "fold-batchnorm"}], {"min_sqnr_db": 200})  # capped at fp16's 60 dB, still checked
    broken = _recipe([{"name": "test-scale-param", "param": "fc.weight", "factor": 0.5}], {"min_sqnr_db": 200})
    slimfx.compile(model, example, strict, bench_seconds=0, quiet=True)
    with pytest.raises(GateError, match=r"requires 60 dB \(200 capped at what torch.float16 allows\)"):
        slimfx.compile(model, example, broken, bench_seconds=0, quiet=True)


def test_quantizing_an_fp16_model_is_refused_before_any_work(tmp_path):
    model, example = small()
    with pytest.raises(slimfx.RecipeError, match=r"passes\[1\].*quantize starts from a float32 model.*float16.*\.float\(\)"):
        slimfx.compile(model.half(), (example[0].half(),), "int8", out_dir=tmp_path / "o", quiet=True)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("low", [-2.0, 0.5])  # signed, and one-signed (clipped to the example's range)
def test_generated_gate_inputs_are_the_documented_draws(low):
    """The gate's generated samples are fixed by the seed: float64 normal draws scaled to the example's mean and
    spread (one-signed examples clipped to their range), cast to its dtype; a faster implementation must draw
    exactly these."""
    from slimfx.data import generated_batches

    x = torch.linspace(low, 3.0, 2 * 3 * 5).reshape(2, 3, 5)
    batches = generated_batches((x,), samples=70, seed=7)
    assert [len(b[0][0]) for b in batches] == [32, 32, 6] and all(b[1] is None for b in batches)
    gen = torch.Generator().manual_seed(7)
    xd = x.double()
    for (got,), _ in batches:
        want = torch.randn((len(got), 3, 5), generator=gen, dtype=torch.float64) * float(xd.std()) + float(xd.mean())
        if low >= 0:
            want = want.clamp(float(xd.min()), float(xd.max()))
        assert got.dtype == torch.float32 and torch.equal(got, want.to(torch.float32))


def test_an_output_that_is_nan_everywhere_in_the_original_fails_closed(tmp_path):
    """NaN agrees with NaN, so an output the original gives only as NaN had passed with nothing compared."""
    class HalfBroken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            y = self.fc(x)
            return y, y * float("nan")

    with pytest.raises(GateError, match=r"output\[1\] is NaN/Inf in every position in the original model"):
        slimfx.compile(HalfBroken().eval(), (torch.randn(2, 4),), recipe="cleanup", out_dir=tmp_path / "out",
                       quiet=True, bench_seconds=0)
    assert not (tmp_path / "out").exists()


def test_the_advice_of_a_failed_gate_names_only_knobs_the_recipe_has(tmp_path):
    # sparse50 (prune-weights, no finetune) was told to give "the recipe's finetune / distill epochs" more and
    # to lower "target_macs" (an option prune-weights refuses), and a run with --keep-rejected to use it.
    model, example = _two_heads()
    x = torch.randn(64, 6)
    with torch.no_grad():
        y = model(x)[0].argmax(1)
    data = slimfx.Data(train=(x[:32], y[:32]), validation=(x[32:], y[32:]))
    sparse = _recipe([{"name": "prune-weights", "sparsity": 0.95, "scope": "layer"}, {"name": "materialize-masks"}],
                     {"min_top1_agreement": 0.99})
    with pytest.raises(GateError) as e:
        slimfx.compile(model, example, sparse, data=data, out_dir=tmp_path / "o", keep_rejected=True,
                       bench_seconds=0, quiet=True)
    advice = str(e.value).splitlines()[-1]
    assert "add a finetune step" in advice and "prune-weights `sparsity`" in advice, advice
    assert "target_macs" not in advice and "distill" not in advice and "--keep-rejected" not in advice
    model, example = small()
    x = torch.randn(64, *example[0].shape[1:])
    with torch.no_grad():
        y = model(x).argmax(1)
    pruned = _recipe([{"name": "prune-channels", "sparsity": 0.9}, {"name": "finetune", "epochs": 1}],
                     {"min_sqnr_db": 60})
    with pytest.raises(GateError) as e:
        slimfx.compile(model, example, pruned, data=slimfx.Data(train=(x[:32], y[:32]), validation=(x[32:], y[32:])),
                       bench_seconds=0, quiet=True)
    advice = str(e.value).splitlines()[-1]
    assert "(finetune's `epochs` (now 1))" in advice and "prune-channels `sparsity` or `target_macs`" in advice, advice
    assert "quantize" not in advice and "--keep-rejected" in advice
    # quantizing without QAT: a finetune step after quantize could not train its integer weights; QAT can
    int8 = _recipe([{"name": "test-scale-param", "param": "fc.bias", "factor": -5.0},
                    {"name": "quantize", "scheme": "int8-static", "speed_guard": False}], {"min_top1_agreement": 0.9})
    with pytest.raises(GateError) as e:
        slimfx.compile(model, example, int8, data=slimfx.Data(train=(x[:32], y[:32]), validation=(x[32:], y[32:])),
                       bench_seconds=0, quiet=True)
    advice = str(e.value).splitlines()[-1]
    assert "set quantize's `qat_epochs`" in advice and "finetune" not in advice, advice


def test_a_recipes_data_file_is_found_beside_the_recipe_like_its_plugins(tmp_path, monkeypatch):
    """`data = "data.py:make_data"` resolved against the working directory (plugins against the recipe's
    folder), and slimfx.compile() ignored the key: the CLI from another folder and the API both use it now."""
    from slimfx.cli import main

    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "data.py").write_text(
        "import torch, slimfx\n"
        f"import sys; sys.path.insert(0, {str(FIXTURES.parent)!r})\n"
        "from user_models import small\n\n\n"
        "def make_data():\n"
        "    model, _ = small()\n"
        "    x = torch.randn(48, 3, 8, 8, generator=torch.Generator().manual_seed(1))\n"
        "    with torch.no_grad():\n"
        "        y = model(x).argmax(1)\n"
        "    return slimfx.Data(validation=(x[:32], y[:32]), test=(x[32:], y[32:]))\n")
    (cfg / "r.toml").write_text('data = "data.py:make_data"\n\n[[passes]]\nname = "fold-batchnorm"\n')
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["compile", f"{FIXTURES}:small", "--recipe", "../cfg/r.toml", "--out", "o", "--no-bench",
                 "--quiet"]) == 0
    report = json.loads((work / "o" / "report.json").read_text())
    assert report["validation"]["split"] == "validation" and report["validation"]["samples"] == 32
    assert report["data"]["accuracy_split"] == "test" and report["compressed"]["accuracy"] == 1.0
    model, example = small()
    result = slimfx.compile(model, example, cfg / "r.toml", bench_seconds=0, quiet=True)
    assert result.report["validation"]["samples"] == 32 and result.report["data"]["accuracy_split"] == "test"
    (cfg / "r.toml").write_text('data = "missing.py:make_data"\n\n[[passes]]\nname = "fold-batchnorm"\n')
    with pytest.raises(SlimfxError, match=rf"missing.py' does not exist.*relative to the folder {cfg}.*key 'data'"):
        slimfx.compile(model, example, cfg / "r.toml", bench_seconds=0, quiet=True)


def test_calibration_samples_come_from_the_users_data_unless_the_flag_is_given(tmp_path, monkeypatch):
    """The CLI's --calibration-samples default (256) overwrote a Data(calibration_samples=...) of the user's;
    the report now says how many rows were calibrated on."""
    from slimfx.cli import main

    (tmp_path / "data.py").write_text(
        "import torch, slimfx\n\n\n"
        "def make_data():\n"
        "    x = torch.randn(200, 3, 8, 8, generator=torch.Generator().manual_seed(1))\n"
        "    return slimfx.Data(train=(x, torch.zeros(200, dtype=torch.long)), batch_size=16, calibration_samples=40)\n")
    monkeypatch.chdir(tmp_path)
    argv = ["compile", f"{FIXTURES}:small", "--recipe", "int8", "--data", "data.py:make_data", "--no-bench",
            "--quiet", "--format", "onnx"]
    assert main([*argv, "--out", "a"]) == 0
    assert json.loads((tmp_path / "a" / "report.json").read_text())["data"]["calibration_samples"] == 40
    assert main([*argv, "--out", "b", "--calibration-samples", "100"]) == 0
    assert json.loads((tmp_path / "b" / "report.json").read_text())["data"]["calibration_samples"] == 100
    assert main([*argv, "--out", "c", "--recipe", "cleanup"]) == 0  # nothing calibrates
    assert json.loads((tmp_path / "c" / "report.json").read_text())["data"]["calibration_samples"] is None
