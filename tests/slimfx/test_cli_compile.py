"""End-to-end CLI tests (subprocess): success, and each class of user error exits 2 with a clear
message and leaves no partial output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "user_models.py"


def slimfx(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "slimfx", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_compile_a_user_file_writes_validated_exports_and_report(tmp_path):
    out = tmp_path / "out"
    # the built-in int8 recipe without its speed guard, which may keep so small a model float; a latency budget
    # that one cold batch-32 call of each file fits even on a busy machine (this test reads both batch sizes)
    from slimfx.recipe import load_recipe

    recipe = tmp_path / "int8.toml"
    recipe.write_text(load_recipe("int8").source.read_text().replace(
        'scheme = "int8-static"', 'scheme = "int8-static"\nspeed_guard = false', 1))
    r = slimfx("compile", f"{FIXTURES}:small", "--recipe", str(recipe), "--out", str(out),
               "--format", "onnx,torchscript", "--bench-seconds", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.pt", "report.json", "report.md", "report.png"}
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "small" and report["recipe"] == "int8"
    for side in ("baseline", "compressed"):
        assert set(report[side]) >= {"params", "macs", "size_bytes", "latency_ms", "accuracy"}
        assert set(report[side]["latency_ms"]) == {"b1", "b32"}
        assert report[side]["accuracy"] is None  # a user model with no data has no accuracy
    assert report["compressed"]["params"] == report["baseline"]["params"] - 2 * 8  # BN scale and shift folded away
    int8_inits = [i for i in onnx.load(str(out / "model.onnx")).graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert sorted(tuple(i.dims) for i in int8_inits if len(i.dims) > 1) == [(5, 8), (8, 3, 3, 3)]  # int8 weights
    assert all(e["validation"]["passed"] for e in report["exports"].values())
    assert report["validation"]["top1_agreement"] >= 0.5 and report["validation"]["sqnr_db"] > 15
    assert [p["name"] for p in report["passes"]] == ["fold-batchnorm", "quantize"]
    assert any("calibrated on the example inputs" in h for h in report["headline"])
    assert "quantize" in r.stdout and "original" in r.stdout


@pytest.mark.parametrize("spec, message", [
    ("no_such_model", "unknown model 'no_such_model'"),
    ("{fixtures}:nope", "has no attribute 'nope'"),
    ("{fixtures}:just_a_module", "cannot know its input shapes"),
    ("{fixtures}:untraceable", "torch.fx cannot trace Branchy"),
])
def test_user_errors_exit_2_without_traceback_or_output(tmp_path, spec, message):
    out = tmp_path / "out"
    r = slimfx("compile", spec.format(fixtures=FIXTURES), "--recipe", "cleanup", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_bad_recipe_is_reported_before_any_work(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[passes]]\nname = "prune-channels"\nsparsity = "half"\n')
    r = slimfx("compile", f"{FIXTURES}:small", "--recipe", str(bad), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2
    assert "bad.toml" in r.stderr and "passes[0]" in r.stderr and "sparsity" in r.stderr
    assert not (tmp_path / "out").exists()


def test_unsupported_onnx_op_names_the_node_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    r = slimfx("compile", f"{FIXTURES}:no_onnx", "--recipe", "cleanup", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 2
    assert "flip" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    r = slimfx("compile", f"{FIXTURES}:no_onnx", "--recipe", "cleanup", "--out", str(out), "--debug", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" in r.stderr
