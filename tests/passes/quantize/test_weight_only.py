"""INT4 weight-only linears (issue #17, item 1): block-wise codes packed as onnxruntime's MatMulNBits expects,
validated against the IR, RTN and GPTQ rounding, symmetric and asymmetric, the int4-weights recipe."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import slimfx
from slimfx import ir
from slimfx.errors import PassError
from slimfx.ir.ops import nbits_weight, pack_codes, unpack_codes
from slimfx.passes import PassContext, create_pass
from slimfx.passes.quantize.weight_only import block_qparams, fitted_qparams, fold, rtn
from tests.exporters.test_shared_weights import TiedLm


@pytest.mark.parametrize("bits", [4, 8])
def test_codes_pack_low_bits_first_and_unpack_to_the_same_codes(bits):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2 ** bits, (5, 37), generator=g, dtype=torch.int16)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-37 * bits // 8))
    assert torch.equal(unpack_codes(packed, bits, 37), codes)
    if bits == 4:  # first code in the low nibble
        assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)


@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_codes_dequantize_within_half_a_step_of_the_weight(symmetric):
    w = torch.randn(6, 70, generator=torch.Generator().manual_seed(1))
    codes, scales, zps = rtn(w, 4, 32, symmetric)
    assert codes.shape == (6, 96) and scales.shape == (6, 3) and codes.min() >= 0 and codes.max() <= 15
    qweight = pack_codes(codes.to(torch.int16), 4).reshape(6, 3, 16)
    zp = None if symmetric else pack_codes(zps.to(torch.int16), 4)
    deq = nbits_weight(qweight, scales, zp, bits=4, block_size=32, k=70)
    step = scales.repeat_interleave(32, dim=1)[:, :70]
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()


class Mlp(nn.Module):
    def __init__(self, d=72, bias=True):
        super().__init__()
        self.l1 = nn.Linear(d, 128, bias=bias)
        self.l2 = nn.Linear(128, 10)

    def forward(self, x):
        return self.l2(torch.nn.functional.gelu(self.l1(x)))


def _data(n, d=72, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(99)) / 4
    return torch.randn(n, 5, d, generator=g) @ mix


def _sqnr(ref, y):
    return float(10 * torch.log10((ref ** 2).mean() / ((y - ref) ** 2).mean()))


@pytest.mark.parametrize("method, symmetric, block, bias, accuracy_level",
                         [("rtn", False, 32, True, 0), ("rtn", True, 64, False, 4), ("gptq", False, 128, True, 0),
                          ("gptq", True, 32, True, 1)])
def test_matmul_nbits_exports_and_onnxruntime_matches_the_ir(method, symmetric, block, bias, accuracy_level, tmp_path):
    import onnx

    from slimfx.exporters import export_onnx

    torch.manual_seed(0)
    m = Mlp(bias=bias).eval()
    x = _data(3)
    g = ir.capture(m, (x,))
    res = create_pass("quantize-weights", {"method": method, "symmetric": symmetric, "block_size": block,
                                           "accuracy_level": accuracy_level}).run(
        g, PassContext((x,), calibration_data=[(_data(64, seed=1),)], quiet=True))
    ir.verify(g)
    assert res.stats["quantized_layers"] == 2 and [n.op for n in g if n.op == "matmul_nbits"] == ["matmul_nbits"] * 2
    # int8 compute (accuracy_level 4) quantizes the activation inside onnxruntime: looser there
    tol = 0.05 if accuracy_level == 4 else 1e-4
    out = export_onnx(g, tmp_path / "m.onnx", inputs=(x,), atol=tol, rtol=tol)
    model = onnx.load(str(out.path))
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 and all(n.domain == "com.microsoft" for n in nodes)
    attrs = {a.name: a.i for a in nodes[0].attribute}
    assert attrs["K"] == 72 and attrs["N"] == 128 and attrs["bits"] == 4 and attrs["block_size"] == block
    assert attrs.get("accuracy_level", 0) == accuracy_level
    assert (nodes[0].input[3] == "") == symmetric  # zero points only when asymmetric
    assert _sqnr(m(x), ir.lower(g)(x)) > 15


def test_int4_file_is_a_sixth_to_an_eighth_of_fp32_and_gptq_beats_rtn_on_correlated_inputs():
    from slimfx.exporters.onnx import to_onnx_model

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).eval()
    mix = torch.randn(256, 256, generator=torch.Generator().manual_seed(3)) / 8
    data = [(torch.randn(64, 256, generator=torch.Generator().manual_seed(s)) @ mix,) for s in range(8)]
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(100)) @ mix
    g = ir.capture(m, (x[:1],))
    fp32 = len(to_onnx_model(g, inputs=(x[:1],)).SerializeToString())
    sqnr = {}
    # per 32 weights: 32 x 4 bits, a float32 scale and a 4-bit zero point = 5.1 bits a weight (0.16 of 32)
    for method, block, most in (("rtn", 32, 0.165), ("gptq", 32, 0.165), ("rtn", 128, 0.14)):
        q = g.copy()
        create_pass("quantize-weights", {"method": method, "block_size": block}).run(
            q, PassContext((x[:1],), calibration_data=data, quiet=True))
        sqnr[method, block] = _sqnr(m(x), ir.lower(q)(x))
        assert len(to_onnx_model(q, inputs=(x[:1],)).SerializeToString()) / fp32 < most
    assert sqnr["gptq", 32] > sqnr["rtn", 32] + 1.0, sqnr
    assert sqnr["rtn", 32] > sqnr["rtn", 128], sqnr


@pytest.mark.parametrize("opts, match", [({"bits": 5}, "bits = 5; use 4 or 8"),
                                         ({"embedding_bits": 6}, "embedding_bits = 6; use 4 or 8"),
                                         ({"block_size": 48}, "not a power of two"),
                                         ({"block_size": 8}, "block_size")])
def test_bad_options_name_the_option_and_what_to_use(opts, match):
    with pytest.raises(PassError, match=match):
        create_pass("quantize-weights", opts)


def test_gptq_without_calibration_data_says_to_give_data_or_use_rtn():
    p = create_pass("quantize-weights", {"method": "gptq"})
    msg = p.check_context(PassContext((torch.randn(1, 4),), calibration_data=[]))
    assert "calibration data" in msg and "method = 'rtn'" in msg
    assert create_pass("quantize-weights", {}).check_context(PassContext((torch.randn(1, 4),))) is None


def test_int4_weights_recipe_compiles_a_trained_model_and_passes_its_gate(tmp_path):
    from slimfx import models
    from slimfx.data import zoo_data

    spec = models.get("mlp")
    result = slimfx.compile(spec.trained(progress=False).eval(), spec.example_inputs(batch=2), "int4-weights",
                            data=zoo_data(spec.dataset), out_dir=tmp_path / "o", bench_seconds=0, quiet=True)
    assert result.report["gate"]["passed"] and (tmp_path / "o" / "model.onnx").exists()
    assert result.report["passes"][0]["stats"]["quantized_layers"] >= 2
    assert result.report["compressed"]["size_bytes"] < 0.25 * result.report["baseline"]["size_bytes"]


class Tok(nn.Module):
    """A token table and a classifier on the mean of its rows."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.emb = nn.Embedding(50, d)
        self.fc = nn.Linear(d, 4)

    def forward(self, ids):
        return self.fc(self.emb(ids)).mean(dim=1)


def test_embedding_tables_become_int8_unless_turned_off(tmp_path):
    from slimfx.exporters import export_onnx

    torch.manual_seed(0)
    m = Tok().eval()
    ids = torch.randint(0, 50, (2, 6))
    for embeddings, n in ((True, 1), (False, 0)):
        g = ir.capture(m, (ids,))
        res = create_pass("quantize-weights", {"embeddings": embeddings}).run(g, PassContext((ids,), quiet=True))
        assert res.stats["embeddings"] == n and res.stats["quantized_layers"] == 1
        assert (g.params["emb.weight_q"].dtype == torch.int8) if embeddings else "emb.weight" in g.params
        export_onnx(g, tmp_path / f"{n}.onnx", inputs=(ids,), atol=1e-4, rtol=1e-4)


def _nbits_runtime(nbits_cost: float):
    """ms: 1 per linear or folded matmul_nbits, `nbits_cost` per MatMulNBits."""
    def measure(graph, inputs, budget_s):
        cost = sum(nbits_cost if n.op == "matmul_nbits" and n.attrs.get("form", "nbits") == "nbits" else 1.0
                   for n in graph if n.op in ("linear", "matmul_nbits"))
        return [cost * inp[0].shape[0] for inp in inputs]
    return measure


@pytest.mark.parametrize("nbits_cost, chosen", [(1.3, "folded"), (1.03, "folded"), (1.0, "folded"), (0.8, "nbits")])
def test_speed_guard_keeps_matmulnbits_only_where_it_is_clearly_faster_than_the_folded_form(nbits_cost, chosen):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 64)
    g = ir.capture(m, (x,))
    res = create_pass("quantize-weights", {}).run(g, PassContext((x,), quiet=True,
                                                                 measure_ms=_nbits_runtime(nbits_cost)))
    guard = res.stats["speed_guard"]
    assert guard["chosen"] == chosen and guard["decisions"] == {"form": chosen}
    assert {n.attrs.get("form", "nbits") for n in g.find("matmul_nbits")} == {chosen}
    assert guard["model_ratio"]["nbits"]["b1"] == pytest.approx(nbits_cost)
    assert bool(res.stats["notes"]) == (chosen == "folded")
    assert guard["nbits_vs_folded"]["verdict"] == ("faster" if chosen == "nbits" else "slower" if nbits_cost > 1.1
                                                   else "tie")
    # without a runtime, or with accuracy_level 4 (int8 compute exists only in MatMulNBits): MatMulNBits
    for opts, ctx_ms, why in [({}, None, "skipped: no runtime"), ({"accuracy_level": 4}, _nbits_runtime(2.0), "accuracy_level 4"),
                              ({"speed_guard": False}, _nbits_runtime(2.0), "off")]:
        g = ir.capture(m, (x,))
        res = create_pass("quantize-weights", opts).run(g, PassContext((x,), quiet=True, measure_ms=ctx_ms))
        assert res.stats["speed_guard"]["chosen"] == "nbits" and res.stats["speed_guard"]["why"].startswith(why)
        assert not any(n.attrs.get("form") == "folded" for n in g.find("matmul_nbits"))


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), block=st.sampled_from([16, 32]), symmetric=st.booleans(), seed=st.integers(0, 10_000),
       tail=st.floats(1.5, 30.0), weighted=st.booleans())
def test_fitted_ranges_never_round_worse_than_the_full_range(rows, block, symmetric, seed, tail, weighted):
    g = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(tail).sample((rows, block)) * torch.rand(rows, 1, generator=g)
    importance = torch.rand(block, generator=g) if weighted else None

    def err(scale, zp):
        codes = torch.clamp(torch.round(w / scale[:, None]) + zp[:, None], 0, 15)
        assert codes.min() >= 0 and codes.max() <= 15 and (scale > 0).all()
        e = (w - (codes - zp[:, None]) * scale[:, None]) ** 2
        return (e * importance if weighted else e).sum(dim=1)

    fitted = err(*fitted_qparams(w, 4, symmetric, importance))
    assert (fitted <= err(*block_qparams(w, 4, symmetric)) + 1e-6).all()


def test_clip_search_rounds_heavy_tailed_weights_finer():
    # trained weights have tails: clipping the few largest buys finer steps for all the others
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 256))

    def sqnr(clip_search):
        codes, scales, zps = rtn(w, 4, 128, True, clip_search)
        deq = ((codes - zps.repeat_interleave(128, 1)) * scales.repeat_interleave(128, 1))
        return _sqnr(w, deq)

    assert sqnr(True) > sqnr(False) + 1.0, (sqnr(True), sqnr(False))


def _tied_export(method: str, opts: dict, tmp_path, ids):
    """A tied LM captured by `method`, quantize-weights with `opts`, exported (validated against the IR)."""
    from slimfx.exporters.onnx import export_onnx

    torch.manual_seed(0)
    m = TiedLm().eval()
    g = ir.capture(m, (ids,), method=method)
    res = create_pass("quantize-weights", {"block_size": 16, **opts}).run(g, PassContext((ids,), quiet=True))
    path = tmp_path / f"{method}.onnx"
    export_onnx(g, path, inputs=(ids,), atol=1e-4, rtol=1e-4)
    return m, g, res, onnx.load(path)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_table_tied_to_the_lm_head_is_stored_once_as_codes_both_read_whichever_capture(tmp_path, bits):
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    files = {}
    for method in ("fx", "export"):  # fx names the tied weight twice, torch.export once: the same result
        m, g, res, model = _tied_export(method, {"embedding_bits": bits, "bits": bits}, tmp_path, ids)
        (table, readers), = res.stats["tied_tables"].items()
        assert sorted(g.node(r).op if g.has_node(r) else "" for r in readers) == ["gather_nbits", "matmul_nbits"]
        assert res.stats["tied_float"] == [] and res.stats["quantized_layers"] == 2, res.stats
        lookup, head = g.find("gather_nbits")[0], [n for n in g.find("matmul_nbits") if n.attrs["n"] == 40][0]
        assert lookup.inputs[1] == head.inputs[1] and head.attrs["bits"] == bits  # one set of codes
        # no runtime to time on: 8-bit MatMulNBits (no fast CPU kernel) is folded all the same, 4-bit kept
        assert head.attrs.get("form", "nbits") == ("folded" if bits == 8 else "nbits"), res.stats["speed_guard"]
        assert not [k for k, t in g.params.items() if t.is_floating_point() and t.shape == (40, 32)]
        ops = [n.op_type for n in model.graph.node]
        # 4-bit: onnxruntime's kernels on the codes; 8-bit, untimed: the folded forms (Gather, MatMul on the table
        # dequantized at load), since 8-bit MatMulNBits has no fast CPU kernel
        assert ("GatherBlockQuantized" in ops) == ("MatMulNBits" in ops) == (bits == 4), ops
        codes = [t for t in model.graph.initializer if list(t.dims)[:1] == [40] and len(t.dims) == 3 and t.dims[2] > 1]
        assert len(codes) == 1 and codes[0].data_type == onnx.TensorProto.UINT8, [list(t.dims) for t in codes]
        assert not [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                    and 40 * 32 in (int(torch.tensor(list(t.dims)).prod()),)]
        # the logits carry only rounding error: 8-bit far below 4-bit's
        assert _sqnr(m(ids), ir.lower(g)(ids)) > (35 if bits == 8 else 15)
        files[method] = sorted((list(t.dims), t.data_type) for t in model.graph.initializer)
    assert files["fx"] == files["export"]


@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (8, False)])
def test_a_tied_head_in_the_folded_form_reads_the_one_codes_initializer_and_folds_to_a_float_matmul(
        tmp_path, bits, symmetric):
    import onnxruntime as ort

    from slimfx.exporters.onnx import export_onnx

    torch.manual_seed(0)
    m = TiedLm(vocab=40, d=40).eval()  # 40 = 2.5 blocks of 16: padding codes sliced off
    ids = torch.randint(0, 40, (2, 7))
    g = ir.capture(m, (ids,))
    create_pass("quantize-weights", {"block_size": 16, "embedding_bits": bits, "symmetric": symmetric,
                                     "speed_guard": False}).run(g, PassContext((ids,), quiet=True))
    fold([*g.find("matmul_nbits"), *g.find("gather_nbits")])
    export_onnx(g, tmp_path / "m.onnx", inputs=(ids,), atol=1e-4, rtol=1e-4)  # validated against the IR
    model = onnx.load(tmp_path / "m.onnx")
    codes = [t for t in model.graph.initializer if list(t.dims)[:1] == [40] and len(t.dims) == 3 and t.dims[2] > 1]
    assert len(codes) == 1 and list(codes[0].dims) == [40, 3, 16 * bits // 8]
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    # folded at load into fp32's graph: a Gather on the table, the MatMuls
    assert not {"MatMulNBits", "GatherBlockQuantized", "Floor", "Cast", "Concat"} & set(ops) and "Gather" in ops, ops


@settings(max_examples=12, deadline=None)
@given(vocab=st.integers(2, 70), d=st.integers(16, 80), bits=st.sampled_from([4, 8]), block=st.sampled_from([16, 32,
       128]), symmetric=st.booleans(), folded=st.booleans(), seq=st.integers(1, 5))
def test_any_tied_table_exports_to_what_the_ir_computes(vocab, d, bits, block, symmetric, folded, seq):
    import onnxruntime as ort

    from slimfx.exporters.onnx import to_onnx_model

    torch.manual_seed(vocab * 100 + d)
    m = TiedLm(vocab=vocab, d=d).eval()
    ids = torch.randint(0, vocab, (2, seq))
    g = ir.capture(m, (ids,))
    create_pass("quantize-weights", {"block_size": block, "embedding_bits": bits, "symmetric": symmetric,
                                     "speed_guard": False}).run(g, PassContext((ids,), quiet=True))
    assert [n.op for n in g if n.op.endswith("_nbits")].count("gather_nbits") == 1
    fold([*g.find("matmul_nbits"), *g.find("gather_nbits")] if folded else [])
    model = to_onnx_model(g, inputs=(ids,))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    other = torch.randint(0, vocab, (3, seq + 2))  # another batch and length than the example
    for x in (ids, other):
        y = sess.run(None, {model.graph.input[0].name: x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(y), ir.lower(g)(x).detach(), atol=1e-4, rtol=1e-4)


def test_a_tied_head_stays_float_with_its_table_when_tables_are_not_quantized(tmp_path):
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    m, g, res, model = _tied_export("fx", {"embeddings": False}, tmp_path, ids)
    head = [n for n in g if n.op == "linear"]
    assert res.stats["tied_float"] == [n.name for n in head] and res.stats["tied_tables"] == {}, res.stats
    assert res.stats["quantized_layers"] == 1 and res.stats["embeddings"] == 0
    tables = [t for t in model.graph.initializer if sorted(t.dims) == [32, 40]]
    assert len(tables) == 1 and tables[0].data_type == onnx.TensorProto.FLOAT  # one float table serves both
    assert _sqnr(m(ids), ir.lower(g)(ids)) > 20


def test_a_table_narrower_than_min_features_stays_float():
    """T5's relative-position bias is a table of one column a head: nothing to save, and its int8 lookup followed
    by a permute set off an onnxruntime optimizer failure at opset 21."""
    torch.manual_seed(0)
    m = Tok(d=4).eval()
    ids = torch.randint(0, 50, (2, 6))
    g = ir.capture(m, (ids,))
    res = create_pass("quantize-weights", {"min_features": 4}).run(g, PassContext((ids,), quiet=True))
    assert res.stats["embeddings"] == 1
    g = ir.capture(m, (ids,))
    res = create_pass("quantize-weights").run(g, PassContext((ids,), quiet=True))  # min_features 16 > 4 columns
    assert res.stats["embeddings"] == 0 and g.params["emb.weight"].dtype == torch.float32


def test_embedding_bits_4_stores_an_untied_table_as_block_codes(tmp_path):
    from slimfx.exporters.onnx import export_onnx

    torch.manual_seed(0)
    m = Tok(d=40).eval()  # 40 < block_size 128: one block of 64 codes, rows sliced back to 40
    ids = torch.randint(0, 50, (3, 6))
    g = ir.capture(m, (ids,))
    res = create_pass("quantize-weights", {"embedding_bits": 4, "block_size": 128}).run(g, PassContext((ids,),
                                                                                                   quiet=True))
    assert res.stats["embeddings"] == 1 and [n.op for n in g if n.op.endswith("nbits")] == ["gather_nbits",
                                                                                        "matmul_nbits"]
    # the least power of two that holds a row, not 128 codes of which 88 would be padding; two codes a byte
    assert g.params["emb.weight_q4"].shape == (50, 1, 32) and g.node("emb").attrs["block_size"] == 64
    export_onnx(g, tmp_path / "m.onnx", inputs=(ids,), atol=1e-4, rtol=1e-4)
    assert _sqnr(m(ids), ir.lower(g)(ids)) > 15




def test_the_tied_lm_example_compiles_to_one_table_of_codes(tmp_path):
    """docs/examples/tied_lm.py, as a user's model file (fx capture, two names for the tie), through the
    int4-weights recipe: the file holds the table once, as 8-bit block codes both the lookup and the head read."""
    import runpy
    from pathlib import Path

    model, example = runpy.run_path(str(Path(__file__).resolve().parents[3] / "docs" / "examples" / "tied_lm.py"))[
        "make"]()
    res = slimfx.compile(model, example, recipe="int4-weights", out_dir=tmp_path, quiet=True, bench_seconds=0)
    stats = res.report["passes"][0]["stats"]
    assert stats["tied_tables"] == {"wte.weight": ["wte", "head"]} and stats["tied_float"] == []
    model = onnx.load(tmp_path / "model.onnx")
    assert "MatMulNBits" in {n.op_type for n in model.graph.node}  # the 4-bit body (untimed: kept)
    codes = [t for t in model.graph.initializer if list(t.dims) == [2000, 1, 64]]
    assert len(codes) == 1 and codes[0].data_type == onnx.TensorProto.UINT8  # 8-bit codes, one block of 64
    assert not [t for t in model.graph.initializer if sorted(t.dims) == [64, 2000]]  # no float table
    assert res.report["compressed"]["size_bytes"] < 0.3 * res.report["baseline"]["size_bytes"]
    assert res.report["validation"]["top1_agreement"] >= 0.97
