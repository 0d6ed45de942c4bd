"""Symbolic dimensions (issue #15 item 2): the IR names the dims that stay dynamic (batch, seq, height, width,
user names), capture records them, the .slimfx file keeps them, and the exported files run at other sizes of
each: ONNX with a dim_param per name, torch.export with a Dim per name."""

from __future__ import annotations

import json
import textwrap
import zipfile

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import slimfx
from slimfx import ir
from slimfx.cli import main
from slimfx.errors import ExportError, ModelFileError, SlimfxError
from slimfx.exporters import export_onnx, export_pt2
from slimfx.exporters.pt2 import load_pt2
from slimfx.ir.symdims import DynamicDimsError, graph_dims, parse_dynamic_dims, resolve_dynamic_dims


def _dims(path) -> dict[str, list]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {v.name: list(v.shape) for v in [*sess.get_inputs(), *sess.get_outputs()]}


def _run(path, feed: dict[str, torch.Tensor]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feed.items()})


def _rel(a: np.ndarray, b: torch.Tensor) -> float:
    b = b.detach().numpy()
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# --- transformers models from tiny configs, compiled from batch-1 examples -------------------------------------

@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    from slimfx.models import hf

    return hf


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_token_models_run_at_other_batch_and_sequence_lengths(hf, arch, tmp_path):
    """A token classifier and a decoder LM compiled from batch-1, length-8 examples: the ONNX file is dynamic
    in batch and seq by default and matches eager at batch 3, length 13 (fp32 cleanup, tight relative
    tolerance); the int8-dynamic file runs there too."""
    model, kw = hf.build(arch, batch=1, seq_len=8)
    _, other = hf.build(arch, batch=3, seq_len=13, seed=1)
    with torch.no_grad():
        ref = model(**other).logits
    captured = ir.capture(model, (), example_kwargs=kw)  # captured once, compiled with two recipes
    assert captured.inputs[0].meta.sym == captured.inputs[1].meta.sym == ("batch", "seq")
    example = tuple(kw.values())
    res = slimfx.compile(captured, example, "cleanup", formats="onnx", out_dir=tmp_path / "fp32", quiet=True,
                         bench_seconds=0)
    assert res.graph.inputs[0].meta.sym == ("batch", "seq")  # the passes keep them
    dims = _dims(res.exports["onnx"])
    assert dims["input_ids"] == dims["attention_mask"] == ["batch", "seq"]
    assert dims["logits"] == (["batch", 2] if arch == "bert" else ["batch", "seq", 128])
    out = _run(res.exports["onnx"], other)
    assert out[0].shape == tuple(ref.shape) and _rel(out[0], ref) < 1e-5
    q = slimfx.compile(captured, example, "int8-dynamic", formats="onnx", out_dir=tmp_path / "int8", quiet=True,
                       bench_seconds=0)
    out = _run(q.exports["onnx"], other)
    assert out[0].shape == tuple(ref.shape) and _rel(out[0], ref) < 0.1


# --- images: height and width when asked -----------------------------------------------------------------------

class Segmenter(nn.Module):
    """A strided conv net with a skip, an upsampling and a global-pool head: two outputs that follow H/W
    differently (the map at the input's size, the logits not at all)."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.down(x)))
        y = self.mid(y) + y
        up = F.interpolate(y, size=(x.shape[2], x.shape[3]), mode="bilinear", align_corners=False)
        return self.fc(y.mean((2, 3))), up


def test_image_model_with_dynamic_height_and_width_runs_at_another_resolution(tmp_path):
    torch.manual_seed(0)
    model = Segmenter().eval()
    example = (torch.randn(1, 3, 16, 16),)
    graph = ir.capture(model, example, dynamic_dims="batch,height,width")
    up = next(n for n in graph if n.op == "interpolate")
    assert up.meta.sym == ("batch", None, "height", "width")  # the IR names them on inner nodes too
    onnx_path = export_onnx(graph, tmp_path / "m.onnx", inputs=example).path
    dims = _dims(onnx_path)
    assert dims["x"] == ["batch", 3, "height", "width"]
    assert dims["output_0"] == ["batch", 5] and dims["output_1"] == ["batch", 8, "height", "width"]
    x = torch.randn(2, 3, 24, 20)
    with torch.no_grad():
        logits, fmap = model(x)
    out = _run(onnx_path, {"x": x})
    assert out[1].shape == (2, 8, 24, 20) and _rel(out[0], logits) < 1e-5 and _rel(out[1], fmap) < 1e-5
    res = export_pt2(graph, tmp_path / "m.pt2", inputs=example)  # torch.export keeps a dynamic dim per name
    assert res.details["dynamic_dims"] == "x: 0=batch, 2=height, 3=width" and "fixed_dims" not in res.details
    with torch.no_grad():
        got = load_pt2(res.path)(x)
    assert torch.allclose(got[1], fmap, atol=1e-5)


def test_image_models_are_fixed_in_height_and_width_by_default(tmp_path):
    g = ir.capture(Segmenter().eval(), (torch.randn(1, 3, 32, 32),))
    assert graph_dims(g) == [{0: "batch"}]
    assert _dims(export_onnx(g, tmp_path / "m.onnx").path)["x"] == ["batch", 3, 32, 32]


# --- defaults, failures and the saved file -------------------------------------------------------------------------

class FixedPositions(nn.Module):
    """Token ids plus a position table exactly as long as the example: runs at one length only."""

    def __init__(self, seq=8):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.pos = nn.Parameter(torch.randn(seq, 16))
        self.fc = nn.Linear(16, 3)

    def forward(self, ids):
        return self.fc((self.emb(ids) + self.pos).mean(1))


def test_default_sequence_dim_stays_fixed_where_the_model_fixes_it_but_an_asked_one_is_refused(tmp_path):
    ids = torch.randint(0, 50, (1, 8))
    g = ir.capture(FixedPositions().eval(), (ids,))
    assert graph_dims(g) == [{0: "batch"}]  # the default seq is dropped quietly
    assert _dims(export_onnx(g, tmp_path / "a.onnx", inputs=(ids,)).path)["ids"] == ["batch", 8]
    asked = ir.capture(FixedPositions().eval(), (ids,), dynamic_dims="batch,seq")
    assert graph_dims(asked) == [{0: "batch", 1: "seq"}]
    with pytest.raises(ExportError) as e:
        export_onnx(asked, tmp_path / "b.onnx", inputs=(ids,))
    msg = str(e.value)
    assert "seq size 8 but not at seq size 9" in msg and "`--dynamic-dims ids=0:batch`" in msg
    assert not (tmp_path / "b.onnx").exists()


def test_user_named_dims_and_the_per_input_form(tmp_path):
    class Audio(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 4, 5, stride=2, padding=2)

        def forward(self, x):
            return self.conv(x).relu()

    x = torch.randn(1, 2, 64)
    g = ir.capture(Audio().eval(), (x,), dynamic_dims={"x": {0: "batch", -1: "samples"}})
    assert g.inputs[0].meta.sym == ("batch", None, "samples")
    res = export_onnx(g, tmp_path / "a.onnx", inputs=(x,))
    assert _dims(res.path) == {"x": ["batch", 2, "samples"], "output": ["batch", 4, "output_dim2"]}
    x2 = torch.randn(3, 2, 100)
    assert _rel(_run(res.path, {"x": x2})[0], ir.lower(g)(x2)) < 1e-5


def test_saved_file_keeps_the_symbolic_dims_and_refuses_a_hand_edit_that_disagrees(tmp_path):
    g = ir.capture(Segmenter().eval(), (torch.randn(1, 3, 16, 16),), dynamic_dims="batch,height,width")
    path = tmp_path / "m.slimfx"
    slimfx.save(g, path)
    back = slimfx.load(path)
    assert graph_dims(back) == [{0: "batch", 2: "height", 3: "width"}]
    assert str(back).splitlines()[0].endswith("(%x: f32[batch:1, 3, height:16, width:16]) {")
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    meta = json.loads(members["meta.json"])
    assert meta["graph"]["symbolic_dims"] == {"x": {"0": "batch", "2": "height", "3": "width"}}
    meta["graph"]["symbolic_dims"] = {"x": {"0": "batch"}}
    edited = tmp_path / "edited.slimfx"
    with zipfile.ZipFile(edited, "w") as z:
        for n, data in members.items():
            z.writestr(n, json.dumps(meta) if n == "meta.json" else data)
    with pytest.raises(ModelFileError, match="symbolic dims"):
        slimfx.load(edited)
    # a fixed export of the saved graph: no dims left
    res = export_pt2(back, tmp_path / "m.pt2", dynamic_batch=False)
    assert res.details["dynamic_dims"] == "x: 2=height, 3=width"


# --- hostile values --------------------------------------------------------------------------------------------------

TOKEN = (torch.randint(0, 50, (1, 8)),)
HOSTILE = [
    ("hieght", "'hieght' in 'hieght' has no conventional place"),
    ("batch,,seq", "has an empty name"),
    ("ids=a:batch", "is not DIM:NAME"),
    ("ids=0:1bad", "'1bad' for dim 0 of input 'ids' is not a name"),
    ("ids=0:batch,0:seq", "name dim 0 of input 'ids' twice"),
    ({"nope": {0: "batch"}}, "input 'nope', which the model does not have; its inputs: ids"),
    ({"ids": {7: "batch"}}, "name dim 7, but it has dims 0..1"),
    ({"ids": {0: "n", 1: "n"}}, "'n' names dims of different sizes in the example"),
    ({"ids": {0: "batch", -2: "b"}}, "two names, 'batch' and 'b'"),
    ({"ids": "batch"}, "must be {dim: name} or a list of dims"),
    (("height",), "'height' fits none of the model's inputs (ids int64[1, 8])"),
    (42, "dynamic_dims must be None, names"),
]


@pytest.mark.parametrize("value,fragment", HOSTILE, ids=[str(v) for v, _ in HOSTILE])
def test_hostile_dynamic_dims_are_refused_naming_the_problem_and_the_flag(value, fragment):
    with pytest.raises(SlimfxError) as e:
        slimfx.compile(FixedPositions().eval(), TOKEN, "cleanup", dynamic_dims=value, quiet=True, bench_seconds=0)
    msg = str(e.value)
    assert fragment in msg, msg
    assert "dynamic_dims" in msg and ("--dynamic-dims" in msg or isinstance(value, int)), msg


def test_fixed_batch_that_names_batch_is_a_contradiction():
    with pytest.raises(SlimfxError, match="contradict"):
        slimfx.compile(FixedPositions().eval(), TOKEN, "cleanup", dynamic_dims="batch", dynamic_batch=False,
                       quiet=True, bench_seconds=0)
    assert resolve_dynamic_dims(None, ["ids"], TOKEN, dynamic_batch=False).dims == {"ids": {1: "seq"}}


def _user_file(tmp_path) -> str:
    src = tmp_path / "user_model.py"
    src.write_text(textwrap.dedent("""
        import torch, torch.nn as nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3, padding=1)

            def forward(self, x):
                return self.conv(x).relu()

        def build():
            return Net().eval(), (torch.randn(1, 3, 16, 16),)
    """))
    return str(src)


@pytest.mark.parametrize("value,fragment", [
    ("hieght", "has no conventional place"),
    ("x=0:batch;x=1:c", "names input 'x' twice"),
    ("x=zero:batch", "is not DIM:NAME"),
])
def test_cli_refuses_a_bad_flag_value_before_any_work(tmp_path, capsys, value, fragment):
    src = _user_file(tmp_path)
    out = tmp_path / "m.onnx"
    assert main(["export", f"{src}:build", "-o", str(out), "--dynamic-dims", value]) == 2
    err = capsys.readouterr().err
    assert "--dynamic-dims" in err and fragment in err and "Traceback" not in err and not out.exists()


def test_cli_flag_values_checked_against_the_model_and_a_good_one_exports(tmp_path, capsys):
    src = _user_file(tmp_path)
    out = tmp_path / "m.onnx"
    assert main(["export", f"{src}:build", "-o", str(out), "--dynamic-dims", "input=0:batch"]) == 2
    err = capsys.readouterr().err
    assert "input 'input', which the model does not have; its inputs: x" in err and "--dynamic-dims" in err
    assert main(["export", f"{src}:build", "-o", str(out), "--dynamic-dims", "batch,height,width"]) == 0
    assert _dims(out)["x"] == ["batch", 3, "height", "width"]
    assert main(["export", f"{src}:build", "-o", str(out), "--dynamic-dims", "none"]) == 0
    assert _dims(out)["x"] == [1, 3, 16, 16]
    assert main(["export", f"{src}:build", "-o", str(out), "--dynamic-dims", "batch", "--fixed-batch"]) == 2
    assert "contradict" in capsys.readouterr().err


_atoms = st.one_of(st.none(), st.integers(-6, 6), st.sampled_from(["batch", "seq", "height", "width", "h", "", "1x",
                                                                    "a b", "x", "ids"]), st.booleans(), st.floats())
_values = st.one_of(
    _atoms, st.text(alphabet="xids=0123:;,batchseqnoe -", max_size=30),
    st.lists(_atoms, max_size=4).map(tuple),
    st.dictionaries(st.sampled_from(["x", "ids", "mask", "y"]),
                    st.one_of(_atoms, st.lists(_atoms, max_size=3),
                              st.dictionaries(st.one_of(st.integers(-5, 5), _atoms), _atoms, max_size=3)),
                    max_size=3))


@settings(max_examples=300, deadline=None)
@given(value=_values)
def test_any_dynamic_dims_value_resolves_or_is_refused_with_a_slimfx_error(value):
    """Whatever a user writes: a plan whose dims exist on the inputs and whose names are one size each, or a
    DynamicDimsError (never another exception)."""
    inputs = [torch.zeros(2, 3, 4, 5), torch.zeros(2, 7, dtype=torch.int64)]
    try:
        plan = resolve_dynamic_dims(value, ["x", "ids"], inputs)
    except DynamicDimsError as e:
        assert str(e)
        return
    sizes: dict[str, int] = {}
    for name, x in zip(["x", "ids"], inputs):
        for d, sym in plan.dims[name].items():
            assert 0 <= d < x.dim() and sym.isidentifier()
            assert sizes.setdefault(sym, x.shape[d]) == x.shape[d]


@pytest.mark.parametrize("text,want", [
    ("batch,seq", ("batch", "seq")), (" none ", ()), ("", ()),
    ("x=0:batch,2:height;ids=0:batch,1", {"x": {0: "batch", 2: "height"}, "ids": {0: "batch", 1: "ids_dim1"}}),
])
def test_the_string_form_reads_as_the_python_forms(text, want):
    assert parse_dynamic_dims(text) == want


def test_cli_compile_takes_the_flag_and_refuses_an_input_the_model_lacks(tmp_path, capsys, monkeypatch):
    src = _user_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["compile", f"{src}:build", "--recipe", "cleanup", "--out", str(tmp_path / "o"), "--quiet",
                 "--no-bench", "--dynamic-dims", "img=0:batch"]) == 2
    err = capsys.readouterr().err
    assert "input 'img', which the model does not have; its inputs: x" in err and "--dynamic-dims" in err
    assert not (tmp_path / "o").exists()
