"""Capture decomposes what it used to keep opaque (issue #15, classes 1, 2, 3, 8, 10): helpers wrapped with
torch.fx.wrap, torch.nn leaf modules, shape values from sizes and rank assertions, and transformers models
captured from batch-1 examples. Each pattern captures bit-exact, without opaque nodes, runs at another
batch size, and compiles with the recipes it is meant for; the ONNX file runs at another batch size too."""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import slimfx
from slimfx import ir
from slimfx.errors import GateError
from slimfx.exporters import validate_onnx, with_batch
from slimfx.exporters.onnx import to_onnx_model
from slimfx.passes import PassContext, PassManager
from slimfx.passes.prune.groups import analyze
from slimfx.recipe import load_recipe
from tests.ir.thirdparty_nets import (
    AssertingCNN,
    CachedBiasAttention,
    HandAttention,
    StochasticDepthNet,
    SwinNet,
    TimmPatternsNet,
    TinyViT,
    WindowNet,
    seeded,
)

SD_X = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)
WIN_X = (torch.randn(2, 9, 3, generator=torch.Generator().manual_seed(0)),)
VIT_X = (torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)  # batch 1, the common call
HAND_X = (torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)),)
CNN_X = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)
SWIN_X = (torch.randn(2, 3, 14, 14, generator=torch.Generator().manual_seed(0)),)  # 7x7 patches, window 3
TIMM_X = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)


def _exact_at_other_batches(model: nn.Module, g: ir.Graph, example: tuple, exact: bool = True) -> None:
    gm = ir.lower(g).eval()
    for b in (1, 3):
        x = with_batch(example, b)
        with torch.no_grad():
            got, want = gm(*x), model(*x)
        if exact:
            assert torch.equal(got, want), f"batch {b}"
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"batch {b}")


def _opaque(g: ir.Graph) -> list[str]:
    return [n.name for n in g.find("opaque")]


# --- class 1: helpers libraries wrap with torch.fx.wrap ------------------------------------------------------

def test_stochastic_depth_is_the_identity_in_eval_mode():
    m = seeded(StochasticDepthNet)
    g = ir.capture(m, SD_X)
    assert _opaque(g) == [] and not [n for n in g if "stochastic" in n.name]
    adds = g.find("add")  # each residual add reads the branch's relu directly
    assert len(adds) == 3 and all(a.inputs[1].op == "relu" for a in adds)
    _exact_at_other_batches(m, g, SD_X)


def test_relative_position_bias_helper_is_traced_through_and_its_table_lookup_exports():
    m = seeded(WindowNet)
    g = ir.capture(m, WIN_X)
    helper = [n for n in g if n.name.startswith("_get_relative_position_bias")]
    assert {n.op for n in helper} >= {"reshape", "permute", "unsqueeze"}
    # the table indexed with a buffer: one ATen op, which the ONNX exporter writes as a Gather
    lookup = [n for n in helper if n.op == "opaque"]
    assert [str(n.attrs["target"]) for n in lookup] == ["aten.index.Tensor"]
    assert lookup[0].module_path == "attn" and lookup[0].source.startswith("thirdparty_nets.py:")
    assert [p.name for p in lookup[0].params()] == ["attn.relative_position_bias_table", "attn.relative_position_index"]
    _exact_at_other_batches(m, g, WIN_X)
    model = to_onnx_model(g, inputs=WIN_X)
    assert "Gather" in {n.op_type for n in model.graph.node}


@pytest.mark.parametrize("v2", [False, True])
def test_shifted_window_attention_pads_rolls_and_folds_what_it_writes_in_place(v2):
    """torchvision's swin: F.pad and torch.roll become canonical ops; the shifted-window mask (new_zeros, then
    written region by region) and v2's k-zeroed copy of the qkv bias depend on no input, so capture folds
    them into buffers instead of keeping in-place writes ONNX cannot express."""
    m = seeded(SwinNet, v2=v2)
    g = ir.capture(m, SWIN_X, method="export")  # the ATen path, where the in-place writes appear
    assert _opaque(g) == []
    assert {"pad", "roll"} <= {n.op for n in g}
    folded = [name for name in g.buffers if "blocks.1" in name]
    assert folded, sorted(g.params)  # the shifted block's mask
    if v2:  # the bias copy is a buffer whose k third is zero; the model's own parameter is untouched
        bias = [g.params[k] for k in g.buffers if k.startswith("blocks.0") and g.params[k].shape == (48,)]
        assert len(bias) == 1 and torch.equal(bias[0][16:32], torch.zeros(16))
        assert m.blocks[0].qkv.bias[16:32].abs().sum() > 0
    _exact_at_other_batches(m, g, SWIN_X, exact=False)


@pytest.mark.parametrize("method", ["fx", "export"])
def test_timm_patterns_capture_without_opaque_nodes_and_again(method):
    """deit's unbind, resmlp's addcmul, BatchNormAct's in-place SiLU and `x.mul_(gamma)`, edgenext's position
    encoding (zeros sized by the batch, arange, sin/cos), levit's `table[:, idx]` cached on the module in eval
    mode: canonical ops (the table lookup: at most one ATen index op, which exports as a Gather), exact at other
    batch sizes, and a second capture of the same model works (tracing left no fx Proxy in the cache; the
    second one reads the tensor the eager runs cached)."""
    m = seeded(TimmPatternsNet)
    for _ in range(2):
        g = ir.capture(m, TIMM_X, method=method)
        ops = {n.op for n in g}
        assert {"unbind", "addcmul", "silu", "full", "sin", "cos"} <= ops, ops
        assert {n.attrs["target"] for n in g.find("opaque")} <= {torch.ops.aten.index.Tensor}
        assert all(isinstance(v, torch.Tensor) for v in m.bias.attention_bias_cache.values())
        _exact_at_other_batches(m, g, TIMM_X)


def test_tracing_leaves_no_proxy_in_a_models_cache():
    m = seeded(CachedBiasAttention)
    x = torch.randn(2, 2, 4, 4)
    g1, g2 = ir.capture(m, (x,)), ir.capture(m, (x,))
    assert m.attention_bias_cache == {} or all(isinstance(v, torch.Tensor) for v in m.attention_bias_cache.values())
    assert torch.equal(ir.lower(g1)(x), m(x)) and torch.equal(ir.lower(g2)(x), m(x))


# --- class 2: leaf modules -------------------------------------------------------------------------------------

def test_multihead_attention_becomes_linear_and_attention_with_the_models_params():
    m = seeded(TinyViT)
    g = ir.capture(m, VIT_X)
    assert _opaque(g) == []
    attn = g.find(module_path="layers.0.self_attention")
    assert {"linear", "scaled_dot_product_attention", "reshape"} <= {n.op for n in attn}
    assert {p.name for n in attn for p in n.params()} == {
        f"layers.0.self_attention.{k}" for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")}
    assert all(n.source and n.source.startswith("thirdparty_nets.py:") for n in attn)
    assert all(isinstance(n.meta, ir.TensorMeta) for n in attn if ir.trait(n.op, "result") == "tensor")
    # captured at batch 1, its reshapes follow the batch; eager inference runs MHA's fused kernel, which
    # rounds differently from the same arithmetic in separate ops
    _exact_at_other_batches(m, g, VIT_X, exact=False)


def test_recurrent_modules_capture_with_shapes_and_the_models_params():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 8, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.rnn(x)[0])

    m, x = seeded(Tagger), (torch.randn(2, 5, 4),)
    g = ir.capture(m, x)
    assert all(n.meta is not None for n in g if n.op == "opaque")
    assert {p.name for n in g.find(module_path="rnn") for p in n.params()} == {
        f"rnn.{k}_l0" for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    _exact_at_other_batches(m, g, x)


def test_a_call_that_cannot_be_decomposed_says_where_and_why():
    from tests.ir.test_hostile_inputs import Undecomposable

    m, x = Undecomposable().eval(), (torch.randn(2, 4),)
    g = ir.capture(m, x)
    node = g.node("data_dependent")
    assert node.op == "opaque" and node.module_path == "inner"
    assert "torch.export" in node.attrs["why"] and "torch.fx" in node.attrs["why"]
    assert torch.equal(ir.lower(g)(*x), m(*x))  # it still runs
    with pytest.raises(slimfx.ExportError) as e:
        to_onnx_model(g, inputs=x)
    msg = str(e.value)
    assert "%data_dependent" in msg and f"module 'inner', {node.source}" in msg
    assert "Capture could not decompose it" in msg and "--format torchscript" in msg and "--plugin" in msg


# --- class 3: Python scalars from sizes -----------------------------------------------------------------------

def test_scale_from_the_head_size_is_a_constant_and_any_pass_keeps_the_graph_valid():
    m = seeded(HandAttention)
    g = ir.capture(m, HAND_X)
    muls = [n for n in g.find("mul") if n.inputs[0].op == "matmul"]
    assert len(muls) == 1 and muls[0].inputs[1] == pytest.approx(1 / math.sqrt(8))
    # the batch stays symbolic: `b * 1` is shape arithmetic on it, never a tensor op without a shape
    scalars = g.find("scalar")
    assert [(n.attrs["fn"], n.inputs[1]) for n in scalars] == [("mul", 1)]
    assert all(n.meta is not None for n in g if n.op in ("mul", "div", "add", "sub"))
    ir.verify(g)
    for passes in (["remove-identity"], ["fold-constants", "cse"], ["fold-batchnorm", "dce"]):
        h = g.copy()
        PassManager(passes, check_numerics=1e-5).run(h, PassContext(example_inputs=HAND_X))  # verifies each
    _exact_at_other_batches(m, g, HAND_X)


def test_static_sizes_fold_and_batch_sizes_stay_symbolic():
    class Mixed(nn.Module):
        def forward(self, x):  # x: [B, C, L]
            b, c, n = x.shape
            y = x.reshape(b * c // 2, 2, n) * float(c)  # b follows the batch; c and n do not
            return y.reshape(x.size(0), -1).sum(-1, keepdim=True) / math.sqrt(x.size(-1))

    m, x = Mixed(), (torch.randn(3, 4, 5),)
    g = ir.capture(m, x)
    reshape = g.find("reshape")[0]
    first = reshape.attrs["shape"][0]
    assert isinstance(first, ir.Node) and first.op == "scalar" and reshape.attrs["shape"][1:] == (2, 5)
    assert [n.inputs[1] for n in g.find("mul")] == [4.0] and [n.inputs[1] for n in g.find("div")] == [
        pytest.approx(math.sqrt(5))]
    _exact_at_other_batches(m, g, x)
    to_onnx_model(g, inputs=x)  # the batch-dependent arithmetic exports as shape ops


def test_a_python_number_read_from_data_is_never_folded_into_a_constant():
    """The probe at another batch size repeats the example's rows, so `x.abs().max().item()` has the same value
    there: only values computed from shapes fold; arithmetic on a data value stays a `scalar` node."""
    class DataScale(nn.Module):
        def forward(self, x):
            peak = x.abs().max().item()
            return x * (peak * 2) + x.size(-1)

    m, x = DataScale(), (torch.randn(2, 3),)
    g = ir.capture(m, x)
    scale = g.find("scalar")
    assert [(n.attrs["fn"], n.inputs[0].name, n.inputs[1]) for n in scale] == [("mul", "item", 2)]
    assert [n.inputs[1] for n in g.find("add")] == [3]  # x.size(-1) does not follow the batch: a constant
    ir.verify(g)  # every tensor op has its meta; the Python number is a value node
    other = (torch.randn(4, 3) * 10,)
    assert torch.equal(ir.lower(g)(*other), m(*other))


# --- class 10: rank assertions ---------------------------------------------------------------------------------

def test_rank_assertions_fold_away_so_batch_norms_fold_and_channels_prune():
    m = seeded(AssertingCNN)
    g = ir.capture(m, CNN_X)
    assert _opaque(g) == [] and g.find("scalar") == []
    _exact_at_other_batches(m, g, CNN_X)
    deps = analyze(g)
    assert not [b for b in deps.blocked if b["op"] != "output"], deps.blocked
    assert len(deps.groups) == 5
    recs = PassManager(["fold-batchnorm"], check_numerics=1e-4).run(g, PassContext(example_inputs=CNN_X))
    assert recs[0].stats["folded"] == 5 and recs[0].stats["not_folded"] == 0 and not g.find("batch_norm")


# --- compiles: cleanup and int8, ONNX at another batch size ---------------------------------------------------

def _calibration(example: tuple, n: int = 128) -> slimfx.Data:
    gen = torch.Generator().manual_seed(1)
    return slimfx.Data(calibration=[tuple(torch.randn(n, *t.shape[1:], generator=gen) for t in example)])


PATTERNS = {
    "stochastic-depth": (lambda: seeded(StochasticDepthNet, classes=3), SD_X, ("cleanup", "int8")),
    "window-attention": (lambda: seeded(WindowNet), WIN_X, ("cleanup", "int8")),
    "vit-mha": (lambda: seeded(TinyViT, dim=24, layers=1), VIT_X, ("cleanup", "int8", "int8-dynamic")),
    "hand-attention": (lambda: seeded(HandAttention), HAND_X, ("cleanup", "int8")),
    "asserting-norm": (lambda: seeded(AssertingCNN), CNN_X, ("cleanup", "int8")),
    "swin": (lambda: seeded(SwinNet), SWIN_X, ("cleanup", "int8")),
    "swin-v2": (lambda: seeded(SwinNet, v2=True, classes=2, seed=1), SWIN_X, ("cleanup", "int8")),
    "timm": (lambda: seeded(TimmPatternsNet), TIMM_X, ("cleanup", "int8")),
}


@pytest.mark.parametrize("name, recipe", [(k, r) for k, (_, _, rs) in PATTERNS.items() for r in rs])
def test_each_pattern_compiles_and_its_onnx_runs_at_another_batch_size(name, recipe, tmp_path):
    build, example, _ = PATTERNS[name]
    model = build()
    result = slimfx.compile(model, example, recipe, data=None if recipe == "cleanup" else _calibration(example),
                            out_dir=tmp_path, formats="onnx", bench_seconds=0, quiet=True)
    assert not result.graph.find("opaque") or name in ("window-attention", "timm")  # a table lookup: Gather
    other = with_batch(example, 3 if example[0].shape[0] != 3 else 2)
    if recipe == "cleanup":  # fp32: the file computes what the model does
        report = validate_onnx(tmp_path / "model.onnx", model, other, atol=1e-4, rtol=1e-4)
    else:  # int8: what slimfx's own fake-quant module computes, within a few quantization steps
        report = validate_onnx(tmp_path / "model.onnx", result.module, other, atol=0.25, rtol=0.05)
    assert report.passed, report.summary()
    if name == "asserting-norm":
        folded = next(p for p in result.report["passes"] if p["name"] == "fold-batchnorm")["stats"]
        assert folded["folded"] == 5 and folded["not_folded"] == 0


# --- class 8: transformers models from batch-1 examples ----------------------------------------------------

HF_RECIPES = {"bert": ("cleanup", "int8", "int8-dynamic"), "distilbert": ("cleanup", "int8", "int8-dynamic"),
              "gpt2": ("cleanup", "int8", "int8-dynamic"), "vit": ("cleanup", "int8", "int8-dynamic")}


@pytest.mark.parametrize("arch, recipe", [(a, r) for a, rs in HF_RECIPES.items() for r in rs])
def test_transformers_models_from_a_batch_1_example_export_onnx_that_runs_at_batch_3(arch, recipe, tmp_path):
    pytest.importorskip("transformers")
    from slimfx.models import hf

    model, kwargs = hf.build(arch, batch=1)
    data, rec = None, load_recipe(recipe)
    if recipe == "int8":
        calib = hf.example_inputs(model, batch=64, seed=1)
        data = slimfx.Data(calibration=[(tuple(calib.values()), None)])  # (inputs, target): 2 inputs are no pair
        # random weights make near-tied logits: int8 flips a few percent of them (98.4% for distilbert);
        # what this checks is that capture and export work, the file against the fake-quant module below
        rec = dataclasses.replace(rec, validate=dataclasses.replace(rec.validate, min_top1_agreement=0.9))
    result = slimfx.compile(model, (), rec, example_kwargs=kwargs, data=data, out_dir=tmp_path, formats="onnx",
                            bench_seconds=0, quiet=True)
    assert result.graph.capture_method == "export"
    other = tuple(hf.example_inputs(model, batch=3, seed=2).values())
    reference = model if recipe == "cleanup" else result.module
    tol = dict(atol=1e-4, rtol=1e-4) if recipe == "cleanup" else dict(atol=0.25, rtol=0.05)

    class Positional(nn.Module):  # the ONNX inputs are the keyword inputs, in forward's order
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *xs):
            out = self.m(**dict(zip(kwargs, xs)))
            return out.logits if hasattr(out, "logits") else out

    report = validate_onnx(tmp_path / "model.onnx", Positional(reference) if recipe == "cleanup" else reference,
                           other, **tol)
    assert report.passed, report.summary()
    onnx_model = onnx.load(str(tmp_path / "model.onnx"))
    assert [i.name for i in onnx_model.graph.input] == list(kwargs)
    assert [o.name for o in onnx_model.graph.output] == ["logits"]  # the ModelOutput's field


# --- fuzz: random attention models x {cleanup, int8} -----------------------------------------------------

class RandomAttention(nn.Module):
    """Attention written the ways real models write it: the scale from q.size(-1), q.shape[-1] ** -0.5 or
    the head count; heads split with view/reshape of sizes read from the input."""

    def __init__(self, dim: int, heads: int, scale: str, split: str, classes: int):
        super().__init__()
        self.heads, self.scale, self.split = heads, scale, split
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.split == "view":
            q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        else:  # heads folded into the batch: sizes computed from the batch at run time
            q, k, v = (t.reshape(x.size(0), -1, self.heads, d // self.heads).permute(0, 2, 1, 3)
                       .reshape(x.size(0) * self.heads, n, -1) for t in (q, k, v))
        if self.scale == "sqrt":
            attn = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
        elif self.scale == "pow":
            attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        else:
            attn = (q @ k.transpose(-2, -1)) / math.sqrt(d / self.heads)
        y = attn.softmax(dim=-1) @ v
        if self.split == "view":
            y = y.transpose(1, 2).reshape(b, n, d)
        else:
            y = y.reshape(x.size(0), self.heads, n, -1).permute(0, 2, 1, 3).reshape(x.size(0), n, d)
        return self.head(self.proj(y).mean(1))


@st.composite
def attention_models(draw):
    heads = draw(st.integers(1, 3))
    dim = heads * draw(st.integers(2, 6))
    model = RandomAttention(dim, heads, draw(st.sampled_from(["sqrt", "pow", "heads"])),
                            draw(st.sampled_from(["view", "fold"])), draw(st.integers(2, 5)))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    x = torch.randn(draw(st.integers(1, 3)), draw(st.integers(2, 6)), dim)
    return model.eval(), (x,)


@settings(max_examples=10, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=attention_models(), recipe=st.sampled_from(["cleanup", "int8", "int8-dynamic"]))
def test_random_attention_models_compile_or_refuse_cleanly(case, recipe):
    model, example = case
    work = Path(tempfile.mkdtemp(prefix="slimfx-attn-fuzz-"))
    try:
        try:
            result = slimfx.compile(model, example, recipe, data=None if recipe != "int8" else _calibration(example),
                                    out_dir=work / "out", formats="onnx", bench_seconds=0, quiet=True)
        except slimfx.SlimfxError as e:
            # a gate may refuse an int8 model; nothing may blame a pass for an invalid graph or fail export
            assert recipe != "cleanup" and isinstance(e, GateError), e
            return
        assert not result.graph.find("opaque")
        reference = model if recipe == "cleanup" else result.module
        tol = dict(atol=1e-4, rtol=1e-4) if recipe == "cleanup" else dict(atol=0.25, rtol=0.05)
        other = with_batch(example, example[0].shape[0] + 2)
        report = validate_onnx(work / "out" / "model.onnx", reference, other, **tol)
        assert report.passed, report.summary()
    finally:
        shutil.rmtree(work, ignore_errors=True)
