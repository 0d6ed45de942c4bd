"""`slimfx export`, `slimfx validate` and `slimfx bench` end to end on a user model file."""

from __future__ import annotations

import json
import textwrap
import zipfile

import onnx

from slimfx.cli import main

MODEL = textwrap.dedent("""
    import torch, torch.nn as nn
    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).eval()
        return m, (torch.randn(2, 3, 8, 8),)
    def other():
        torch.manual_seed(1)
        m, x = build()
        for p in m.parameters():
            p.data.add_(0.1)
        return m, x
""")


def test_export_validate_bench(tmp_path, capsys):
    src = tmp_path / "user.py"
    src.write_text(MODEL)
    out = tmp_path / "m.onnx"
    assert main(["export", f"{src}:build", "-o", str(out)]) == 0
    assert "validation: pass" in capsys.readouterr().out
    assert [i.name for i in onnx.load(str(out)).graph.input] == ["input"]  # forward's own argument name
    assert main(["validate", str(out), "--model", f"{src}:build", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["passed"] and rep["batches"] == [1, 7] and rep["max_abs_diff"] < 1e-5
    # A different model (shifted weights) fails the gate with exit status 3 (a check failed).
    assert main(["validate", str(out), "--model", f"{src}:other"]) == 3  # a check failed
    assert "does not match" in capsys.readouterr().err
    assert main(["bench", str(out), "--batch", "1,4", "--runs", "5", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert set(rows) == {"b1", "b4"} and all(r["runs"] == 5 and r["median_ms"] > 0 for r in rows.values())
    ts = tmp_path / "m.pt"
    assert main(["export", f"{src}:build", "--format", "onnx", "-o", str(ts)]) == 2  # a .pt that holds ONNX
    assert "suffix of a torchscript file but --format is onnx" in capsys.readouterr().err and not ts.exists()
    for suffix, fmt in ((".pt2", "bytes, pt2)"), (".slimfx", "bytes, slimfx)")):  # -o's suffix chooses the format
        assert main(["export", f"{src}:build", "-o", str(tmp_path / f"s{suffix}")]) == 0
        assert fmt in capsys.readouterr().out
    assert zipfile.is_zipfile(tmp_path / "s.pt2") and zipfile.is_zipfile(tmp_path / "s.slimfx")
    assert main(["export", f"{src}:build", "--format", "torchscript", "-o", str(ts)]) == 0
    assert ts.exists()
    assert main(["validate", str(ts), "--model", f"{src}:build", "--batch", "3"]) == 0


def test_bench_times_several_files_side_by_side_and_refuses_different_inputs(tmp_path, capsys):
    import shutil

    src = tmp_path / "user.py"
    src.write_text(MODEL + textwrap.dedent("""
        def wide():
            m, _ = build()
            return m, (torch.randn(2, 3, 12, 12),)
    """))
    a, b, w = tmp_path / "a.onnx", tmp_path / "sub" / "a.onnx", tmp_path / "w.onnx"
    assert main(["export", f"{src}:build", "-o", str(a)]) == 0
    b.parent.mkdir()
    shutil.copyfile(a, b)
    assert main(["export", f"{src}:wide", "-o", str(w), "--fixed-batch"]) == 0
    capsys.readouterr()
    assert main(["bench", str(a), str(b), "--batch", "1,4", "--runs", "5", "--rounds", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert set(rows) == {str(a), str(b)}  # same file name twice: told apart by path
    assert all(set(r) == {"b1", "b4"} and r["b1"]["runs"] == 5 and r["b1"]["rounds"] == 2 for r in rows.values())
    assert main(["bench", str(a), str(b), "--batch", "1", "--runs", "5", "--rounds", "1"]) == 0
    assert f"x of {a}" in capsys.readouterr().out
    assert main(["bench", str(a), str(w)]) == 2  # a user error: exit status 2 and a message
    assert "w.onnx cannot take the inputs of a.onnx" in capsys.readouterr().err


def test_validate_catches_an_edit_the_example_row_does_not_see(tmp_path, capsys):
    """`validate` at --batch 7 compares more than the example's one row repeated: a weight the example's
    input multiplies by 0 (feature 3 here) changes the file for every other input, and that must fail."""
    from onnx import numpy_helper

    src = tmp_path / "user.py"
    src.write_text(textwrap.dedent("""
        import torch, torch.nn as nn
        def build():
            torch.manual_seed(0)
            x = torch.randn(1, 6)
            x[0, 3] = 0.0
            return nn.Linear(6, 2).eval(), (x,)
    """))
    out = tmp_path / "m.onnx"
    assert main(["export", f"{src}:build", "-o", str(out)]) == 0
    capsys.readouterr()
    m = onnx.load(str(out))
    w = next(t for t in m.graph.initializer if numpy_helper.to_array(t).shape == (2, 6))
    a = numpy_helper.to_array(w).copy()
    a[:, 3] += 0.5  # invisible on the example (its feature 3 is 0), wrong on any other input
    w.CopyFrom(numpy_helper.from_array(a, w.name))
    onnx.save(m, str(out))
    assert main(["validate", str(out), "--model", f"{src}:build", "--batch", "1"]) == 0  # the example alone
    capsys.readouterr()
    assert main(["validate", str(out), "--model", f"{src}:build"]) == 3
    assert "does not match" in capsys.readouterr().err


def _seq_onnx(path, dims, example_sizes=None):
    """A one-node ONNX file (Relu) of a float input [dims...], like a token model's [batch, seq] input."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))
    proto = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    if example_sizes is not None:
        helper.set_model_props(proto, {"slimfx.example_sizes": json.dumps(example_sizes)})
    onnx.save(proto, str(path))
    return path


def test_bench_sizes_each_dynamic_dim_honestly(tmp_path, capsys):
    """A dim other than the batch is never given the batch size (a sequence of 1 at batch 1, of 32 at batch 32,
    timed as if only the batch changed): slimfx files carry their example's sizes, other files name the dim to
    size with --size; a second file is timed on the first one's inputs and only has to accept them, whatever it
    names its dims (torch.onnx's `sequence` against slimfx's `seq`). The timed shapes are printed."""
    ours = _seq_onnx(tmp_path / "ours.onnx", ["batch", "seq"], {"batch": 2, "seq": 10})
    theirs = _seq_onnx(tmp_path / "theirs.onnx", ["N", "sequence"])
    other = _seq_onnx(tmp_path / "other.onnx", ["N", 12])
    capsys.readouterr()
    assert main(["bench", str(theirs), "--batch", "1", "--runs", "3", "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert "'sequence'" in err and "--size sequence=" in err
    assert main(["bench", str(theirs), "--batch", "1,4", "--size", "sequence=10", "--runs", "3", "--rounds", "1",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["b1"]["inputs"] == {"x": "float32[1, 10]"} and rows["b4"]["inputs"] == {"x": "float32[4, 10]"}
    assert main(["bench", str(ours), str(theirs), "--batch", "1,3", "--runs", "3", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "x float32[1, 10]" in out and "x float32[3, 10]" in out and "x of ours.onnx" in out
    assert main(["bench", str(ours), str(other), "--batch", "1", "--runs", "3", "--rounds", "1"]) == 2
    assert "other.onnx cannot take the inputs of ours.onnx" in capsys.readouterr().err
    assert main(["bench", str(ours), "--size", "seq"]) == 2
    assert "argument --size: invalid value 'seq'" in capsys.readouterr().err


def test_validate_names_the_wrong_output_by_its_place_in_a_nested_output(tmp_path, capsys):
    """A model returning (logits, {"score": ..., "feat": ...}) whose file is off in `score` only: the failure
    names output[1]['score'] (the model's own place for it, and the file's name where it has one), not the
    flat position `output[1]`, which in the model's output is the whole dict."""
    src = tmp_path / "user.py"
    src.write_text(textwrap.dedent("""
        import torch, torch.nn as nn
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Linear(5, 3), nn.Linear(5, 2)
            def forward(self, x):
                return self.a(x), {"score": self.b(x), "feat": x * 2}
        def build():
            torch.manual_seed(0)
            return Net().eval(), (torch.randn(2, 5),)
        def shifted():
            m, x = build()
            with torch.no_grad():
                m.b.bias[1] += 1e-2
            return m, x
    """))
    for suffix in (".pt2", ".onnx"):
        out = tmp_path / f"m{suffix}"
        assert main(["export", f"{src}:build", "-o", str(out)]) == 0
        capsys.readouterr()
        assert main(["validate", str(out), "--model", f"{src}:shifted", "--json"]) == 3
        rep = json.loads(capsys.readouterr().out)
        assert rep["failure"].startswith("output[1]['score']") and rep["worst_output"].startswith("output[1]['score']")
