"""Issue #13's user story, end to end: a user's own CNN file and data, compiled with prune50 from a plain shell.

Without data the gate cannot measure accuracy, so it fails closed (exit 3, nothing in --out, the report's
headline and the message say why); with `--data` fine-tuning runs, the gate passes on validation data, and
the test accuracy in report.json is what an independent onnxruntime run of the written file gives.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

PROJECT = Path(__file__).resolve().parent / "fixtures" / "user_project"


def _project_modules(project: Path):
    """The project's own `data` and `net` modules, imported from its folder (and forgotten again)."""
    sys.path.insert(0, str(project))
    for name in ("data", "net"):  # another test's project may have left modules of those names loaded
        sys.modules.pop(name, None)
    try:
        import data
        import net
        return data, net
    finally:
        sys.path.remove(str(project))
        sys.modules.pop("data", None)
        sys.modules.pop("net", None)


def _train_user_model(project: Path) -> None:
    data, net = _project_modules(project)
    splits, UserCNN = data.splits, net.UserCNN
    torch.manual_seed(0)
    (xt, yt), _, _ = splits()
    model = UserCNN()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(8):
        model.train()
        perm = torch.randperm(len(yt))
        for i in range(0, len(yt), 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.save(model.eval().state_dict(), project / "weights.pt")


def _slimfx(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("slimfx")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_prune50_on_a_user_cnn_fails_closed_without_data_and_reports_true_accuracy_with_it(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns("__pycache__"))
    _train_user_model(project)

    r = _slimfx("compile", "net.py:make", "--recipe", "prune50", "--out", "out", "--bench-seconds", "0.05",
                cwd=project)
    assert r.returncode == 3, r.stderr
    assert not (project / "out").exists() and not list(project.glob(".out*"))
    assert "max_accuracy_drop: needs labelled validation data" in r.stderr
    assert "finetune skipped: no train data" in r.stderr and "Traceback" not in r.stderr

    r = _slimfx("compile", "net.py:make", "--recipe", "prune50", "--data", "data.py:make_data", "--out", "out",
                "--bench-seconds", "0.05", cwd=project)
    assert r.returncode == 0, r.stderr
    report = json.loads((project / "out" / "report.json").read_text())
    assert report["gate"]["passed"] and report["validation"]["split"] == "validation"
    assert report["data"]["accuracy_split"] == "test" and report["compressed"]["macs"] < 0.3 * report["baseline"]["macs"]
    assert not report["headline"], report["headline"]  # nothing skipped, real data throughout

    _, _, (x_test, y_test) = _project_modules(project)[0].splits()
    sess = ort.InferenceSession(str(project / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: x_test.numpy()})[0]
    independent = float((np.argmax(logits, 1) == y_test.numpy()).mean())
    assert abs(independent - report["compressed"]["accuracy"]) <= 0.001
    assert report["compressed"]["accuracy"] >= report["baseline"]["accuracy"] - 0.03


def test_distill_takes_the_users_data_and_chooses_the_best_epoch_on_validation(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns("__pycache__"))
    (project / "student.py").write_text(
        "import torch.nn as nn\n\n\ndef make():\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))\n")
    r = _slimfx("distill", "digits_cnn", "--student", "student.py:make", "--data", "data.py:make_data",
                "--epochs", "2", "--out", "s.pt", "--quiet", cwd=project)
    assert r.returncode == 0, r.stderr
    assert ("data data.py:make_data: best epoch chosen on the validation split (250 samples); accuracy on the test "
            "split") in r.stdout
    assert (project / "s.pt").is_file()
    r = _slimfx("distill", "digits_cnn", "--student", "student.py:make", "--data", "data.py:make_data",
                "--dataset", "digits", cwd=project)
    assert r.returncode == 2 and "either --data" in r.stderr


def test_validate_and_inspect_take_the_users_data(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns("__pycache__"))
    _train_user_model(project)
    assert _slimfx("export", "net.py:make", "-o", "m.onnx", cwd=project).returncode == 0
    r = _slimfx("validate", "m.onnx", "--model", "net.py:make", "--data", "data.py:make_data", cwd=project)
    assert r.returncode == 0, r.stderr
    assert "m.onnx on the validation data of data.py:make_data (250 samples): pass" in r.stdout
    r = _slimfx("inspect", "net.py:make", "--data", "data.py:make_data", "--format", "text", cwd=project)
    assert r.returncode == 0, r.stderr
    assert "f32[batch:64, 1, 8, 8]" in r.stdout  # captured with a batch of the data (batch size 64)
