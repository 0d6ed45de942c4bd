"""`slimfx distill` as a user runs it (issue #18): a student file, --baseline side by side, --json, per-epoch lines
off a terminal, automatic attention-transfer pairs, --threads, and one DDP job under torchrun equal to one process.

Small data (digits, 512 train samples) and students without BatchNorm keep each run to seconds; plain shells
(subprocess), so nothing is a terminal.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimfx.cli import main

BIN = Path(sys.executable).parent
DATA = """\
import torch
from sklearn.datasets import load_digits

import slimfx


def make_data():
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(d.target)
    return slimfx.Data(train=(x[:512], y[:512]), validation=(x[512:704], y[512:704]), test=(x[704:1024], y[704:1024]))
"""
STUDENT = """\
import torch.nn as nn


def make():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 10))
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "data.py").write_text(DATA)
    (tmp_path / "student.py").write_text(STUDENT)
    return tmp_path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _slimfx(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "slimfx"), *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=600)


def test_user_story_student_file_with_baseline_shows_both_numbers(project):
    r = _slimfx("distill", "digits_cnn", "--student", "student.py:make", "--baseline", "--epochs", "2",
                "--json", "report.json", cwd=project)
    assert r.returncode == 0, r.stderr
    report = json.loads((project / "report.json").read_text())
    s, b = report["student"], report["baseline"]
    assert report["splits"] == {"best_epoch": "validation", "accuracy": "test", "validation_samples": 179,
                                "test_samples": 359}
    assert (s["loss"], b["loss"]) == (report["settings"]["loss"], "ce") and s["params"] == b["params"] == 1370
    assert [len(s["history"]), len(b["history"])] == [2, 2]
    assert s["validation_accuracy"] == max(h["accuracy"] for h in s["history"])
    out = r.stdout
    assert "best epoch chosen on the validation split (179 samples); accuracy on the test split (359 samples)" in out
    assert f"distilled ({s['loss']})" in out and f"{s['test_accuracy'] * 100:.2f}" in out
    assert "from scratch (ce)" in out and f"{b['test_accuracy'] * 100:.2f}" in out
    gain = (s["test_accuracy"] - b["test_accuracy"]) * 100
    assert f"distillation vs from scratch: {gain:+.2f} pt on test (same epochs, lr, batches, augmentation " \
           f"{report['settings']['augment']} and seed)" in out
    # not a terminal: one log line per epoch and arm instead of a progress bar
    assert "distill epoch 2/2: loss=" in r.stderr and "baseline epoch 2/2: loss=" in r.stderr
    assert "accuracy is on the validation split" in r.stderr and "\r" not in r.stderr
    assert torch.load(project / "student.pt").keys() == {"0.weight", "0.bias", "4.weight", "4.bias"}


def test_attention_transfer_pairs_are_automatic_and_printed_and_named_pairs_win(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    argv = ["distill", "digits_cnn", "--student", "student.py:make", "--data", "data.py:make_data", "--epochs", "1",
            "--loss", "at+kd", "--quiet", "--json", "r.json", "--threads", "2"]
    assert main(argv) == 0
    assert torch.get_num_threads() == 2
    out = capsys.readouterr().out
    # student: conv at 8x8, then pooled to 4x4; teacher digits_cnn: convs at 8x8 and 4x4, pooled to 2x2. The
    # student's 4x4 map is its 8x8 stage pooled, so it is not paired with the teacher's third conv stage
    assert "attention-transfer pairs (student:teacher): _1:features_1_2\n" in out
    assert json.loads((project / "r.json").read_text())["student"]["features"] == ["_1:features_1_2"]
    assert main([*argv, "--features", "_0:features_0_0", "--threads", "1"]) == 0
    assert "attention-transfer pairs (student:teacher): _0:features_0_0\n" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--loss", "kd", "--features", "a:b"], "--features names attention-transfer pairs, but --loss kd has no"),
    (["--loss", "ctkd", "--T", "0.5"], "--loss ctkd starts its learned temperature at --T"),
    (["--json", "student.pt"], "--json and --out name the same file"),
    (["--threads", "0"], "argument --threads: invalid value '0'"),
    (["--beta", "-1"], "argument --beta: invalid value '-1'"),
    (["--student", "student.py"], "student.py looks like a file: name the callable"),
    (["--augment", "crop"], "argument --augment: unknown augment 'crop'; use 'none', 'mixup'"),
])
def test_distill_user_errors_exit_2_with_the_fix(project, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(project)
    argv = ["distill", "digits_cnn", "--student", "student.py:make", "--data", "data.py:make_data", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (project / "student.pt").exists()


UNLABELLED = """\
import slimfx
from data import make_data as labelled


def train_only():
    d = labelled()
    return slimfx.Data(train=(d.train[0], None), validation=d.validation, test=d.test)


def validation_too():
    d = labelled()
    return slimfx.Data(train=(d.train[0], None), validation=(d.validation[0], None))
"""


@pytest.mark.parametrize("spec, extra, message", [
    ("train_only", [], "the train split has no labels, but --loss kd with --alpha 0.9 has a cross-entropy term on "
                       "labels; give train as (inputs, labels), or use --alpha 1"),
    ("train_only", ["--loss", "at"], "or use --loss at+kd --alpha 1"),
    ("train_only", ["--alpha", "1", "--baseline"], "the train split has no labels, so --baseline (the student "
                                                   "trained from scratch on labels) cannot run"),
    ("validation_too", ["--alpha", "1"], "the validation split has no labels, but distill chooses the best epoch by "
                                         "validation accuracy"),
])
def test_unlabelled_splits_exit_2_naming_the_split_and_the_flag(project, capsys, monkeypatch, spec, extra, message):
    """(x, None) splits were read as two batches ("data.train, batch 1 is a NoneType"); with that fixed, an
    unlabelled validation split crashed (float(None), exit 1) and --baseline on unlabelled train too (exit 1)."""
    monkeypatch.chdir(project)
    (project / "unlabelled.py").write_text(UNLABELLED)
    argv = ["distill", "student.py:make", "--student", "student.py:make", "--data", f"unlabelled.py:{spec}",
            "--epochs", "1", "--quiet", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (project / "student.pt").exists()


def test_kd_on_unlabelled_train_data_with_alpha_1_runs(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    (project / "unlabelled.py").write_text(UNLABELLED)
    assert main(["distill", "digits_cnn", "--student", "student.py:make", "--data", "unlabelled.py:train_only",
                 "--epochs", "5", "--alpha", "1", "--augment", "none", "--quiet", "--json", "r.json"]) == 0
    report = json.loads((project / "r.json").read_text())
    assert report["student"]["test_accuracy"] > 0.5 and len(report["student"]["history"]) == 5


def test_augment_reaches_both_arms_and_the_report(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    argv = ["distill", "digits_cnn", "--student", "student.py:make", "--data", "data.py:make_data", "--epochs", "1",
            "--baseline", "--quiet", "--json", "r.json"]
    runs = {}
    for aug in ("none", "mixup:0.5", "mixup:0.5"):
        assert main([*argv, "--augment", aug]) == 0
        report = json.loads((project / "r.json").read_text())
        assert report["settings"]["augment"] == aug
        runs.setdefault(aug, []).append([report[k]["history"][0]["loss"] for k in ("student", "baseline")])
    (plain,), (mixed, again) = runs["none"], runs["mixup:0.5"]
    assert mixed == again  # seeded
    assert mixed[0] != plain[0] and mixed[1] != plain[1]  # the distilled student and the scratch baseline both mix


TOKENS = """\
import torch
import torch.nn as nn

import slimfx


def make_data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 50, (96, 6), generator=g), torch.randint(0, 3, (96,), generator=g)
    return slimfx.Data(train=(x[:64], y[:64]), validation=(x[64:], y[64:]))


def model():
    return nn.Sequential(nn.Embedding(50, 4), nn.Flatten(), nn.Linear(24, 3))
"""


def test_default_mixup_on_token_ids_is_refused_before_training_with_the_flag_that_fixes_it(project, capsys,
                                                                                           monkeypatch):
    monkeypatch.chdir(project)
    (project / "tokens.py").write_text(TOKENS)
    argv = ["distill", "tokens.py:model", "--student", "tokens.py:model", "--data", "tokens.py:make_data",
            "--epochs", "1", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--augment mixup:1 (the default) does not fit this data" in err and "(on the command line: --augment " \
        "none)" in err and "input 0 is [32, 6] (torch.int64)" in err and not (project / "student.pt").exists()
    assert main([*argv, "--augment", "none"]) == 0 and (project / "student.pt").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("torchrun", path=str(BIN)) is None, reason="torchrun not installed")
def test_torchrun_two_ranks_are_one_job_equal_to_one_process(project):
    args = ["distill", "digits_cnn", "--student", "student.py:make", "--data", "data.py:make_data", "--epochs", "2"]
    one = _slimfx(*args, "--out", "one.pt", "--json", "one.json", cwd=project)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={_free_port()}",
                          "-m", "slimfx", *args, "--out", "two.pt", "--json", "two.json"],
                         cwd=project, env=_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote two.pt, two.json") == 1  # rank 0 alone reports
    assert two.stderr.count("distill epoch 2/2") == 1
    assert sorted(p.name for p in project.iterdir() if p.suffix in (".pt", ".json")) == [
        "one.json", "one.pt", "two.json", "two.pt"]  # and writes; no partial files left by rank 1
    w1, w2 = torch.load(project / "one.pt"), torch.load(project / "two.pt")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4)
    r1, r2 = (json.loads((project / f).read_text()) for f in ("one.json", "two.json"))
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    for h1, h2 in zip(r1["student"]["history"], r2["student"]["history"], strict=True):
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-5) and h2["accuracy"] == h1["accuracy"]
    assert r2["student"]["test_accuracy"] == r1["student"]["test_accuracy"]


def test_a_world_size_without_torchrun_is_a_user_error(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        monkeypatch.delenv(var, raising=False)
    assert main(["distill", "digits_cnn", "--student", "student.py:make", "--data", "data.py:make_data"]) == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT are not set" in err and "torchrun --nproc_per_node=N" in err
