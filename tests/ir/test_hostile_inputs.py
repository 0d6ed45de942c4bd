"""Hostile inputs: models and examples a user may hand slimfx that it cannot compile. Each is refused with a
SlimfxError subclass (never an internal error) that names the cause and an action the user can take from
Python or the CLI, and as early as possible: capture-stage refusals happen before `slimfx.compile` does any
work and before the CLI writes anything (issue #13; #15 items 4 and 10).

One row per case: a small model class, the call, the expected error class and message fragments.
"""

from __future__ import annotations

import importlib
import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import slimfx
from slimfx import ir
from slimfx.cli import main
from slimfx.errors import CaptureError, ExportError, SlimfxError, ValidationError
from slimfx.exporters import export_onnx, export_torchscript, ort_session, to_onnx_model, validate_onnx
from slimfx.exporters.validate import (
    BFLOAT16,
    ValidationReport,
    compare_outputs,
    tolerances,
    validate_outputs,
    validate_torchscript,
)

capture_mod = importlib.import_module("slimfx.ir.capture")  # the module (slimfx.ir.capture is also the function)

# Advice must never name a Python keyword a CLI user cannot pass, unless the CLI spelling is named too.
PYTHON_ONLY = ("dynamic_batch=False", "leaf_modules", "keep_invalid=True")


class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x)


class KwOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, *, scale):
        return self.fc(x) * scale


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, y):
        return self.fc(x) + y


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class ReturnsNone(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        self.fc(x)


class ReturnsConstants(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x), 3, None


class ReturnsSize(nn.Module):
    def forward(self, x):
        return {"y": x * 2, "n": x.size(0)}


class Dropped(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.drop(self.bn(x)))


class TrainBranch(nn.Module):
    def forward(self, x):
        return x + 1 if self.training else x


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 8, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y[:, -1])


class GRUNet(Recurrent):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 8, batch_first=True)


class ProjRecurrent(Recurrent):
    """An LSTM with an output projection: ONNX's LSTM has none."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 12, batch_first=True, proj_size=8)


def data_dependent(x):  # a helper fx keeps as one call; neither fx nor torch.export can follow its branch
    if x.sum() > 0:
        return x * 2
    return x - 1


torch.fx.wrap("data_dependent")


class Undecomposable(nn.Module):
    """Capture keeps a call it cannot decompose opaque, and says why."""

    class Inner(nn.Module):
        def forward(self, x):
            return data_dependent(x)

    def __init__(self):
        super().__init__()
        self.inner = self.Inner()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.inner(x))


class FixedBatch(nn.Module):
    """Runs at batch 1 only: the view names the batch size literally."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x).view(1, 10)


class FakeCuda(torch.Tensor):
    """A CPU tensor that says it lives on a GPU (no CUDA here): enough for a device check."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def _on_fake_cuda(m: nn.Module) -> nn.Module:
    m.fc.weight = nn.Parameter(m.fc.weight.detach().as_subclass(FakeCuda))
    return m


def _with_f64_buffer() -> nn.Module:
    m = Lin()
    m.register_buffer("temp", torch.tensor(0.5, dtype=torch.float64))
    return m


def _mixed() -> nn.Module:
    m = Two()
    m.fc.bias.data = m.fc.bias.data.half()
    return m


x64 = (torch.randn(2, 64),)

# (id, build() -> (model, example inputs), capture kwargs, error class, message fragments).
# Every row is raised by ir.capture; the same rows go through slimfx.compile below.
CAPTURE_ROWS = [
    ("zero-batch", lambda: (Lin(), (torch.randn(0, 64),)), {}, CaptureError,
     ["'x'", "batch size 0", "float32[0, 64]", "at least one sample", "model factory", "example_inputs="]),
    ("0-d example", lambda: (Lin(), (torch.tensor(1.0),)), {}, CaptureError,
     ["do not fit Lin", "layer 'fc'", "Linear(in_features=64", "'x' is a 0-d tensor", "batch dimension",
      "model factory"]),
    ("no inputs", lambda: (Lin(), ()), {}, CaptureError,
     ["Lin.forward(x) takes 1 input, but 0 example inputs were given", "one example input per argument"]),
    ("too many inputs", lambda: (Lin(), (torch.randn(1, 64), torch.randn(1, 64))), {}, CaptureError,
     ["Lin.forward(x) takes 1 input, but 2 example inputs were given",
      "(x: float32[1, 64], #1: float32[1, 64])", "model factory"]),
    ("too few inputs", lambda: (Two(), (torch.randn(1, 4),)), {}, CaptureError,
     ["Two.forward(x, y) takes 2 inputs, but 1 example input was given: (x: float32[1, 4])"]),
    # a keyword-only argument cannot be an example input by position: the message names it and how to give it by
    # name from a model factory (a third item, a dict) and from Python (example_kwargs=)
    ("keyword-only given by position", lambda: (KwOnly(), (torch.randn(1, 4), torch.randn(1, 1))), {}, CaptureError,
     ["KwOnly.forward(x, *, scale) takes 1 input by position, but 2 example inputs were given",
      "'scale' is keyword-only", "(model, (x,), {'scale': ...})", "example_kwargs={'scale': ...}"]),
    ("keyword-only missing", lambda: (KwOnly(), (torch.randn(1, 4),)), {}, CaptureError,
     ["KwOnly.forward needs its keyword-only argument 'scale'", "(model, (x,), {'scale': ...})",
      "example_kwargs={'scale': ...}"]),
    ("returns None", lambda: (ReturnsNone(), (torch.randn(1, 4),)), {}, CaptureError,
     ["ReturnsNone.forward returns None", "tuples/lists/dicts of tensors", "model factory"]),
    ("returns constants", lambda: (ReturnsConstants(), (torch.randn(1, 4),)), {}, CaptureError,
     ["output[1] is the constant int 3", "output[2] is None", "does not drop outputs", "wrapper module"]),
    ("returns a size", lambda: (ReturnsSize(), (torch.randn(2, 4),)), {}, CaptureError,
     ["output['n'] is a non-tensor value", "op 'size'"]),
    ("float64 model", lambda: (Lin().double(), (torch.randn(2, 64, dtype=torch.float64),)), {}, CaptureError,
     ["Lin is float64 (e.g. 'fc.weight')", "float32 and float16", "no float64 kernels for Conv",
      ".float() in your model factory"]),
    ("float64 buffer in a float32 model", lambda: (_with_f64_buffer(), x64), {}, CaptureError,
     ["Lin is float32 but holds float64 tensors (e.g. 'temp')", ".float() in your model factory"]),
    ("bfloat16 model", lambda: (Lin().bfloat16(), (torch.randn(2, 64).bfloat16(),)), {}, CaptureError,
     ["Lin is bfloat16", ".float()"]),
    ("mixed dtypes in the model", lambda: (_mixed(), (torch.randn(1, 4), torch.randn(1, 4))), {}, CaptureError,
     ["Two mixes float dtypes: float32 ('fc.weight') and float16 ('fc.bias')", ".float() (or .half())"]),
    ("float64 input, float32 model", lambda: (Lin(), (torch.randn(2, 64, dtype=torch.float64),)), {}, CaptureError,
     ["example input 'x' of Lin is float64", "x.float()"]),
    ("float16 input, float32 model", lambda: (Lin(), (torch.randn(2, 64).half(),)), {}, CaptureError,
     ["example input 'x' of Lin is float16 but the model's weights are float32", "x.to(torch.float32)"]),
    ("meta-device model", lambda: (Lin().to("meta"), x64), {}, CaptureError,
     ["on the 'meta' device (e.g. 'fc.weight')", "no values", "Load real weights first", "model factory"]),
    ("meta-device input", lambda: (Lin(), (torch.randn(2, 64, device="meta"),)), {}, CaptureError,
     ["example input 'x' of Lin is on meta (no values)", "on the CPU"]),
    ("GPU model", lambda: (_on_fake_cuda(Lin()), x64), {}, CaptureError,
     ["on cuda:0 (e.g. 'fc.weight')", "on the CPU", "model.cpu()"]),
    ("wrong feature dim", lambda: (Lin(), (torch.randn(1, 100),)), {}, CaptureError,
     ["do not fit Lin: layer 'fc' (Linear(in_features=64, out_features=10", "fails on float32[1, 100]",
      "1x100 and 64x10", "Example inputs given: (x: float32[1, 100])"]),
    ("train mode, for inference", lambda: (Dropped().train(), (torch.randn(8, 16),)), {"for_inference": True},
     CaptureError, ["Dropped is in training mode", "dropout 'drop'", "BatchNorm1d 'bn' (batch statistics)",
                    "model.eval()"]),
    ("self.training branch, for inference", lambda: (TrainBranch().train(), (torch.randn(2, 3),)),
     {"for_inference": True}, CaptureError, ["TrainBranch '(the model)' (its forward reads self.training)"]),
]


def _check_message(msg: str, fragments: list[str]) -> None:
    for f in fragments:
        assert f in msg, f"{f!r} not in:\n{msg}"
    for p in PYTHON_ONLY:
        assert p not in msg or "--" in msg, f"Python-only advice {p!r} without a CLI spelling:\n{msg}"
    assert "/tmp" not in msg and ".onnx" not in msg, msg  # never a temporary file


@pytest.mark.parametrize("build, kwargs, error, fragments", [r[1:] for r in CAPTURE_ROWS],
                         ids=[r[0] for r in CAPTURE_ROWS])
def test_capture_refuses_clearly(build, kwargs, error, fragments):
    model, x = build()
    with pytest.raises(error) as e:
        ir.capture(model, x, **kwargs)
    _check_message(str(e.value), fragments)


EXPORT_ROWS = [r for r in CAPTURE_ROWS if r[0] in ("zero-batch", "returns None", "returns constants", "returns a size",
                                                   "float64 model", "meta-device model", "too many inputs")]


@pytest.mark.parametrize("build, kwargs, error, fragments", [r[1:] for r in EXPORT_ROWS],
                         ids=[r[0] for r in EXPORT_ROWS])
def test_the_torch_export_front_end_refuses_the_same_way(build, kwargs, error, fragments):
    model, x = build()
    with pytest.raises(error) as e:
        ir.capture(model, x, method="export", **kwargs)
    _check_message(str(e.value), fragments)
    assert "_empty_nn_module_stack" not in str(e.value) and "runtime_assert" not in str(e.value)


@pytest.mark.parametrize("build, kwargs, error, fragments", [r[1:] for r in CAPTURE_ROWS if not r[2]],
                         ids=[r[0] for r in CAPTURE_ROWS if not r[2]])
def test_compile_refuses_at_capture_before_any_work(build, kwargs, error, fragments, tmp_path, monkeypatch):
    """slimfx.compile raises the same error, before exporting or benchmarking anything."""
    import slimfx.exporters

    def no_export(*a, **k):
        raise AssertionError("compile exported before capture refused the model")

    monkeypatch.setattr(slimfx.exporters, "export_onnx", no_export)
    model, x = build()
    with pytest.raises(error) as e:
        slimfx.compile(model, x, "cleanup", out_dir=tmp_path / "out", quiet=True)
    _check_message(str(e.value), fragments)
    assert not (tmp_path / "out").exists()


def test_eval_mode_and_train_mode_without_dropout_are_accepted_for_inference():
    ir.capture(Dropped().eval(), (torch.randn(8, 16),), for_inference=True)
    ir.capture(Lin().train(), x64, for_inference=True)  # no mode-dependent module: same outputs either way
    g = ir.capture(Dropped().train(), (torch.randn(8, 16),))  # a training graph is still capturable
    assert g.training


def test_compile_refuses_a_train_mode_model_with_dropout():
    with pytest.raises(CaptureError, match="training mode"):
        slimfx.compile(Dropped().train(), (torch.randn(8, 16),), "cleanup", quiet=True, bench_seconds=0.01)


# --- export-stage rows ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [Recurrent, GRUNet])
def test_recurrent_modules_export_to_onnx(cls, tmp_path):
    model, x = cls().eval(), (torch.randn(2, 5, 4),)
    g = ir.capture(model, x)
    assert g.node("rnn").op == type(model.rnn).__name__.lower()
    assert export_onnx(g, tmp_path / "m.onnx", inputs=x).validation.passed


def test_an_lstm_onnx_cannot_express_is_named_with_its_line_and_an_action():
    model, x = ProjRecurrent().eval(), (torch.randn(2, 5, 4),)
    g = ir.capture(model, x)
    with pytest.raises(ExportError) as e:
        to_onnx_model(g, inputs=x)
    line = next(i for i, ln in enumerate(open(__file__), 1) if "y, _ = self.rnn(x)" in ln)
    _check_message(str(e.value), [f"%rnn (lstm, module 'rnn', test_hostile_inputs.py:{line})", "proj_size",
                                  "--format torchscript", 'formats=("torchscript",)'])


class Gate(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.gate(x))


def test_opaque_modules_are_named_with_their_line_and_an_action():
    model, x = GatedNet().eval(), (torch.randn(2, 4),)
    g = ir.capture(model, x, leaf_modules=[Gate])
    with pytest.raises(ExportError) as e:
        to_onnx_model(g, inputs=x)
    line = next(i for i, ln in enumerate(open(__file__), 1) if "return self.fc(self.gate(x))" in ln)
    _check_message(str(e.value), [f"(tests.ir.test_hostile_inputs.Gate at module 'gate', test_hostile_inputs.py:{line})",
                                  "does not support tests.ir.test_hostile_inputs.Gate modules yet",
                                  "--format torchscript", 'formats=("torchscript",)'])
    assert "propagate_shapes" not in str(e.value)


def test_the_torchscript_route_the_message_offers_works(tmp_path):
    model, x = ProjRecurrent().eval(), (torch.randn(2, 5, 4),)
    res = export_torchscript(ir.capture(model, x), tmp_path / "m.pt", inputs=x)
    assert res.validation.passed and res.validation.compared > 0


def test_a_model_that_fixes_its_batch_size_is_told_which_line_and_both_fixes(tmp_path):
    model, x = FixedBatch().eval(), (torch.randn(1, 64),)
    g = ir.capture(model, x)
    with pytest.raises(ExportError) as e:
        export_onnx(g, tmp_path / "m.onnx", inputs=x)
    line = next(i for i, ln in enumerate(open(__file__), 1) if "self.fc(x).view(1, 10)" in ln)
    _check_message(str(e.value), [
        "FixedBatch runs at the example's batch size 1 but not at batch size 2",
        f"%view (op 'reshape', test_hostile_inputs.py:{line})", "shape '[1, 10]' is invalid",
        "`--fixed-batch` on the command line (slimfx compile, slimfx export)", "batch size you deploy"])
    assert "probably" not in str(e.value) and list(tmp_path.iterdir()) == []
    res = export_onnx(g, tmp_path / "m.onnx", inputs=x, dynamic_batch=False)  # the fix the message offers
    assert res.validation.passed


def test_cli_export_offers_and_takes_fixed_batch(tmp_path, capsys):
    src = _user_file(tmp_path, "FixedBatch", "(torch.randn(1, 64),)")
    assert main(["export", f"{src}:make", "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "--fixed-batch" in err and "Traceback" not in err and not (tmp_path / "m.onnx").exists()
    assert main(["export", f"{src}:make", "-o", str(tmp_path / "m.onnx"), "--fixed-batch"]) == 0


def test_cli_compile_offers_and_takes_fixed_batch(tmp_path, capsys, monkeypatch):
    """The advice names an action of the interface the user is on: compile takes --fixed-batch too, and then
    writes files at the example's batch size and runs the gate's data in chunks of it."""
    import onnx

    src = _user_file(tmp_path, "FixedBatch", "(torch.randn(1, 64),)")
    monkeypatch.chdir(tmp_path)
    # ONNX: the export's batch probe refuses; TorchScript: remove-identity drops the view (the same shape at
    # the example), so the file runs at any batch, but the original model fails on the gate's batches of 32
    for fmt, where in (("onnx", "runs at the example's batch size 1 but not at batch size 2"),
                       ("torchscript", "the original model fails on a batch of 32 from the generated data")):
        assert main(["compile", f"{src}:make", "--recipe", "cleanup", "--format", fmt, "--out", f"out-{fmt}",
                     "--quiet", "--no-bench"]) == 2
        err = capsys.readouterr().err
        assert where in err and "`--fixed-batch` on the command line" in err and "Traceback" not in err, err
    assert main(["compile", f"{src}:make", "--recipe", "cleanup", "--format", "onnx,torchscript", "--out", "out",
                 "--quiet", "--bench-seconds", "0.2", "--fixed-batch"]) == 0
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 64]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["validation"]["samples"] == 256 and report["validation"]["sqnr_db"] > 100  # 256 runs at batch 1
    assert set(report["compressed"]["latency_ms"]) == {"b1"}  # timed at the batch size the files take
    with pytest.raises(SlimfxError, match="must be True or False"):
        slimfx.compile(FixedBatch().eval(), (torch.randn(1, 64),), "cleanup", dynamic_batch="no", quiet=True)


# --- the CLI: exit 2, one paragraph, nothing written -----------------------------------------------------------

def _line_of(code: str) -> int:
    return next(i for i, ln in enumerate(open(__file__), 1) if ln.strip() == code)


def _user_file(tmp_path, cls: str, example: str, convert: str = "") -> str:
    """A user's model file: this module's classes, and a factory returning (model, example inputs)."""
    src = tmp_path / "user_model.py"
    src.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.dirname(__file__)))!r})
        from tests.ir.test_hostile_inputs import {cls}

        def make():
            return {cls}(){convert}, {example}
    """))
    return str(src)


CLI_ROWS = [
    ("zero-batch", "Lin", "(torch.randn(0, 64),)", "", ["shape [0, 64], which holds no values", "at least one sample"]),
    ("returns None", "ReturnsNone", "(torch.randn(1, 4),)", "", ["returns None"]),
    ("returns constants", "ReturnsConstants", "(torch.randn(1, 4),)", "", ["output[1] is the constant int 3"]),
    ("float64", "Lin", "(torch.randn(2, 64, dtype=torch.float64),)", ".double()", ["float64", ".float()"]),
    ("meta", "Lin", "(torch.randn(2, 64),)", ".to('meta')", ["meta device", "load or initialize them"]),
    ("wrong feature dim", "Lin", "(torch.randn(1, 100),)", "", ["layer 'fc'", "1x100 and 64x10"]),
    ("LSTM projection", "ProjRecurrent", "(torch.randn(2, 5, 4),)", "", ["nn.LSTM with proj_size",
                                                                        "--format torchscript"]),
    ("undecomposable", "Undecomposable", "(torch.randn(2, 4),)", "", [
        "%data_dependent", "module 'inner', test_hostile_inputs.py:", "Capture could not decompose it",
        "torch.export", f"at test_hostile_inputs.py:{_line_of('if x.sum() > 0:')} (`if x.sum() > 0:`)", "torch.where",
        "--format torchscript", "--plugin"]),
]


@pytest.mark.parametrize("cls, example, convert, fragments", [r[1:] for r in CLI_ROWS], ids=[r[0] for r in CLI_ROWS])
def test_cli_compile_exits_2_with_one_paragraph_and_writes_nothing(cls, example, convert, fragments, tmp_path,
                                                                   capsys, monkeypatch):
    src = _user_file(tmp_path, cls, example, convert)
    monkeypatch.chdir(tmp_path)  # the user's own paths are relative; no temporary path may appear in a message
    out = tmp_path / "out"
    assert main(["compile", f"{Path(src).name}:make", "--recipe", "cleanup", "--out", "out", "--quiet",
                 "--bench-seconds", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "bug" not in err.lower(), err
    assert "def forward" not in err and "torch.ops.aten" not in err, err  # torch.export's own dumps stay out
    _check_message(err, fragments)
    assert not out.exists()


# --- validation: magnitude- and dtype-aware, fails closed -----------------------------------------------------------

class BigLogits(nn.Module):
    """Logits around 100: float32 rounding in the 256-long dot products is ~6e-5 absolute, 5e-7 relative."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(64 * 8 * 8, 256), nn.Linear(256, 1000)
        with torch.no_grad():
            self.fc2.weight.mul_(700.0)
            self.fc2.bias.mul_(700.0)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def test_large_logits_pass_their_own_fp32_export(tmp_path):
    torch.manual_seed(0)
    model, x = BigLogits().eval(), (torch.randn(32, 3, 8, 8),)
    g = ir.capture(model, x)
    res = export_onnx(g, tmp_path / "m.onnx", inputs=x)
    rep = res.validation
    assert rep.passed and 90 < model(*x).abs().max() < 200
    assert rep.max_abs_diff > 1e-5 and rep.max_rel_diff < 2e-6  # what an absolute atol of 1e-5 used to refuse
    ours = ort_session(tmp_path / "m.onnx").run(None, {"x": x[0].numpy()})[0]
    ref = model(*x).detach().numpy()
    old_rule = np.all(np.abs(ours - ref) <= 1e-5 + 1e-4 * np.abs(ref))
    assert not old_rule  # the case of issue #15 item 4 really is exercised


def test_float16_model_exports_and_validates_at_float16_precision(tmp_path):
    torch.manual_seed(0)
    model = ConvNet().half().eval()
    x = (torch.randn(4, 3, 8, 8).half(),)
    res = export_onnx(ir.capture(model, x), tmp_path / "m.onnx", inputs=x)
    assert res.validation.passed and res.validation.max_abs_diff > 0  # onnxruntime's float16 rounds differently
    assert tolerances(np.dtype(np.float16), 1e-5, 1e-4) == (4 * 2 ** -10, 4 * 2 ** -10)
    assert tolerances(np.dtype(np.float32), 1e-5, 1e-4) == (1e-5, 1e-4)
    # the same tolerances still catch a wrong float16 result
    r = np.linspace(-3, 3, 50).astype(np.float16)
    assert not compare_outputs([r * np.float16(1.03)], [r], ["output"], atol=1e-5, rtol=1e-4)["passed"]


def test_bfloat16_outputs_are_validated_at_bfloat16_precision(tmp_path):
    """A bfloat16 model (8 bits of precision) against its float32 run passes at bfloat16 precision, where
    float32 tolerances refuse it; a 25% error still fails, naming the output; a bfloat16 TorchScript file of
    the model matches it exactly."""
    torch.manual_seed(0)
    model = ConvNet().eval()
    ref = ConvNet().eval()
    ref.load_state_dict(model.state_dict())
    ref = ref.bfloat16()
    x = (torch.randn(4, 3, 8, 8).bfloat16(),)
    assert tolerances(BFLOAT16, 1e-5, 1e-4) == (4 * 2 ** -7, 4 * 2 ** -7)

    def fp32_run(factor):
        return lambda ins: [model(ins[0].float()).detach().numpy() * factor]

    rep = validate_outputs(fp32_run(1.0), ref, x)
    assert rep.passed and rep.max_abs_diff > 1e-3  # bfloat16 rounding, far above float32 tolerances
    as_fp32 = ref(*x).float().detach().numpy()
    assert not compare_outputs(fp32_run(1.0)(x), [as_fp32], ["output"], atol=1e-5, rtol=1e-4)["passed"]
    bad = validate_outputs(fp32_run(1.25), ref, x)
    assert not bad.passed and bad.failure.startswith("output: ") and "/tmp" not in bad.failure
    torch.jit.trace(ref, x).save(str(tmp_path / "m.pt"))
    exact = validate_torchscript(tmp_path / "m.pt", ref, x)
    assert exact.passed and exact.max_abs_diff == 0 and exact.compared == 4 * 5


@pytest.mark.parametrize("ours, ref, fragment", [
    ([1.0, float("nan")], [1.0, 2.0], "NaN in 1 value(s) where the reference has none"),
    ([1.0, 2.0], [1.0, float("nan")], "no NaN in 1 value(s)"),
    ([1.0, float("inf")], [1.0, 2.0], "Inf"),
    ([1.0, float("inf")], [1.0, -float("inf")], "Inf"),
])
def test_nan_or_inf_on_one_side_fails(ours, ref, fragment):
    s = compare_outputs([np.array(ours, np.float32)], [np.array(ref, np.float32)], ["output[1]"], atol=1e9, rtol=1e9)
    assert not s["passed"] and s["failure"].startswith("output[1]: ") and fragment in s["failure"]


@pytest.mark.parametrize("integer_kernels", [True, False])
def test_integer_outputs_that_differ_are_not_told_to_raise_the_tolerance(integer_kernels):
    """topk/argmax indices of an int8 graph differ where quantization made ties: exact by design, so the advice
    to raise atol/rtol (which cannot change an exact comparison) was wrong."""
    from slimfx.errors import GateError
    from slimfx.exporters._common import raise_if_invalid

    scores = [np.array([[0.5, 0.2]], np.float32), np.array([[0.5, 0.2]], np.float32)]
    ours, ref = [scores[0], np.array([[1, 3]], np.int64)], [scores[1], np.array([[1, 2]], np.int64)]
    stats = compare_outputs(ours, ref, ["values", "indices"], atol=1e-5, rtol=1e-4)
    assert not stats["passed"] and stats["integer_failure"] and "compared exactly" in stats["failure"]
    report = ValidationReport(atol=1e-5, rtol=1e-4, **stats)
    with pytest.raises(GateError) as e:
        raise_if_invalid(report, "model.onnx", False, integer_kernels=integer_kernels)
    msg = str(e.value)
    assert "no tolerance loosens" in msg and "raise the tolerance" not in msg
    assert ("quantize's `skip`" in msg) == integer_kernels
    floats = compare_outputs([scores[0] + 1], [scores[1]], ["values"], atol=1e-5, rtol=1e-4)
    assert not floats["integer_failure"]  # a float output that differs: the tolerance advice stands
    with pytest.raises(GateError, match="raise the tolerance"):
        raise_if_invalid(ValidationReport(atol=1e-5, rtol=1e-4, **floats), "model.onnx", False, True)


def test_matching_nan_and_inf_positions_pass():
    a = np.array([1.0, float("nan"), float("inf"), 2.0], np.float32)
    assert compare_outputs([a.copy()], [a], ["output"], atol=1e-5, rtol=1e-4)["passed"]


def test_a_report_that_compares_nothing_does_not_pass(tmp_path):
    class Empty(nn.Module):
        def forward(self, x):
            return x[:, :0]

    model, x = Empty().eval(), (torch.randn(2, 3),)
    with pytest.raises(ValidationError, match="no values were compared"):
        export_torchscript(ir.capture(model, x), tmp_path / "m.pt", inputs=x)
    assert list(tmp_path.iterdir()) == []


def test_every_output_is_compared_and_named_by_its_place_in_the_model():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return {"logits": self.a(x), "aux": (x, self.b(x))}

    model, x = Heads().eval(), (torch.randn(2, 4),)
    g = ir.capture(model, x)
    proto = to_onnx_model(g, inputs=x)  # holds copies of the weights
    assert validate_onnx(proto, g, [x]).passed
    with torch.no_grad():
        g.params["b.weight"].add_(0.5)  # the reference's second head moves; the file's does not
    rep = validate_onnx(proto, g, [x])
    assert not rep.passed and rep.failure.startswith("output['aux'][1] ('aux_1' in the file): ")
    assert [o.name for o in proto.graph.output] == ["logits", "aux_0", "aux_1"]  # the model's own names
    assert rep.worst_output.startswith("output['aux'][1]") and rep.n_outputs == 3


def test_validation_error_names_the_output_not_a_temporary_file(tmp_path, monkeypatch):
    from slimfx.exporters.onnx.context import EMITTERS

    monkeypatch.setitem(EMITTERS, "relu", lambda ctx, node: ctx.emit("Sigmoid", [ctx.value(node.inputs[0])]))

    class Act(nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2

    with pytest.raises(ValidationError) as e:
        export_onnx(ir.capture(Act(), (torch.randn(3, 4),)), tmp_path / "deep" / "m.onnx")
    msg = str(e.value)
    assert "disagrees with the model: output: " in msg and "No file was written" in msg
    assert str(tmp_path) not in msg and "--atol" in msg and "[validate]" in msg
    # a check that failed: exit 3 on the command line, as the README says, not 2 (a user error)
    from slimfx.cli import main

    (tmp_path / "act.py").write_text("import torch\n\nclass Act(torch.nn.Module):\n    def forward(self, x):\n"
                                     "        return torch.relu(x) * 2\n\ndef make():\n"
                                     "    return Act(), (torch.randn(3, 4),)\n")
    monkeypatch.chdir(tmp_path)
    assert main(["export", "act.py:make", "-o", "act.onnx"]) == 3 and not (tmp_path / "act.onnx").exists()


def test_report_json_is_strict():
    rep = ValidationReport(passed=False, max_abs_diff=float("inf"), max_rel_diff=float("nan"), cosine=0.0,
                           sqnr_db=-float("inf"), top1_agreement=None, atol=1e-5, rtol=1e-4)
    import json

    json.dumps(rep.to_dict(), allow_nan=False)
    assert rep.to_dict()["exact"] is False


# --- source lines -----------------------------------------------------------------------------------------------

def test_library_code_beside_torch_is_not_taken_for_torch(tmp_path, monkeypatch):
    """`.../site-packages/torch` is a prefix of `.../site-packages/torchvision`: the latter's lines are the
    model's source, not torch internals (issue #15 item 10). Simulated with a fake `lib` next to `libvision`."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "libvision").mkdir()
    (tmp_path / "libvision" / "vision_block.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)

            def forward(self, x):
                return self.fc(x).relu()
    """))
    monkeypatch.syspath_prepend(str(tmp_path / "libvision"))
    import vision_block

    monkeypatch.setattr(capture_mod, "_INTERNAL_DIRS", capture_mod._INTERNAL_DIRS + (str(tmp_path / "lib"),))
    assert capture_mod.is_internal_file(str(tmp_path / "libvision" / "vision_block.py"))  # the old prefix test
    monkeypatch.setattr(capture_mod, "_INTERNAL_DIRS",
                        capture_mod._INTERNAL_DIRS[:-1] + (os.path.join(str(tmp_path / "lib"), ""),))
    assert not capture_mod.is_internal_file(str(tmp_path / "libvision" / "vision_block.py"))
    g = ir.capture(vision_block.Block(), (torch.randn(2, 4),))
    assert g.find("relu")[0].source == "vision_block.py:10"
    assert g.inputs[0].source is None  # nodes fx makes itself have no line (not the caller's)


def test_torch_dir_prefix_does_not_swallow_torchvision():
    torch_dir = os.path.dirname(torch.__file__)
    assert capture_mod.is_internal_file(os.path.join(torch_dir, "nn", "modules", "linear.py"))
    assert not capture_mod.is_internal_file(torch_dir + "vision" + os.sep + "models" + os.sep + "resnet.py")
    # torch.export writes some of its own frames relative to site-packages
    assert capture_mod.is_internal_file(os.path.join("torch", "fx", "passes", "runtime_assert.py"))
    assert not capture_mod.is_internal_file(os.path.join("torchvision", "models", "resnet.py"))


# --- property: never an internal error --------------------------------------------------------------------------

class FuzzNet(nn.Module):
    def __init__(self, cin: int, convs: list[tuple[int, int, int]], flat: int | None, hidden: int, out: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = cin
        for cout, k, stride in convs:
            layers += [nn.Conv2d(c, cout, k, stride=stride, padding=k // 2), nn.ReLU()]
            c = cout
        self.features = nn.Sequential(*layers)
        self.pool = flat is None
        self.fc1 = nn.Linear(c if flat is None else flat, hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x):
        if self.features:
            x = self.features(x)
            x = x.mean((2, 3)) if self.pool else torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


def _conv_out(size: int, convs: list[tuple[int, int, int]]) -> int:
    for _, k, stride in convs:
        size = (size + 2 * (k // 2) - k) // stride + 1
    return size


@st.composite
def fuzz_case(draw):
    torch.manual_seed(draw(st.integers(0, 999)))
    batch = draw(st.integers(1, 4))
    if draw(st.booleans()):  # an MLP on [batch, features]
        feat = draw(st.integers(1, 16))
        model = FuzzNet(feat, [], None, draw(st.integers(1, 12)), draw(st.integers(1, 6)))
        shape = [batch, feat if draw(st.integers(0, 9)) else feat + 1]  # sometimes the wrong width
    else:
        cin = draw(st.sampled_from([1, 3]))
        convs = [(draw(st.integers(1, 8)), draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 2])))
                 for _ in range(draw(st.integers(1, 3)))]
        size = draw(st.integers(1, 10))
        flat = None if draw(st.booleans()) else convs[-1][0] * _conv_out(size, convs) ** 2
        model = FuzzNet(cin, convs, flat, draw(st.integers(1, 12)), draw(st.integers(1, 6)))
        side = size if draw(st.integers(0, 9)) else size + 1  # sometimes an example the model was not built for
        shape = [batch, cin, side, side]
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float16]))
    return model.eval().to(dtype), (torch.randn(shape).to(dtype),)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=fuzz_case())
def test_random_nets_capture_lower_and_export_or_refuse_cleanly(case, tmp_path_factory):
    model, x = case
    path = tmp_path_factory.mktemp("fuzz") / "m.onnx"
    try:
        g = ir.capture(model, x)
        gm = ir.lower(g)
        with torch.no_grad():
            assert torch.equal(gm(*x), model(*x))
        res = export_onnx(g, path, inputs=x)
    except SlimfxError as e:
        assert not isinstance(e, ValidationError), f"onnxruntime disagrees: {e}"
        _check_message(str(e), [])
        event(f"refused: {type(e).__name__}")
        return
    event(f"exported {x[0].dtype}")
    assert res.validation.passed and res.validation.compared > 0
    other = tuple(torch.randn(5, *t.shape[1:]).to(t.dtype) for t in x)  # another batch size, fresh data
    rep = validate_onnx(path, model, [other])
    assert rep.passed, rep.summary()
