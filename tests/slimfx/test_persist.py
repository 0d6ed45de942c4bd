"""The .slimfx model file: every zoo model after default/int8/prune50/sign reads back bit for bit (text and
file), loading unpickles nothing, every broken file is a ModelFileError naming it, and a resumed compile
equals the direct one."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import slimfx
from slimfx import ir, models
from slimfx.errors import ModelFileError, SlimfxError
from slimfx.exporters import with_batch
from slimfx.ir.serialize import FORMAT_VERSION
from slimfx.passes import PassContext, PassManager, create_pass
from slimfx.persist import read_metadata
from slimfx.recipe import Recipe, load_recipe

RECIPES = ["default", "int8", "prune50", "sign"]


def compiled(name: str, recipe: str) -> tuple[ir.Graph, tuple]:
    """A zoo model (seeded weights: bit-identity does not depend on training) after a recipe's passes;
    passes that need training data are skipped, as the recipes allow."""
    spec = models.get(name)
    model = spec.build(seed=0)
    x = spec.example_inputs(batch=2)
    g = ir.capture(model, x)
    PassManager(load_recipe(recipe).build_passes()).run(
        g, PassContext(example_inputs=x, calibration_data=[x], teacher=model))
    return g, x


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", models.names())
def test_zoo_round_trip_is_bit_identical(name, recipe, tmp_path):
    g, x = compiled(name, recipe)
    text = ir.format_graph(g, locations=True)
    assert ir.graph_diff(ir.parse(text, g.params, buffers=g.buffers), g) is None
    path = slimfx.save(g, tmp_path / "m.slimfx")
    back = slimfx.load(path)
    assert ir.graph_diff(back, g) is None, ir.graph_diff(back, g)
    assert ir.format_graph(back, locations=True) == text
    a, b = ir.lower(g).eval(), ir.lower(back).eval()
    with torch.no_grad():
        for ins in (x, with_batch(x, 5)):
            assert torch.equal(a(*ins), b(*ins))


# --- a small file with quantization and mask records, for the no-pickle and corruption cases -------------------

class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def saved(tmp_path) -> Path:
    torch.manual_seed(0)
    model = Small().eval()
    x = torch.randn(4, 6)
    g = ir.capture(model, (x,))
    PassManager([create_pass("prune-weights", {"sparsity": 0.5, "skip": ["fc2"]}),
                 create_pass("quantize", {"skip": ["fc1"]})]).run(
        g, PassContext(example_inputs=(x,), calibration_data=[(x,)]))
    assert g.find("mask") and g.find("dequantize")
    return slimfx.save(g, tmp_path / "small.slimfx", metadata={"note": "kept"})


def test_metadata_describes_the_graph(saved):
    meta = read_metadata(saved)
    assert meta["format"] == "slimfx-model" and meta["format_version"] == FORMAT_VERSION
    assert meta["graph"]["inputs"] == [{"name": "x", "dtype": "float32", "shape": [4, 6]}]
    assert meta["graph"]["outputs"] == ["output"] and meta["graph"]["symbolic_dims"] == {"x": {"0": "batch"}}
    assert {m["op"] for m in meta["quantization"]} == {"quantize", "dequantize"}
    assert meta["masks"] and all(0.4 <= m["sparsity"] <= 0.6 for m in meta["masks"])
    assert meta["note"] == "kept" and slimfx.load(saved).metadata["note"] == "kept"
    with zipfile.ZipFile(saved) as z:
        assert sorted(z.namelist()) == ["graph.ir", "meta.json", "weights.safetensors"]
        assert z.read("graph.ir").decode().startswith("graph Small(%x: f32[batch:4, 6]) {")


def test_loading_never_unpickles(saved, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a .slimfx load must not unpickle")
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    g = slimfx.load(saved)
    with torch.no_grad():
        assert ir.lower(g)(torch.randn(2, 6)).shape == (2, 3)


def _rewrite(path: Path, member: str, fn) -> None:
    with zipfile.ZipFile(path) as z:
        items = {n: z.read(n) for n in z.namelist()}
    new = fn(items[member]) if member in items else None
    with zipfile.ZipFile(path, "w") as z:
        for n, data in items.items():
            if n == member and new is None:
                continue
            z.writestr(n, new if n == member else data)


def _json_edit(edit):
    def fn(raw: bytes) -> bytes:
        meta = json.loads(raw)
        edit(meta)
        return json.dumps(meta).encode()
    return fn


def _extra_weight(raw: bytes) -> bytes:
    from safetensors.torch import load, save

    t = load(raw)
    t["intruder"] = torch.zeros(2)
    return save(t)


def _reshaped_weight(raw: bytes) -> bytes:
    from safetensors.torch import load, save

    t = load(raw)
    t["fc1.bias"] = torch.zeros(9)
    return save(t)


CORRUPTIONS = {
    "missing": (lambda p: p.unlink(), "no such file"),
    "empty": (lambda p: p.write_bytes(b""), "the file is empty"),
    "text": (lambda p: p.write_text("graph G() {\n}\n"), "not a slimfx model file (it is not a zip archive)"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "truncated or corrupt"),
    "flipped byte": (lambda p: _flip(p), "is corrupt"),
    "other zip": (lambda p: _rewrite(p, "meta.json", lambda b: None) or _rewrite(p, "graph.ir", lambda b: None),
                  "not a slimfx model file (a zip archive without meta.json)"),
    "no graph": (lambda p: _rewrite(p, "graph.ir", lambda b: None), "lacks graph.ir"),
    "bad json": (lambda p: _rewrite(p, "meta.json", lambda b: b"{not json"), "meta.json is not valid JSON"),
    "newer version": (lambda p: _rewrite(p, "meta.json", _json_edit(lambda m: m.update(format_version=99))),
                      "written by a newer slimfx"),
    "not our format": (lambda p: _rewrite(p, "meta.json", _json_edit(lambda m: m.update(format="onnx"))),
                       "does not say format = 'slimfx-model'"),
    "text syntax": (lambda p: _rewrite(p, "graph.ir", lambda b: b.replace(b"relu(", b"relu((", 1)),
                    "the IR text does not parse"),
    "text shape": (lambda p: _rewrite(p, "graph.ir", lambda b: b.replace(b": f32[4, 8]", b": f32[4, 9]", 1)),
                   "the IR text and the weights are inconsistent"),
    "unknown param": (lambda p: _rewrite(p, "graph.ir", lambda b: b.replace(b"@fc1.bias", b"@fc1.gone", 1)),
                      "@fc1.gone is not in the params table"),
    "unknown op": (lambda p: _rewrite(p, "graph.ir", lambda b: b.replace(b"= relu(", b"= frobnicate(", 1)),
                   "unknown op 'frobnicate'"),
    "extra weight": (lambda p: _rewrite(p, "weights.safetensors", _extra_weight),
                     "holds intruder, which meta.json does not list"),
    "resized weight": (lambda p: _rewrite(p, "weights.safetensors", _reshaped_weight),
                       "weight 'fc1.bias' is float32[9]"),
    "garbage weights": (lambda p: _rewrite(p, "weights.safetensors", lambda b: b"\x05" + b[1:]),
                        "not a readable safetensors file"),
    "edited inputs": (lambda p: _rewrite(p, "meta.json", _json_edit(
        lambda m: m["graph"]["inputs"][0].update(shape=[1, 6]))), "meta.json says graph inputs"),
    "edited qparams": (lambda p: _rewrite(p, "meta.json", _json_edit(lambda m: m["quantization"][0].update(axis=1))),
                       "quantization records do not match"),
    "unknown compression": (lambda p: _patch_central(p, 10, 99), "weights.safetensors is corrupt"),
    "encrypted flag": (lambda p: _patch_central(p, 8, 1), "weights.safetensors is corrupt"),
    "bad manifest": (lambda p: _rewrite(p, "meta.json", _json_edit(lambda m: m.update(params={"a": 1}))),
                     "key 'params' is missing or not a list"),
}


def _patch_central(p: Path, offset: int, value: int) -> None:
    """Set a 2-byte field of weights.safetensors' central directory entry (8: flags, 10: compression method):
    one damaged header, which zipfile reports as NotImplementedError / RuntimeError rather than BadZipFile."""
    data = bytearray(p.read_bytes())
    at = data.index(b"PK\x01\x02")
    while data[at + 46: at + 46 + len(b"weights.safetensors")] != b"weights.safetensors":
        at = data.index(b"PK\x01\x02", at + 4)
    data[at + offset: at + offset + 2] = value.to_bytes(2, "little")
    p.write_bytes(bytes(data))


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    with zipfile.ZipFile(p) as z:
        info = z.getinfo("weights.safetensors")
    data[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF  # inside the stored weights
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_every_broken_file_is_a_clear_error(saved, case):
    damage, what = CORRUPTIONS[case]
    damage(saved)
    with pytest.raises(ModelFileError) as e:
        slimfx.load(saved)
    msg = str(e.value)
    assert str(saved) in msg and what in msg, msg
    assert isinstance(e.value, SlimfxError)


# Hand-edited IR text that would climb from a tensor to builtins.eval (getattr of private names, getattr of a
# computed name, operator.call / attrgetter, a method of a literal or a private method, another fx kind): each
# must be refused when the file is read, before anything runs.
ESCAPES = {
    "private getattr": ['%a = opaque(%x, "register_hook") {kind="call_function", target=builtins.getattr}',
                        '%b = opaque(%a, "__func__") {kind="call_function", target=builtins.getattr}',
                        '%c = opaque(%b, "__globals__") {kind="call_function", target=builtins.getattr}',
                        '%d = opaque(%c, "__builtins__") {kind="call_function", target=operator.getitem}',
                        '%e = opaque(%d, "eval") {kind="call_function", target=operator.getitem}',
                        '%f = opaque(%e, PAYLOAD) {kind="call_function", target=builtins.getattr}'],
    "computed name": ['%n = opaque("__cla", "ss__") {kind="call_function", target=operator.add}',
                      '%a = opaque(%x, %n) {kind="call_function", target=builtins.getattr}'],
    "operator.call": ['%a = opaque(%x, "register_hook") {kind="call_function", target=builtins.getattr}',
                      '%f = opaque(%a, PAYLOAD) {kind="call_function", target=operator.call}'],
    "attrgetter": ['%g = opaque("__class__") {kind="call_function", target=operator.attrgetter}'],
    "private method": ['%a = opaque(%x, 2) {kind="call_method", target="__reduce_ex__"}'],
    "method of a literal": ['%a = opaque("{0.__class__}", %x) {kind="call_method", target="format"}'],
    "module call": ['%a = opaque(%x) {kind="call_module", target="fc1"}'],
    "other kind": ['%a = opaque() {kind="get_attr", target="fc1.weight"}'],
}


@pytest.mark.parametrize("case", list(ESCAPES))
def test_hand_edited_code_in_the_ir_text_is_refused_before_it_runs(saved, case, tmp_path):
    ran = tmp_path / "ran"
    payload = repr(f"__import__('pathlib').Path({str(ran)!r}).touch()")
    lines = "".join(f"  {line.replace('PAYLOAD', payload)}\n" for line in ESCAPES[case]).encode()
    _rewrite(saved, "graph.ir", lambda b: b.replace(b"{\n", b"{\n" + lines, 1))
    with pytest.raises(ModelFileError, match="the IR text does not parse") as e:
        g = slimfx.load(saved)
        ir.lower(g)(torch.randn(4, 6))  # what the loaded graph would run (before the fix: the payload)
    assert str(saved) in str(e.value) and not ran.exists()


def test_save_refuses_what_a_file_cannot_hold(tmp_path):
    class Odd(nn.Module):
        def forward(self, x):
            return torch.nn.functional.relu(x) * 2

    g = ir.capture(Odd(), (torch.randn(2, 3),))
    with pytest.raises(ModelFileError, match=r"ends in \.slimfx"):
        slimfx.save(g, tmp_path / "model.bin")
    r = g.node("relu") if g.has_node("relu") else next(n for n in g if n.op == "relu")
    g.create_node("opaque", (r,), {"kind": "call_module", "target": "m", "module": nn.ReLU(), "kwargs": {}},
                  name="m", meta=r.meta)
    with pytest.raises(ModelFileError, match="module object"):
        slimfx.save(g, tmp_path / "model.slimfx")
    assert not (tmp_path / "model.slimfx").exists()
    g.erase(g.node("m"))
    g.create_node("opaque", (r, "_version"), {"kind": "call_function", "target": getattr, "kwargs": {}}, name="v")
    with pytest.raises(ModelFileError, match=r"cannot save %v .*public attribute name"):  # loading would refuse it
        slimfx.save(g, tmp_path / "model.slimfx")
    assert not (tmp_path / "model.slimfx").exists()


# --- resume ----------------------------------------------------------------------------------------------------

PRUNE = [("fold-batchnorm", {}), ("prune-channels", {"sparsity": 0.5})]


def _int8() -> Recipe:
    """The int8 recipe's passes without its gate: the check here is that the pipelines agree."""
    return Recipe("int8", passes=load_recipe("int8").passes)


def test_a_resumed_compile_equals_the_direct_pipeline(tmp_path):
    spec = models.get("digits_cnn")
    model = spec.build(seed=0)
    x = spec.example_inputs(batch=2)
    first = slimfx.compile(model, x, Recipe("prune", passes=PRUNE), formats=["slimfx"], out_dir=tmp_path / "a",
                           bench_seconds=0, quiet=True)
    saved = first.exports["slimfx"]
    resumed = slimfx.compile(saved, recipe=_int8(), calibration_data=[x], bench_seconds=0, quiet=True)
    direct = slimfx.compile(model, x, Recipe("both", passes=PRUNE + _int8().passes), calibration_data=[x],
                            bench_seconds=0, quiet=True)
    assert ir.graph_diff(resumed.graph, direct.graph) is None
    assert str(resumed.graph) == str(direct.graph)
    with torch.no_grad():
        assert torch.equal(resumed.module(*x), direct.module(*x))
    history = resumed.graph.metadata["history"]
    assert [h["recipe"] for h in history] == ["prune", "int8"]
    assert [p["name"] for p in history[0]["passes"]] == ["fold-batchnorm", "prune-channels"]
    assert history[0]["passes"][1]["options"] == {"sparsity": 0.5}
    # the saved graph is the reference: the resumed report compares with it, not with the unpruned model
    assert resumed.report["baseline"]["params"] == ir.count_params(slimfx.load(saved))


@pytest.mark.parametrize("recipe", ["int8", "sign", "int8-dynamic"])
def test_resuming_a_quantized_file_with_a_quantizing_recipe_is_refused_before_any_work(saved, recipe):
    """The README's flow saved the `default` recipe's (int8) result and resumed it with `int8`: the quantize pass
    met dequantize nodes where it expects float weights and died with an internal KeyError (exit 1)."""
    with pytest.raises(slimfx.errors.RecipeError) as e:
        slimfx.compile(saved, recipe=recipe, calibration_data=[(torch.randn(4, 6),)], formats=["torchscript"],
                       bench_seconds=0, quiet=True)
    msg = str(e.value)
    assert "passes[" in msg and "already quantized" in msg and "e.g. %relu_q" in msg, msg
    assert "before quantiz" in msg  # the action: resume from a file saved before the quantize step


def test_the_quantize_pass_refuses_a_quantized_graph_it_is_run_on_directly(saved):
    g = slimfx.load(saved)
    with pytest.raises(slimfx.errors.PassError, match="already quantized"):
        PassManager(["quantize"]).run(g, PassContext(example_inputs=(torch.randn(4, 6),),
                                                     calibration_data=[(torch.randn(4, 6),)]))


def test_compile_refuses_a_model_path_that_is_not_a_saved_model(tmp_path):
    with pytest.raises(SlimfxError, match="only for saved models"):
        slimfx.compile(str(tmp_path / "net.py"), recipe="cleanup")


def test_the_report_says_what_each_file_holds():
    from slimfx.report import export_rows, format_report

    exports = {"onnx": {"path": "model.onnx", "format": "onnx", "size_bytes": 2048, "weights": "int8",
                        "latency_ms": {"b1": 0.1, "b32": 1.0}, "runtime": "onnxruntime, 1 thread"},
               "torchscript": {"path": "model.pt", "format": "torchscript", "size_bytes": 8192,
                               "weights": "fake-quant", "latency_ms": None, "runtime": None}}
    rows = export_rows({"exports": exports})
    assert rows[0] == ["model.onnx", "2.0 KiB", "int8, dequantized in the graph", "0.100 ms", "1.000 ms",
                       "onnxruntime, 1 thread"]
    assert rows[1][:3] == ["model.pt", "8.0 KiB", "FAKE-QUANT: float tensors"]
    report = {"baseline": dict.fromkeys(("params", "macs", "size_bytes", "latency_ms", "accuracy")),
              "validation": {"top1_agreement": None, "max_abs_diff": 0.0, "exact": True}, "exports": exports}
    report["compressed"] = dict(report["baseline"])
    assert "FAKE-QUANT: float tensors" in format_report(report) and "model.pt " in format_report(report)



@torch.library.custom_op("slimfx_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


class _Positions(nn.Module):
    def __init__(self, custom: bool = False):
        super().__init__()
        self.emb, self.pos, self.fc = nn.Embedding(10, 4), nn.Embedding(16, 4), nn.Linear(4, 3)
        self.custom = custom

    def forward(self, ids):
        if ids.shape[1] > 16:  # Python control flow on a shape: symbolic tracing fails, torch.export captures
            raise ValueError("too long")
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.fc(_twice(h) if self.custom else h).mean(1)


def test_a_torch_export_graph_with_aten_calls_is_saved_and_read_back(tmp_path):
    """The ATen calls torch.export capture leaves opaque (Hugging Face position ids: aten.arange with a
    device=cpu keyword) were refused at save time, so such a model had no .slimfx file and no resume."""
    model, ids = _Positions().eval(), torch.randint(0, 10, (2, 5))
    result = slimfx.compile(model, (ids,), recipe="cleanup", formats=["onnx", "slimfx"], out_dir=tmp_path / "o",
                            bench_seconds=0, quiet=True)
    assert result.graph.capture_method == "export"
    assert "torch.ops.aten.arange.default" in str(result.graph) and "device('cpu')" in str(result.graph)
    loaded = slimfx.load(tmp_path / "o" / "model.slimfx")
    longer = torch.randint(0, 10, (3, 9))
    with torch.no_grad():
        assert torch.equal(ir.lower(loaded).eval()(longer), model(longer))


def test_a_model_the_slimfx_format_cannot_hold_is_refused_after_capture_before_any_pass(monkeypatch, tmp_path):
    # A graph with a call a file cannot hold (an operator of the user's own library) was refused only when
    # model.slimfx was written, after pruning and fine-tuning.
    import slimfx.driver as driver

    def no_passes(*a, **k):
        raise AssertionError("the passes ran before the refusal")

    monkeypatch.setattr(driver, "_run_passes", no_passes)
    with pytest.raises(ModelFileError, match=r"cannot save %\w+: it calls the ATen operator slimfx_test.twice.default "
                                             r".*leave slimfx out of the formats"):
        slimfx.compile(_Positions(custom=True).eval(), (torch.randint(0, 10, (2, 5)),), recipe="prune50",
                       formats=["onnx", "slimfx"], out_dir=tmp_path / "o", bench_seconds=0, quiet=True)
    assert not (tmp_path / "o").exists()
