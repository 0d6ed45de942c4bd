"""slimfx.compile(): the Python API's result object, report schema and data checks."""

import json

import onnx
import pytest
import torch
import torch.nn as nn

import slimfx
from slimfx.ir.errors import RecipeError
from slimfx.recipe import Recipe, load_recipe
from tests.slimfx.fixtures.user_models import small

REPORT_SIDE_KEYS = {"params", "macs", "size_bytes", "latency_ms", "accuracy"}


def test_compile_returns_graph_module_exports_and_report(tmp_path):
    model, example = small()
    x = torch.randn(6, 3, 8, 8)
    labels = model(x).argmax(1)
    result = slimfx.compile(model, example, recipe="cleanup", out_dir=tmp_path, formats=("onnx", "torchscript"),
                            test_data=((x,), labels), bench_seconds=0.05, quiet=True)
    assert set(result.exports) == {"onnx", "torchscript"} and all(p.exists() for p in result.exports.values())
    assert torch.allclose(result.module(x), model(x), atol=1e-5)
    assert not result.graph.find("batch_norm")
    report = result.report
    assert json.loads((tmp_path / "report.json").read_text())["recipe"] == "cleanup"
    assert set(report) >= {"model", "recipe", "baseline", "compressed", "validation", "passes"}
    assert REPORT_SIDE_KEYS <= set(report["baseline"]) and REPORT_SIDE_KEYS <= set(report["compressed"])
    assert report["baseline"]["accuracy"] == 1.0 and report["compressed"]["accuracy"] == 1.0
    assert report["validation"]["top1_agreement"] == 1.0 and report["validation"]["sqnr_db"] > 80
    assert all(isinstance(p["seconds"], float) for p in report["passes"])
    assert (tmp_path / "report.md").read_text().startswith("# slimfx report: SmallNet")


def test_a_recipe_object_works_and_nothing_is_written_without_out_dir(tmp_path):
    model, example = small()
    recipe = Recipe.from_dict({"passes": [{"name": "fold-batchnorm"}, {"name": "dce"}]}, name="mine")
    result = slimfx.compile(model, example, recipe=recipe, bench_seconds=0.05, quiet=True)
    assert result.exports == {} and result.out_dir is None
    assert result.report["recipe"] == "mine"


def test_the_ir_is_printed_after_each_changing_pass_only_when_asked(capsys):
    model, example = small()
    recipe = Recipe.from_dict({"passes": [{"name": "fold-batchnorm"}, {"name": "cse"}]}, name="mine")
    slimfx.compile(model, example, recipe=recipe, bench_seconds=0, quiet=True)
    assert "// IR after" not in capsys.readouterr().out
    slimfx.compile(model, example, recipe=recipe, bench_seconds=0, quiet=True, print_ir=True)
    out = capsys.readouterr().out
    assert out.count("// IR after") == 1 and "// IR after fold-batchnorm" in out and "batch_norm(" not in out


def test_a_step_that_needs_missing_data_fails_before_any_work(tmp_path):
    model, example = small()
    recipe = Recipe.from_dict({"passes": [{"name": "finetune", "required": True}]}, name="needs-data")
    with pytest.raises(RecipeError, match=r"passes\[0\].*finetune.*train data"):
        slimfx.compile(model, example, recipe=recipe, out_dir=tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_unknown_format_is_rejected(tmp_path):
    model, example = small()
    with pytest.raises(slimfx.SlimfxError, match="unknown export format 'tflite'"):
        slimfx.compile(model, example, recipe="cleanup", formats=("tflite",), out_dir=tmp_path)


def test_keyword_inputs_are_graph_inputs_in_forward_order(tmp_path):
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 16)
            self.fc = torch.nn.Linear(16, 3)

        def forward(self, input_ids, attention_mask=None):
            h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
            return self.fc(h.sum(1))

    model = Masked().eval()
    ids, mask = torch.randint(0, 50, (2, 7)), torch.ones(2, 7)
    result = slimfx.compile(model, (), recipe="cleanup", example_kwargs={"attention_mask": mask, "input_ids": ids},
                            out_dir=tmp_path, bench_seconds=0.02, quiet=True)
    assert [n.name for n in result.graph.inputs] == ["input_ids", "attention_mask"]
    assert [i.name for i in onnx.load(str(result.exports["onnx"])).graph.input] == ["input_ids", "attention_mask"]
    assert torch.allclose(result.module(ids, mask), model(input_ids=ids, attention_mask=mask), atol=1e-6)
    with pytest.raises(slimfx.SlimfxError, match="'token_type_ids'"):
        slimfx.compile(model, (), recipe="cleanup", example_kwargs={"input_ids": ids, "token_type_ids": ids})


def test_a_hugging_face_model_compiles_with_keyword_inputs(tmp_path):
    pytest.importorskip("transformers")
    from slimfx.models import hf

    model, kwargs = hf.build("bert")
    # int8-dynamic without its speed guard: this test is about keyword inputs through int8 (the guard may keep
    # so small a model float at batch 1)
    base = load_recipe("int8-dynamic")
    recipe = Recipe("int8-dynamic", passes=[(n, {**o, "speed_guard": False} if n == "quantize" else o)
                                                   for n, o in base.passes], validate=base.validate)
    result = slimfx.compile(model, (), recipe=recipe, example_kwargs=kwargs, out_dir=tmp_path,
                            formats="onnx", bench_seconds=0.02, quiet=True)
    assert [n.name for n in result.graph.inputs] == ["input_ids", "attention_mask"]
    assert result.report["validation"]["top1_agreement"] == 1.0 and result.report["validation"]["sqnr_db"] > 25
    assert result.report["compressed"]["size_bytes"] < 0.7 * result.report["baseline"]["size_bytes"]


def test_torchscript_only_compile_of_a_model_onnx_cannot_express(tmp_path):
    from tests.slimfx.fixtures.user_models import no_onnx

    model, example = no_onnx()
    result = slimfx.compile(model, example, recipe="cleanup", formats=("torchscript",), out_dir=tmp_path,
                            bench_seconds=0.02, quiet=True)
    assert set(result.exports) == {"torchscript"} and result.exports["torchscript"].exists()
    report = result.report
    assert report["baseline"]["size_bytes"] is None and report["compressed"]["latency_ms"] is None
    assert any("no ONNX size or latency" in w and "flip" in w for w in report["warnings"])
    assert report["validation"]["max_abs_diff"] < 1e-5
    assert "latency b32" in (tmp_path / "report.md").read_text()
    with pytest.raises(slimfx.ExportError, match="flip"):  # asked for ONNX: a clear error, as before
        slimfx.compile(model, example, recipe="cleanup", formats=("onnx",), out_dir=tmp_path / "x", quiet=True)
    assert not (tmp_path / "x").exists()


def test_a_compiled_model_clearly_slower_than_the_original_is_warned_about(tmp_path, monkeypatch):
    import slimfx.driver as driver
    from slimfx.exporters import LatencySummary

    measured = {"original": {"b1": 1.0, "b32": 10.0}, "compiled": {"b1": 1.5, "b32": 5.0}}

    def fake(models, inputs, **kwargs):
        ms = {m: measured.get(m, {"b1": 1.0, "b32": 1.0}) for m in models}
        return {m: {b: LatencySummary(ms[m][b], ms[m][b], ms[m][b], 1, 2, [0.0]) for b in inputs} for m in models}
    monkeypatch.setattr("slimfx.exporters.latency_side_by_side", fake)
    model, example = small()
    result = slimfx.compile(model, example, recipe="cleanup", out_dir=tmp_path, quiet=True)
    slower = [w for w in result.report["warnings"] if "slower than the original" in w]
    assert len(slower) == 1 and "batch 1 (1.50x" in slower[0]
    assert "warning: the compiled model is slower" in (tmp_path / "report.md").read_text()

    def summary(median, p10):
        return LatencySummary(median, p10, median * 1.5, 2, 100, [median])
    base = {"b1": summary(1.0, 0.9), "b32": summary(1.0, 0.9)}
    assert driver._slower_warnings(base, {"b1": summary(1.15, 1.1), "b32": summary(0.5, 0.4)}) == []  # within noise
    # a busy machine: the median 1.42x, but the fastest tenth of the calls as fast as the original's
    assert driver._slower_warnings(base, {"b1": summary(1.42, 0.91), "b32": summary(1.0, 0.9)}) == []
    assert len(driver._slower_warnings(base, {"b1": summary(1.42, 1.3), "b32": summary(1.0, 0.9)})) == 1


def test_a_batch_size_the_latency_budget_cannot_hold_is_reported_as_not_measured(tmp_path):
    model, example = small()
    report = slimfx.compile(model, example, recipe="cleanup", out_dir=tmp_path, quiet=True,
                            bench_seconds=1e-4).report  # one run at batch 32 already takes longer
    for side in ("baseline", "compressed"):
        assert report[side]["latency_ms"]["b1"] > 0 and report[side]["latency_ms"]["b32"] is None
    assert any("batch 32 not measured" in w and "--bench-seconds" in w for w in report["warnings"])
    assert report["exports"]["onnx"]["latency_ms"]["b32"] is None
    assert (tmp_path / "report.png").exists() and report["stages"][-1]["latency_b1_ms"] > 0  # plotted at batch 1


def test_every_user_error_is_importable_from_slimfx():
    """README: a failed gate raises `slimfx.GateError`; every class of slimfx.errors is slimfx.X too."""
    import slimfx.errors

    for name in slimfx.errors.__all__:
        assert getattr(slimfx, name) is getattr(slimfx.errors, name), name
    assert set(slimfx.errors.__all__) <= set(slimfx.__all__)


def test_the_report_counts_macs_per_input_whatever_the_example_batch_size():
    # The report's MACs sit beside latency at batch 1; they were counted at the example's shapes, so a model
    # whose example holds 4 rows reported 4x the MACs of the same model given a 1-row example.
    from slimfx import ir

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    per_input = ir.count_macs(ir.capture(model, (torch.randn(1, 3, 8, 8),)))
    recipe = slimfx.Recipe(name="p", passes=[("prune-channels", {"sparsity": 0.5})], export={"formats": ["onnx"]})
    for rows in (1, 4):
        result = slimfx.compile(model, (torch.randn(rows, 3, 8, 8),), recipe=recipe, bench_seconds=0, quiet=True)
        report = result.report
        assert report["baseline"]["macs"] == per_input, rows
        assert report["stages"][0]["macs"] == per_input
        pruned = [s for s in report["stages"] if s["stage"].endswith("prune-channels")][0]["macs"]
        assert pruned == report["compressed"]["macs"] < per_input


def test_a_model_with_weight_norm_and_spectral_norm_compiles_to_a_validated_onnx_file(tmp_path):
    from tests.ir.test_capture import _Parametrized

    torch.manual_seed(0)
    model = _Parametrized().eval()
    result = slimfx.compile(model, (torch.randn(2, 4, 16),), "cleanup", out_dir=tmp_path / "o", bench_seconds=0,
                            quiet=True)
    assert result.report["gate"]["passed"] and result.report["exports"]["onnx"]["validation"]["passed"]
    x = torch.randn(5, 4, 16)
    import onnxruntime as ort

    got = ort.InferenceSession(str(tmp_path / "o" / "model.onnx")).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-5, rtol=1e-4)
