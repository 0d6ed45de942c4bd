"""Hostile inputs through every CLI interface (issue #13): each user mistake exits 2 with one paragraph that
names what is wrong (no traceback), before any work, and leaves no file behind.

One row per case: (argv, expected exit code, message fragment, paths that must not exist afterwards).
Rows run in-process (`slimfx.cli.main`) in a shared folder of fixtures (the working directory); only the
sys.path / console-script cases run in a subprocess.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from slimfx.cli import main

USER = textwrap.dedent("""
    import torch, torch.nn as nn

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 3)).eval()

    def build():
        return net(), (torch.randn(2, 3, 8, 8),)

    def wide():
        return net(), (torch.randn(1, 3, 12, 12),)

    def flat():
        torch.manual_seed(0)
        return nn.Linear(5, 3).eval(), (torch.randn(2, 5),)

    def as_int():
        return net(), (torch.zeros(2, 3, 8, 8, dtype=torch.int64),)

    class Two(nn.Module):
        def forward(self, a, b):
            return a + b

    def two_inputs():
        return Two(), (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8))

    class TwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = net()
        def forward(self, x):
            y = self.m(x)
            return y, y * 2

    def two_outputs():
        return TwoOut().eval(), (torch.randn(2, 3, 8, 8),)

    def nan_model():
        m = net()
        with torch.no_grad():
            m[4].bias.fill_(float("nan"))
        return m, (torch.randn(2, 3, 8, 8),)

    def boom():
        raise RuntimeError("kaboom: the factory failed")

    def none_inputs():
        return net(), None

    def str_inputs():
        return net(), "x"

    def not_a_module():
        return 42

    def four():
        return net(), (torch.randn(2, 3, 8, 8),), {}, 1

    def zero_batch():
        return net(), (torch.randn(0, 3, 8, 8),)

    def scalar():
        return net(), (torch.tensor(1.0),)

    def meta():
        with torch.device("meta"):
            m = nn.Linear(4, 3)
        return m, (torch.randn(2, 4),)

    def bad_kwargs():
        return net(), (torch.randn(2, 3, 8, 8),), [1]

    NOT_CALLABLE = 3
""")

TEACHER = textwrap.dedent("""
    import torch.nn as nn

    def make():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
""")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile")
    (d / "user.py").write_text(USER)
    (d / "teacher.py").write_text(TEACHER)
    (d / "broken.py").write_text("import torch\ndef make(:\n")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        assert main(["export", "user.py:build", "-o", "good.onnx"]) == 0
        assert main(["export", "user.py:build", "-o", "fixed.onnx", "--fixed-batch"]) == 0
        assert main(["export", "user.py:build", "--format", "torchscript", "-o", "good.pt"]) == 0
    finally:
        os.chdir(cwd)
    good = (d / "good.onnx").read_bytes()
    (d / "empty.onnx").write_bytes(b"")
    (d / "trunc.onnx").write_bytes(good[: len(good) // 2])
    (d / "random.onnx").write_bytes(bytes([0x37]) + np.random.default_rng(0).bytes(4000))
    (d / "text.onnx").write_text("this is not a model\n")
    (d / "image.onnx").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (d / "image.py").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    ts = (d / "good.pt").read_bytes()
    (d / "corrupt.pt").write_bytes(ts[: len(ts) // 3])
    torch.save(torch.nn.Linear(2, 2).state_dict(), d / "state.pt")
    nan = onnx.load(str(d / "good.onnx"))  # the same graph with a NaN bias: its outputs are NaN, the model's not
    bias = next(i for i in nan.graph.initializer if i.dims == [3])
    bias.CopyFrom(onnx.numpy_helper.from_array(np.full(3, np.nan, np.float32), bias.name))
    onnx.save(nan, str(d / "nan.onnx"))
    (d / "adir").mkdir()
    (d / "adir" / "keep.txt").write_text("keep")
    os.mkfifo(d / "fifo")
    (d / "int8").mkdir()  # folders and files named like built-in recipes must not shadow them
    (d / "int8-dynamic").write_text("not toml [")
    (d / "myrecipe.toml").write_text('[[passes]]\nname = "dce"\n')
    (d / "deep.toml").write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    (d / "pkg").mkdir()
    (d / "pkg" / "__init__.py").write_text("")
    (d / "pkg" / "students.py").write_text(TEACHER)
    return d


@pytest.fixture
def in_work(work, monkeypatch):
    monkeypatch.chdir(work)
    return work


def _socket(work: Path) -> Path:
    path = work / "sock"
    if not path.exists():
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    return path


BAD_FILES = [
    ("adir", "adir is a directory"),
    ("missing.onnx", "missing.onnx does not exist"),
    ("empty.onnx", "empty.onnx is not an ONNX model (it is an empty file)"),
    ("trunc.onnx", "trunc.onnx is not a"),
    ("random.onnx", "random.onnx is not an ONNX model (unrecognized binary data)"),
    ("text.onnx", "text.onnx is not an ONNX model (it is a text file)"),
    ("image.onnx", "image.onnx is not an ONNX model (it starts like a PNG image)"),
    ("corrupt.pt", "corrupt.pt is not a readable TorchScript file"),
    ("", "an empty path"),
]

CASES = [
    # --- validate: files that are not models, or models of another model -------------------------------------
    *[(["validate", f, "--model", "user.py:build"], 2, msg.replace("ONNX model", "ONNX or TorchScript model"), [])
      for f, msg in BAD_FILES],
    (["validate", "state.pt", "--model", "user.py:build"], 2, "state.pt is a torch.save checkpoint", []),
    (["validate", "good.onnx", "--model", "user.py:wide"], 2,
     "good.onnx takes input float32[batch, 3, 8, 8] but wide takes float32[1, 3, 12, 12]", []),
    (["validate", "good.onnx", "--model", "user.py:as_int"], 2,
     "good.onnx takes input float32[batch, 3, 8, 8] but as_int takes int64[2, 3, 8, 8]", []),
    (["validate", "good.onnx", "--model", "user.py:two_inputs"], 2, "good.onnx takes 1 input (float32[batch, 3, 8, 8]) "
     "but two_inputs takes 2", []),
    (["validate", "good.onnx", "--model", "user.py:two_outputs"], 2, "good.onnx gives 1 output but two_outputs gives 2",
     []),
    (["validate", "good.pt", "--model", "user.py:flat"], 2, "good.pt fails on flat's inputs at batch 1 (float32[1, 5])",
     []),
    (["validate", "good.onnx", "--model", "user.py:flat"], 2, "good.onnx takes input float32[batch, 3, 8, 8] but flat "
     "takes float32[2, 5]", []),
    (["validate", "good.pt", "--model", "user.py:two_outputs"], 2, "good.pt gives 1 output but two_outputs gives 2", []),
    (["validate", "fixed.onnx", "--model", "user.py:build"], 2, "fixed.onnx has a fixed batch size of 2 (input 'input' "
     "is float32[2, 3, 8, 8]); check it with --batch 2", []),
    (["validate", "good.onnx", "--model", "user.py:nan_model"], 2, "nan_model's outputs at batch 1 hold no finite "
     "values", []),
    (["validate", "nan.onnx", "--model", "user.py:build"], 3, "nan.onnx does not match build: output 0 holds 3 NaN/Inf "
     "values where the model's are finite", []),
    (["validate", "good.onnx", "--model", "user.py:build", "--batch", "0"], 2,
     "argument --batch: invalid value '0': give batch sizes as whole numbers from 1 to 65536", []),
    (["validate", "good.onnx", "--model", "user.py:build", "--batch", ""], 2, "argument --batch: invalid value ''", []),
    (["validate", "good.onnx", "--model", "user.py:build", "--batch", "1,-3"], 2, "invalid value '1,-3'", []),
    (["validate", "good.onnx", "--model", "user.py:build", "--batch", "abc"], 2, "invalid value 'abc'", []),
    (["validate", "good.onnx", "--model", "user.py:build", "--atol", "inf"], 2,
     "argument --atol: invalid value 'inf': a tolerance must be a finite number at least 0", []),
    (["validate", "good.onnx", "--model", "user.py:build", "--rtol", "nan"], 2, "argument --rtol: invalid value 'nan'",
     []),
    (["validate", "good.onnx", "--model", "user.py:build", "--atol", "-1"], 2, "argument --atol: invalid value '-1'",
     []),
    (["validate", "good.onnx", "--model", "user.py:boom"], 2, "calling boom() raised RuntimeError: kaboom", []),
    # --- bench -------------------------------------------------------------------------------------------------
    *[(["bench", f], 2, msg, []) for f, msg in BAD_FILES if f.endswith(".onnx") or f in ("adir", "")],
    (["bench", "state.pt"], 2, "state.pt is not an ONNX model (it is a torch.save checkpoint", []),
    (["bench", "good.pt"], 2, "good.pt is not an ONNX model (it is a TorchScript file", []),
    (["bench", "corrupt.pt"], 2, "corrupt.pt is not an ONNX model (it is a truncated or corrupt zip archive", []),
    (["bench", "user.py:build"], 2, "user.py:build does not exist as a file: it is a MODEL spec, and this command "
     "takes an exported file; export it first, e.g. `slimfx export user.py:build --format onnx -o model.onnx`", []),
    (["bench", "mlp"], 2, "mlp does not exist as a file: it is a MODEL spec", []),
    (["validate", "user.py:build", "--model", "user.py:build"], 2, "user.py:build does not exist as a file: it is a "
     "MODEL spec", []),
    (["bench", "good.onnx", "--batch", "abc"], 2, "argument --batch: invalid value 'abc'", []),
    (["bench", "good.onnx", "--batch", "-3"], 2, "argument --batch: invalid value '-3'", []),
    (["bench", "good.onnx", "--batch", "0"], 2, "argument --batch: invalid value '0'", []),
    (["bench", "good.onnx", "--runs", "0"], 2, "argument --runs: invalid value '0': timed runs must be a whole number "
     "from 1 to 1000000", []),
    (["bench", "good.onnx", "--rounds", "0"], 2, "argument --rounds: invalid value '0'", []),
    (["bench", "good.onnx", "--threads", "0"], 2, "argument --threads: invalid value '0': the thread count must be a "
     "whole number from 1 to 1024", []),
    (["bench", "good.onnx", "fixed.onnx", "--batch", "1", "--runs", "3", "--rounds", "1"], 0, "fixed.onnx batch 2", []),
    # --- compile: arguments, recipes and model specs, all refused before any work ----------------------------------
    (["compile", "user.py:build", "--recipe", "cleanup", "--out", "out", "--bench-seconds", "nan"], 2,
     "argument --bench-seconds: invalid value 'nan': the timed budget in seconds must be a finite number at least 0 "
     "and at most 3600", ["out"]),
    (["compile", "user.py:build", "--out", "out", "--bench-seconds", "inf"], 2, "invalid value 'inf'", ["out"]),
    (["compile", "user.py:build", "--out", "out", "--bench-seconds", "-1"], 2, "invalid value '-1'", ["out"]),
    (["compile", "user.py:build", "--recipe", "cleanup", "--format", "onnx", "--out", "out", "--bench-seconds", "0"],
     0, "latency not measured", []),  # 0 is no latency report, as --no-bench and bench_seconds=0
    (["compile", "user.py:build", "--out", "out", "--seed", str(2**70)], 2,
     f"argument --seed: invalid value '{2**70}': the seed must be a whole number from 0 to 4294967295", ["out"]),
    (["compile", "user.py:build", "--out", "out", "--seed", "-1"], 2, "argument --seed: invalid value '-1'", ["out"]),
    (["compile", "user.py:build", "--out", "out", "--threads", "0"], 2, "argument --threads: invalid value '0'", ["out"]),
    (["compile", "user.py:build", "--out", "out", "--calibration-samples", "0"], 2,
     "argument --calibration-samples: invalid value '0'", ["out"]),
    (["compile", "user.py:build", "--out", "out", "--format", "tflite"], 2,
     "argument --format: invalid value 'tflite': unknown format 'tflite'; formats are onnx, torchscript", ["out"]),
    (["compile", "user.py:build", "--out", "", "--recipe", "cleanup"], 2, "argument -o/--out: an empty path", []),
    (["compile", "user.py:build", "--recipe", "deep.toml", "--out", "out"], 2, "recipe deep.toml: nested too deeply",
     ["out"]),
    (["compile", "user.py:build", "--recipe", "./int8", "--out", "out"], 2,
     "recipe file ./int8 is a folder, not a TOML file", ["out"]),
    (["compile", "user.py:build", "--recipe", "myrecipe", "--out", "out"], 2,
     "unknown recipe 'myrecipe'; built-in recipes:", ["out"]),
    (["compile", "user.py:build", "--recipe", "myrecipe", "--out", "out"], 2,
     "to use the file myrecipe.toml here, write ./myrecipe.toml", ["out"]),
    (["compile", "user.py:build", "--recipe", "int9", "--out", "out"], 2, "unknown recipe 'int9' (did you mean 'int8'",
     ["out"]),
    (["compile", "user.py:boom", "--recipe", "cleanup", "--out", "out"], 2,
     "model spec 'user.py:boom': calling boom() raised RuntimeError: kaboom: the factory failed (run with --debug",
     ["out"]),
    (["compile", "user.py:none_inputs", "--recipe", "cleanup", "--out", "out"], 2,
     "returned (module, None) but the second item must be the example inputs; return (module, example_inputs)",
     ["out"]),
    (["compile", "user.py:str_inputs", "--recipe", "cleanup", "--out", "out"], 2,
     "returned (module, a string 'x') but the second item must be the example inputs", ["out"]),
    (["compile", "user.py:not_a_module", "--recipe", "cleanup", "--out", "out"], 2,
     "returned int; it must return (module, example_inputs): an nn.Module and a tensor or a tuple of tensors", ["out"]),
    (["compile", "user.py:four", "--recipe", "cleanup", "--out", "out"], 2,
     "returned a tuple of 4 (Sequential, tuple, dict, int); it must return (module, example_inputs)", ["out"]),
    (["compile", "user.py:bad_kwargs", "--recipe", "cleanup", "--out", "out"], 2,
     "the third item must be a dict of keyword inputs", ["out"]),
    (["compile", "user.py:zero_batch", "--recipe", "cleanup", "--out", "out"], 2,
     "example input 0 has shape [0, 3, 8, 8], which holds no values", ["out"]),
    (["compile", "user.py:scalar", "--recipe", "cleanup", "--out", "out"], 2, "example input 0 is a 0-d tensor",
     ["out"]),
    (["compile", "user.py:meta", "--recipe", "cleanup", "--out", "out"], 2, "is on the meta device, so it has no weights",
     ["out"]),
    (["compile", "user.py:NOT_CALLABLE", "--recipe", "cleanup", "--out", "out"], 2, "returned int", ["out"]),
    (["compile", "user.py:nope", "--recipe", "cleanup", "--out", "out"], 2, "has no attribute 'nope'", ["out"]),
    (["compile", "broken.py:make", "--recipe", "cleanup", "--out", "out"], 2,
     "could not import model file 'broken.py' from model spec 'broken.py:make': SyntaxError", ["out"]),
    (["compile", "nofile.py:make", "--recipe", "cleanup", "--out", "out"], 2, "model file 'nofile.py' does not exist",
     ["out"]),
    (["compile", "adir/x.py:make", "--recipe", "cleanup", "--out", "out"], 2, "model file 'adir/x.py' does not exist",
     ["out"]),
    (["compile", "user.py", "--recipe", "cleanup", "--out", "out"], 2, "user.py looks like a file: name the callable",
     ["out"]),
    (["compile", "digits_cn", "--recipe", "cleanup", "--out", "out"], 2,
     "unknown model 'digits_cn' (did you mean 'digits_cnn'", ["out"]),
    (["compile", "nosuchpkg.mod:make", "--recipe", "cleanup", "--out", "out"], 2, "no module named 'nosuchpkg'", ["out"]),
    # --- export -o: only a regular file is replaced; other arguments ----------------------------------------------
    (["export", "user.py:build", "-o", "fifo"], 2, "fifo exists and is a FIFO (named pipe), not a regular file", []),
    (["export", "user.py:build", "-o", "adir"], 2, "adir exists and is a directory, not a regular file", []),
    (["export", "user.py:build", "-o", "/dev/null"], 2, "/dev/null exists and is a character device", []),
    (["export", "user.py:build", "-o", "sock"], 2, "sock exists and is a socket", []),
    (["export", "user.py:build", "-o", "user.py/x.onnx"], 2, "user.py is a file, not a folder", []),
    (["export", "user.py:build", "-o", ""], 2, "argument -o/--output: an empty path", []),
    (["export", "user.py:build", "-o", "x.onnx", "--opset", "99"], 2,
     "argument --opset: invalid value '99': the ONNX opset must be a whole number from 17 to 23", ["x.onnx"]),
    (["export", "user.py:build", "-o", "x.onnx", "--atol", "nan"], 2, "argument --atol: invalid value 'nan'",
     ["x.onnx"]),
    (["export", "user.py:boom", "-o", "x.onnx"], 2, "calling boom() raised RuntimeError", ["x.onnx"]),
    # --- inspect ----------------------------------------------------------------------------------------------
    (["inspect", "user.py:none_inputs"], 2, "returned (module, None)", []),
    (["inspect", "image.onnx"], 2, "image.onnx is a file or folder, but MODEL names Python code", []),
    (["inspect", "text.onnx:make"], 2, "model file 'text.onnx' is not a Python file (.py)", []),
    (["inspect", "image.py:make"], 2, "could not import model file 'image.py'", []),
    # --- distill: arguments and student specs, refused before the teacher loads ------------------------------------
    *[(["distill", "teacher.py:make", "--dataset", "digits", "--student", "teacher.py:make", flag, value,
        "--out", "s.pt"], 2, f"argument {flag}: invalid value {value!r}", ["s.pt"])
      for flag, value in [("--epochs", "0"), ("--lr", "nan"), ("--lr", "0"), ("--alpha", "2"), ("--T", "0"),
                          ("--batch-size", "0"), ("--seed", "-1")]],
    (["distill", "teacher.py:make", "--dataset", "digits", "--student", "user.py:boom", "--out", "s.pt"], 2,
     "calling boom() raised RuntimeError", ["s.pt"]),
    (["distill", "teacher.py:make", "--dataset", "digits", "--student", "user.py:build", "--out", "s.pt"], 2,
     "student 'user.py:build' cannot run on the data's inputs of shape [2, 1, 8, 8]", ["s.pt"]),
    (["distill", "teacher.py:make", "--student", "teacher.py:make", "--out", "s.pt"], 2,
     "teacher 'teacher.py:make' has no bundled dataset: give --data (your data) or --dataset", ["s.pt"]),
    (["distill", "teacher.py:make", "--dataset", "digitz", "--student", "teacher.py:make", "--out", "s.pt"], 2,
     "unknown dataset 'digitz'", ["s.pt"]),
    (["distill", "teacher.py:make", "--dataset", "digits", "--student", "teacher.py:make", "--out", "fifo"], 2,
     "fifo exists and is a FIFO", []),
    (["distill", "teacher.py:make", "--dataset", "digits", "--student", "teacher.py:make", "--features", "a:b",
      "--loss", "kd"], 2, "--features names attention-transfer pairs, but --loss kd has no attention transfer", []),
    (["distill", "teacher.py:make", "--dataset", "digits", "--student", "teacher.py:make", "--threads", "0"], 2,
     "argument --threads: invalid value '0'", []),
    (["distill", "teacher.py:make", "--dataset", "digits", "--student", "teacher.py:make", "--loss", "kdd"], 2,
     "argument --loss: invalid choice: 'kdd'", []),
    # --- passes -----------------------------------------------------------------------------------------------
    (["passes", "prune-chanels"], 2, "unknown pass 'prune-chanels'; did you mean 'prune-channels'", []),
]


@pytest.mark.parametrize("argv, code, fragment, absent", CASES, ids=[" ".join(c[0])[:80] for c in CASES])
def test_hostile_argv(in_work, capsys, argv, code, fragment, absent):
    if "sock" in argv:
        _socket(in_work)
    fifo_before = os.stat(in_work / "fifo").st_ino
    assert main(list(argv)) == code
    out, err = capsys.readouterr()
    assert fragment in (err if code else out), err
    assert "Traceback" not in err and "internal error" not in err
    if code == 2:  # one paragraph, after argparse's usage lines when argparse refused an argument
        lines = err.strip().splitlines()
        assert fragment in lines[-1] and all(ln.startswith(("usage:", " ")) for ln in lines[:-1]), err
    for name in absent:
        assert not (in_work / name).exists(), name
    # Nothing that is not a regular file was replaced or entered.
    assert stat.S_ISFIFO(os.stat(in_work / "fifo").st_mode) and os.stat(in_work / "fifo").st_ino == fifo_before
    assert sorted(p.name for p in (in_work / "adir").iterdir()) == ["keep.txt"]
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert not list(in_work.glob(".*.tmp"))
    shutil.rmtree(in_work / "out", ignore_errors=True)


def test_format_takes_one_or_several_names():
    from slimfx.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["compile", "--format", "onnx"]).format == "onnx"
    assert parse(["compile", "--format", " ONNX , torchscript,onnx"]).format == "onnx,torchscript"
    assert parse(["compile"]).format is None  # the recipe's [export] formats


@pytest.mark.parametrize("command", [None, "compile", "inspect", "passes", "export", "validate", "distill", "bench"])
def test_every_help_prints(capsys, command):
    assert main([command, "--help"] if command else ["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: slimfx" in out and "%%" not in out
    if command == "bench":
        assert "more than 10% apart" in out


def test_debug_shows_the_users_traceback(in_work, capsys):
    assert main(["compile", "user.py:boom", "--recipe", "cleanup", "--out", "out", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and 'raise RuntimeError("kaboom: the factory failed")' in err
    assert err.strip().splitlines()[-1].startswith("slimfx: error: model spec 'user.py:boom'")


def test_builtin_recipes_are_never_shadowed_by_the_working_directory(in_work):
    from slimfx.recipe import load_recipe

    # ./int8 is a folder and ./int8-dynamic a broken file; the names still mean the built-ins.
    assert load_recipe("int8").source.parent.name == "recipes"
    assert load_recipe("int8-dynamic").source.parent.name == "recipes"
    assert load_recipe("myrecipe.toml").passes == [("dce", {})]
    assert load_recipe("./myrecipe.toml").passes == [("dce", {})]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_outputs_honour_the_umask(in_work, capsys, umask):
    old = os.umask(umask)
    try:
        assert main(["export", "user.py:build", "-o", f"u{umask:o}.onnx"]) == 0
        assert main(["export", "user.py:build", "--format", "torchscript", "-o", f"u{umask:o}.pt"]) == 0
    finally:
        os.umask(old)
    for suffix in ("onnx", "pt"):
        path = in_work / f"u{umask:o}.{suffix}"
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
        path.unlink()


def test_export_replaces_an_existing_regular_file(in_work, capsys):
    (in_work / "old.onnx").write_text("old")
    assert main(["export", "user.py:build", "-o", "old.onnx"]) == 0
    assert onnx.load(str(in_work / "old.onnx")).graph.output
    (in_work / "old.onnx").unlink()


@pytest.mark.parametrize("student", ["teacher.py:make", "pkg.students:make", "mlp"])
def test_distill_takes_every_model_spec_as_student(in_work, capsys, student):
    dataset = "digits-flat" if student == "mlp" else "digits"
    assert main(["distill", "teacher.py:make", "--dataset", dataset, "--student", student, "--epochs", "1",
                 "--out", "s.pt", "--quiet", "--loss", "ce"]) == 0
    assert f"student {student}, distilled (ce)" in capsys.readouterr().out
    assert torch.load(in_work / "s.pt")  # a state_dict
    (in_work / "s.pt").unlink()


PROJECT = {
    "models/__init__.py": "",
    "models/layers.py": "import torch.nn as nn\n\n\nclass Block(nn.Sequential):\n"
                        "    def __init__(self):\n        super().__init__(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))\n",
    "models/net.py": "import torch\n\nfrom ir.util import scale\nfrom models.layers import Block\n\n\n"
                     "def make():\n    torch.manual_seed(0)\n    return Block().eval(), (scale(torch.randn(2, 4)),)\n",
    "ir/__init__.py": "",
    "ir/util.py": "def scale(x):\n    return x * 2\n",
}


@pytest.mark.parametrize("how", ["console-script", "python -m"])
def test_a_project_with_its_own_models_and_ir_packages(tmp_path, how):
    for rel, text in PROJECT.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    script = Path(sys.executable).parent / "slimfx"
    cmd = [str(script)] if how == "console-script" else [sys.executable, "-m", "slimfx"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([*cmd, "compile", "models/net.py:make", "--recipe", "cleanup", "--out", "out",
                        "--bench-seconds", "0.02", "--format", "onnx", "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"model.onnx", "report.json"}
    if how == "console-script":  # no working directory on sys.path by itself: 'package.module:callable' too
        r = subprocess.run([*cmd, "inspect", "models.net:make", "--format", "table"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "linear" in r.stdout, r.stderr


def test_a_closed_pipe_ends_quietly_with_exit_0(monkeypatch, capsys):
    import io
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (`head`) is gone: every write now fails with EPIPE
    closed = io.TextIOWrapper(os.fdopen(write_end, "wb"), write_through=True)
    monkeypatch.setattr("sys.stdout", closed)
    assert main(["passes"]) == 0
    assert "internal error" not in capsys.readouterr().err
