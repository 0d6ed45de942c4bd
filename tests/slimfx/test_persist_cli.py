"""The CLI with saved models: compile writes model.slimfx when asked, `compile model.slimfx` resumes and
equals the direct pipeline, inspect/export/validate take .slimfx files, a broken one exits 2."""

from __future__ import annotations

import json
import sys

import torch

import slimfx
from slimfx import ir
from slimfx.persist import example_inputs
from slimfx.recipe import Recipe, load_recipe
from tests.slimfx.test_cli_compile import FIXTURES

PRUNE_TOML = """\
name = "prune"
[[passes]]
name = "fold-batchnorm"
[[passes]]
name = "prune-channels"
sparsity = 0.5
[export]
formats = ["onnx", "slimfx"]
"""


def _small():
    sys.path.insert(0, str(FIXTURES.parent))
    try:
        import user_models
    finally:
        sys.path.pop(0)
    return user_models.small()[0]


def test_compile_saves_and_a_resumed_int8_compile_equals_the_direct_one(tmp_path, capsys, monkeypatch):
    from slimfx.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prune.toml").write_text(PRUNE_TOML)
    assert main(["compile", f"{FIXTURES}:small", "--recipe", "prune.toml", "--out", "a", "--bench-seconds", "0.05",
                 "--quiet"]) == 0, capsys.readouterr().err
    saved = tmp_path / "a" / "model.slimfx"
    assert json.loads((tmp_path / "a" / "report.json").read_text())["exports"]["slimfx"]["validation"]["exact"]
    # int8 without the speed guard (which times on onnxruntime and may keep so small a model float)
    (tmp_path / "int8.toml").write_text(load_recipe("int8").source.read_text().replace(
        'scheme = "int8-static"', 'scheme = "int8-static"\nspeed_guard = false', 1))
    assert main(["compile", str(saved), "--recipe", "int8.toml", "--format", "slimfx,pt2,torchscript", "--out", "b",
                 "--bench-seconds", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "model.pt2" in out and "int8, dequantized in the graph" in out
    resumed = slimfx.load(tmp_path / "b" / "model.slimfx")
    assert [h["recipe"] for h in resumed.metadata["history"]] == ["prune", "int8"]
    assert resumed.metadata["model"] == {"name": "small"}

    example = example_inputs(slimfx.load(saved))  # what the CLI made from the stored metas
    both = Recipe("both", passes=load_recipe(tmp_path / "prune.toml").passes + load_recipe(tmp_path / "int8.toml").passes)
    direct = slimfx.compile(_small(), example, both, bench_seconds=0, quiet=True)
    assert ir.graph_diff(resumed, direct.graph) is None
    with torch.no_grad():
        assert torch.equal(ir.lower(resumed)(*example), direct.module(*example))
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    for fmt in ("slimfx", "pt2", "torchscript"):
        e = report["exports"][fmt]
        assert e["size_bytes"] == (tmp_path / "b" / e["path"]).stat().st_size and e["weights"] == "int8"
    for fmt in ("pt2", "torchscript"):
        assert set(report["exports"][fmt]["latency_ms"]) == {"b1", "b32"}
        assert report["exports"][fmt]["runtime"] == "torch, 1 thread"
    assert report["exports"]["slimfx"]["latency_ms"] is None  # a model file, not a runtime format


def test_inspect_export_validate_take_saved_models(tmp_path, capsys, monkeypatch):
    from slimfx.cli import main

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    g = ir.capture(_small(), (torch.randn(2, 3, 8, 8),))
    saved = slimfx.save(g, tmp_path / "small.slimfx")
    assert main(["inspect", str(saved), "--format", "text"]) == 0
    assert capsys.readouterr().out.strip() == str(slimfx.load(saved)).strip()
    assert main(["export", str(saved), "--format", "pt2", "-o", "small.pt2"]) == 0
    assert main(["validate", "small.pt2", "--model", str(saved), "--batch", "1,3"]) == 0
    assert "pass" in capsys.readouterr().out
    broken = tmp_path / "broken.slimfx"
    broken.write_bytes(saved.read_bytes()[:300])
    assert main(["inspect", str(broken)]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "truncated or corrupt" in err and "Traceback" not in err, err


def test_run_pass_checks_its_arguments_before_the_pass_runs(tmp_path, capsys):
    """`--check-numerics nan` would make a numerics check that can never fail (every comparison with NaN is
    false) and was accepted; -1 was refused in the Python API's words (check_numerics=). An --out that is not a
    .slimfx name was refused only after the pass had run. All are argument errors, exit 2, before any work."""
    from slimfx.cli import main

    model = tmp_path / "m.slimfx"
    sys.path.insert(0, str(FIXTURES.parent))
    try:
        import user_models
    finally:
        sys.path.pop(0)
    slimfx.save(ir.capture(*user_models.small()), model)
    for bad in ("nan", "-1", "inf"):
        assert main(["run-pass", "dce", str(model), "--check-numerics", bad]) == 2
        err = capsys.readouterr().err
        assert f"argument --check-numerics: invalid value '{bad}'" in err and "check_numerics" not in err
    assert main(["run-pass", "dce", str(model), "--out", str(tmp_path / "after.onnx")]) == 2
    cap = capsys.readouterr()
    assert "no change" not in cap.out and "after.onnx" in cap.err and "--out" in cap.err
    assert main(["run-pass", "dce", str(model), "--check-numerics", "0", "--out", str(tmp_path / "a.slimfx")]) == 0
    assert (tmp_path / "a.slimfx").is_file()

