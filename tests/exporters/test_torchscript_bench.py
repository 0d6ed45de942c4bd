"""TorchScript export (reload + compare at batch 1 and 7) and latency measurement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimfx import ir
from slimfx.exporters import export_onnx, export_torchscript, measure_latency, with_batch
from slimfx.exporters.validate import validate_torchscript
from slimfx.ir.errors import ValidationError
from tests.exporters.small_models import build


@pytest.mark.parametrize("name", ["resnet", "encoder_sdpa", "mlp"])
def test_torchscript_roundtrip(name, tmp_path):
    model, x = build(name)
    g = ir.capture(model, x)
    path = tmp_path / f"{name}.pt"
    res = export_torchscript(g, path, inputs=x)
    assert path.exists() and res.format == "torchscript" and res.validation.passed
    assert res.details["method"] in ("script", "trace")
    if res.details["method"] == "trace":
        assert "script_error" in res.details
    rep = validate_torchscript(path, model, [with_batch(x, 1), with_batch(x, 7)], atol=1e-5, rtol=0)
    assert rep.passed and rep.batches == [1, 7], rep.summary()
    loaded = torch.jit.load(str(path))
    assert isinstance(loaded, torch.jit.ScriptModule)
    import zipfile

    names = zipfile.ZipFile(path).namelist()  # no debug tables; one short top folder, not the temporary name
    assert not any(n.endswith(".debug_pkl") for n in names) and {n.split("/")[0] for n in names} == {name}


def test_torchscript_validation_failure_leaves_no_file(tmp_path, monkeypatch):
    import slimfx.exporters.torchscript as ts

    model, x = build("mlp")
    g = ir.capture(model, x)
    real = ts.to_torchscript

    def broken(graph, inputs, optimize=True):
        sm, info = real(graph, inputs, optimize=optimize)
        return torch.jit.trace(torch.nn.Sequential(torch.nn.Linear(64, 10)).eval(), inputs), info

    monkeypatch.setattr(ts, "to_torchscript", broken)
    with pytest.raises(ValidationError, match="TorchScript export"):
        export_torchscript(g, tmp_path / "m.pt", inputs=x)
    assert list(tmp_path.iterdir()) == []


def test_measure_latency_onnx_and_torch(tmp_path):
    model, x = build("mlp")
    path = export_onnx(ir.capture(model, x), tmp_path / "m.onnx", inputs=x).path
    threads_before = torch.get_num_threads()
    for target in (path, model):
        s = measure_latency(target, with_batch(x, 4), threads=1, runs=15, warmup=2)
        assert s.runs == 15 and s.threads == 1
        assert 0 < s.p10_ms <= s.median_ms <= s.p90_ms < 1000 and s.iqr_ms >= 0
    assert torch.get_num_threads() == threads_before
    auto = measure_latency(path, x, budget_s=0.05)
    assert auto.runs >= 7


def test_latency_scales_with_work(tmp_path):
    """A model doing ~50x the arithmetic is measurably slower: the timer measures the model."""
    small = torch.nn.Linear(16, 16).eval()
    big = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)]).eval()
    s = measure_latency(small, (torch.randn(8, 16),), runs=20)
    b = measure_latency(big, (torch.randn(8, 256),), runs=20)
    assert b.median_ms > 2 * s.median_ms
    assert np.isfinite([s.median_ms, b.median_ms]).all()


def test_interleaved_latency_rotates_fresh_measurements_and_best_is_the_fastest_round(monkeypatch):
    import slimfx.exporters.bench as bench
    from slimfx.exporters import best_median_ms, interleaved_latency

    order: list[str] = []
    fake_ms = iter([3.0, 5.0, 4.0, 2.0, 6.0, 1.0, 9.0, 9.0, 9.0])

    def fake_measure(model, inputs, **kw):
        order.append(model)
        return bench.LatencyStats(next(fake_ms), 0.0, 0.0, 0.0, 7, kw["threads"])

    monkeypatch.setattr(bench, "measure_latency", fake_measure)
    runs = interleaved_latency({"a": "a.onnx", "b": "b.onnx", "c": "c.onnx"}, (), rounds=3, budget_s=0.1)
    assert order == ["a.onnx", "b.onnx", "c.onnx", "b.onnx", "c.onnx", "a.onnx", "c.onnx", "a.onnx", "b.onnx"]
    assert [s.median_ms for s in runs["a"]] == [3.0, 1.0, 9.0] and best_median_ms(runs["a"]) == 1.0
    assert best_median_ms(runs["b"]) == 2.0 and best_median_ms(runs["c"]) == 4.0
    with pytest.raises(ValueError, match="rounds"):
        interleaved_latency({"a": "a.onnx"}, (), rounds=0)


def test_interleaved_latency_measures_real_models():
    from slimfx.exporters import best_median_ms, interleaved_latency

    x = torch.randn(16, 512)
    runs = interleaved_latency({"small": torch.nn.Linear(512, 8), "big": torch.nn.Linear(512, 2048)}, (x,),
                               rounds=2, budget_s=0.05)
    assert best_median_ms(runs["small"]) < best_median_ms(runs["big"])


def test_latency_side_by_side_keeps_to_one_total_budget_and_reports_spread():
    import time

    from slimfx.exporters import latency_side_by_side

    small, big = torch.nn.Linear(64, 8), torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])
    inputs = {"b1": (torch.randn(1, 64),), "b32": (torch.randn(32, 64),)}
    t0 = time.perf_counter()
    res = latency_side_by_side({"small": small}, inputs, total_budget_s=0.3)
    assert time.perf_counter() - t0 < 1.5
    assert set(res["small"]) == {"b1", "b32"} and 1 <= res["small"]["b1"].rounds <= 3
    s = res["small"]["b32"]
    assert s.p10_ms <= s.median_ms <= s.p90_ms and len(s.round_medians_ms) == s.rounds
    assert min(s.round_medians_ms) == s.median_ms
    big_inputs = {"b32": (torch.randn(256, 512),)}
    slow = latency_side_by_side({"big": big}, big_inputs, total_budget_s=0.001)  # a budget smaller than one call
    assert slow["big"]["b32"].rounds == 1 and slow["big"]["b32"].runs == 2  # one round of the minimum, no more


def test_a_later_batch_that_cannot_fit_the_budget_is_left_out_for_every_model_and_named():
    import time

    from slimfx.exporters import latency_side_by_side, unmeasured_inputs

    big = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])
    inputs = {"b1": (torch.randn(1, 512),), "b256": (torch.randn(2048, 512),)}
    t0 = time.perf_counter()
    res = latency_side_by_side({"a": big, "b": big}, inputs, total_budget_s=0.02)
    assert time.perf_counter() - t0 < 2.0
    assert set(res["a"]) == set(res["b"]) == {"b1"}  # measured for none rather than for some
    assert unmeasured_inputs(res, inputs) == ["b256"]
    fits = latency_side_by_side({"a": big}, inputs, total_budget_s=5.0)
    assert set(fits["a"]) == {"b1", "b256"} and unmeasured_inputs(fits, inputs) == []


def test_a_later_batch_clearly_over_the_budget_is_told_from_a_slice_without_a_full_call():
    """A batch whose one round cannot fit is left out after one call on an eighth of its rows, not after a
    full-size warm-up call (a second and more for a ResNet-18 at batch 32, on one thread)."""
    from slimfx.exporters import latency_side_by_side, unmeasured_inputs

    class Seen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])
            self.rows: list[int] = []

        def forward(self, x):
            self.rows.append(x.shape[0])
            return self.net(x)

    model = Seen()
    inputs = {"b1": (torch.randn(1, 512),), "b2048": (torch.randn(2048, 512),)}
    res = latency_side_by_side({"a": model}, inputs, total_budget_s=0.02)
    assert unmeasured_inputs(res, inputs) == ["b2048"] and set(res["a"]) == {"b1"}
    assert 2048 not in model.rows and 256 in model.rows
    model.rows.clear()
    fits = latency_side_by_side({"a": model}, inputs, total_budget_s=5.0)  # fits: measured at full size
    assert set(fits["a"]) == {"b1", "b2048"} and 2048 in model.rows


def test_a_decoder_s_position_range_traces_with_its_length_dynamic(tmp_path):
    """torch.export leaves `torch.arange(ids.shape[1])` as aten.arange.default, which takes a Scalar: a trace
    hands it the length as a tensor (to keep it dynamic) and failed (every transformers decoder did); the
    exporter calls torch.arange instead, and the file runs at another length."""
    class Positions(torch.nn.Module):
        def forward(self, ids):
            return ids.float() + torch.arange(ids.shape[1])

    ids = torch.randint(0, 9, (2, 5))
    g = ir.capture(Positions(), (ids,), method="export")
    out = export_torchscript(g, tmp_path / "m.pt", inputs=(ids,))
    longer = torch.randint(0, 9, (3, 8))
    torch.testing.assert_close(torch.jit.load(str(out.path))(longer), Positions()(longer))


def test_when_neither_script_nor_trace_works_the_error_names_the_other_formats(tmp_path, monkeypatch):
    from slimfx.ir.errors import ExportError

    def refuse(*a, **k):
        raise RuntimeError("not this one")

    monkeypatch.setattr(torch.jit, "script", refuse)
    monkeypatch.setattr(torch.jit, "trace", refuse)
    x = torch.randn(2, 4)
    g = ir.capture(torch.nn.Linear(4, 3).eval(), (x,))
    with pytest.raises(ExportError, match=r"both failed\. Export the other formats only: --format onnx"):
        export_torchscript(g, tmp_path / "m.pt", inputs=(x,))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_dict_output_mixing_tensors_and_tuples_is_refused_in_one_short_paragraph(tmp_path):
    """TorchScript types a dict's values as one type; the refusal says so without printing the outputs' values
    (torch's message starts with the whole traced output) and names the formats that keep such outputs."""
    from slimfx.ir.errors import ExportError

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            y = self.fc(x)
            return {"logits": y, "parts": (y.cumsum(-1), y.sum(-1))}

    x = torch.randn(2, 4)
    g = ir.capture(Net().eval(), (x,))
    with pytest.raises(ExportError) as e:
        export_torchscript(g, tmp_path / "m.pt", inputs=(x,))
    msg = str(e.value)
    assert "consistent type" in msg and "--format onnx" in msg
    assert "tensor(" not in msg and "\n" not in msg and len(msg) < 800, msg
    assert "scripting (RuntimeError: )" not in msg  # torch.jit.script's message starts with a blank line
    assert not list(tmp_path.iterdir())
