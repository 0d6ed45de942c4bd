"""The quantize pass: folding, every scheme, skip patterns, faithful integer simulation, option errors."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from slimfx import ir
from slimfx.ir.errors import PassError
from slimfx.passes import PassContext, create_pass, parse_pass_spec
from slimfx.passes.quantize.qat import fake_quant_graph
from slimfx.passes.quantize.qdq import collapse_requantize, scale_value


class Net(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.c1 = nn.Conv2d(1, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.fc = nn.Linear(c * 16, 10)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        z = torch.relu(self.c2(y) + y)
        return self.fc(nn.functional.max_pool2d(z, 2).flatten(1))


def _setup(seed=0, c=8):
    torch.manual_seed(seed)
    m = Net(c).eval()
    x = torch.randn(2, 1, 8, 8)
    cal = [(torch.randn(16, 1, 8, 8),) for _ in range(3)]
    return m, ir.capture(m, (x,)), PassContext((x,), calibration_data=cal, quiet=True)


def _sqnr(ref, y):
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - y).pow(2).sum()).detach())


def test_int8_static_folds_weights_and_simulates_the_integer_model():
    m, g, ctx = _setup()
    res = create_pass("quantize", {"scheme": "int8-static"}).run(g, ctx)
    ir.verify(g)
    # weights are int8 params read only by dequantize; no float weight and no weight quantize remain
    for name in ("c1", "c2", "fc"):
        w_dq = g.node(name).inputs[1]
        assert w_dq.op == "dequantize" and w_dq.attrs["axis"] == 0
        assert g.params[w_dq.inputs[0].name].dtype == torch.int8
        b_dq = g.node(name).inputs[2]
        assert g.params[b_dq.inputs[0].name].dtype == torch.int32
        # bias scale = input scale * per-channel weight scale
        x_dq = g.node(name).inputs[0]
        product = b_dq.inputs[1]  # kept in the IR as the product of the two scale params
        assert product.op == "mul" and product.inputs == (x_dq.inputs[1], w_dq.inputs[1])
        s_x = g.params[x_dq.inputs[1].name]
        assert torch.equal(scale_value(g, product), s_x * g.params[w_dq.inputs[1].name])
    assert not any(n.op == "quantize" and not isinstance(n.inputs[0], ir.Node) for n in g)
    assert not [k for k, v in g.params.items() if v.is_floating_point() and v.dim() > 1]
    assert res.stats["weight_bytes"]["after"] < 0.35 * res.stats["weight_bytes"]["before"]
    # every activation a quantized op reads is uint8 quantize -> dequantize
    for n in g.find("quantize"):
        assert n.attrs["dtype"] == torch.uint8
    # the fake-quant lowering equals the integer arithmetic done by hand for the first conv
    gm = ir.lower(g)
    x = ctx.example_inputs[0]
    c1 = g.node("c1")
    qx = ir.get_op("quantize").impl(x, g.params["x_s"], g.params[g.node("x_q").inputs[2].name], dtype=torch.uint8)
    w_q = g.params[c1.inputs[1].inputs[0].name].float()
    acc = nn.functional.conv2d(qx.float() - float(g.params[g.node("x_q").inputs[2].name]), w_q,
                               g.params[c1.inputs[2].inputs[0].name].float(), padding=1)
    by_hand = acc * (g.params["x_s"] * g.params[c1.inputs[1].inputs[1].name]).reshape(1, -1, 1, 1)
    from slimfx.passes.quantize.calibrate import run_with_outputs
    _, (c1_val,) = run_with_outputs(g, ["c1"])(x)
    assert torch.allclose(c1_val, by_hand, rtol=1e-5, atol=1e-5)
    assert _sqnr(m(x), gm(x)) > 25


@pytest.mark.parametrize("scheme", ["int8-static", "int8-dynamic", "fixed-point", "sign"])
def test_every_scheme_produces_a_verified_qdq_graph(scheme):
    m, g, ctx = _setup()
    create_pass("quantize", {"scheme": scheme}).run(g, ctx)
    ir.verify(g)
    x = ctx.example_inputs[0]
    y = ir.lower(g)(x)
    ints = {n.inputs[0].name: g.params[n.inputs[0].name] for n in g.find("dequantize")
            if isinstance(n.inputs[0], ir.Param)}
    assert ints and all(not t.is_floating_point() for t in ints.values())
    if scheme == "sign":
        w = g.params["c2.weight_q"]
        assert set(w.unique().tolist()) == {-1, 1}
        assert set(g.params["c1.weight_q"].unique().tolist()) != {-1, 1}  # first layer kept 8-bit
        assert _sqnr(m(x), y) > 3
    elif scheme == "fixed-point":
        for n in g.find("dequantize"):
            if n.inputs[0].name.endswith("bias_q"):
                continue
            s = g.params[n.inputs[1].name]
            assert torch.equal(s, 2.0 ** torch.round(torch.log2(s)))  # power-of-two scales
            assert int(g.params[n.inputs[2].name].abs().max()) == 0
        assert _sqnr(m(x), y) > 20
    elif scheme == "int8-dynamic":
        assert g.find("dynamic_quantize") and not g.find("quantize")
        assert _sqnr(m(x), y) > 30
    else:
        assert _sqnr(m(x), y) > 25


def test_skip_keeps_layers_float():
    _, g, ctx = _setup()
    res = parse_pass_spec("quantize{skip=['fc', 'c1']}").run(g, ctx)
    assert sorted(res.stats["skipped"]) == ["c1", "fc"]
    assert isinstance(g.node("fc").inputs[1], ir.Param) and g.params[g.node("fc").inputs[1].name].dtype == torch.float32
    assert g.node("c2").inputs[1].op == "dequantize"
    _, g, ctx = _setup()
    res = create_pass("quantize", {"skip": ["conv2d"]}).run(g, ctx)  # by op
    assert sorted(res.stats["skipped"]) == ["c1", "c2"]


def test_collapse_requantize_drops_equal_round_trips():
    _, g, ctx = _setup()
    create_pass("quantize", {}).run(g, ctx)
    dq = g.node("relu_dq")
    q2 = g.create_node("quantize", (dq, *g.node("relu_q").inputs[1:]), dict(g.node("relu_q").attrs),
                       after=dq, meta=g.node("relu_q").meta)
    dq2 = g.create_node("dequantize", (q2, *dq.inputs[1:]), dict(dq.attrs), after=q2, meta=dq.meta)
    g.node("c2").replace_input(dq, dq2)
    assert collapse_requantize(g) == 1
    assert g.node("c2").inputs[0] is dq2 and dq2.inputs[0] is g.node("relu_q")
    ir.verify(g)


def test_option_errors_name_the_option():
    with pytest.raises(PassError, match="scheme"):
        create_pass("quantize", {"scheme": "int4-magic"})
    with pytest.raises(PassError, match=r"'bits' must be in \[2, 8\], got 12"):
        create_pass("quantize", {"bits": 12})
    with pytest.raises(PassError, match="calibration"):
        create_pass("quantize", {"calibration": "kl"})
    with pytest.raises(PassError, match="activation_dtype"):
        create_pass("quantize", {"activation_dtype": "int4"})
    _, g, _ = _setup()
    with pytest.raises(PassError, match="needs calibration data"):
        create_pass("quantize", {}).run(g, PassContext((torch.randn(1, 1, 8, 8),)))
    _, g, ctx = _setup()
    with pytest.raises(PassError, match=r"pass 'quantize' \(qat_epochs = 1\) needs train data .* qat_required = false"):
        create_pass("quantize", {"scheme": "sign", "qat_epochs": 1, "qat_required": True}).run(g, ctx)
    # dynamic quantization needs no calibration data
    _, g, _ = _setup()
    create_pass("quantize", {"scheme": "int8-dynamic"}).run(g, PassContext((torch.randn(1, 1, 8, 8),)))


def _digits_cnn_folded():
    """The zoo's trained digits CNN, captured, batch norms folded."""
    from slimfx import models

    m = models.get("digits_cnn").trained(progress=False).eval()
    ds = models.load_dataset("digits")
    g = ir.capture(m, (ds.train_x[:1],))
    create_pass("fold-batchnorm").run(g, PassContext((ds.train_x[:1],)))
    return g, ds


def test_qat_with_ste_recovers_sign_weights_on_digits(monkeypatch):
    from slimfx import models
    from slimfx.passes.quantize import qat

    g, ds = _digits_cnn_folded()
    x = ds.train_x
    ctx = PassContext((x[:1],), calibration_data=[(x[:256],)], quiet=True,
                      train_data=[((x[i:i + 64],), ds.train_y[i:i + 64]) for i in range(0, len(x), 64)])
    plain = g.copy()
    create_pass("quantize", {"scheme": "sign"}).run(plain, ctx)
    trained = []  # the fake-quant graph QAT trains
    monkeypatch.setattr(qat, "fake_quant_graph", lambda *a: trained.append(fake_quant_graph(*a)) or trained[-1])
    res = create_pass("quantize", {"scheme": "sign", "qat_epochs": 4, "qat_lr": 2e-3}).run(g, ctx)
    with torch.no_grad():  # what ships computes what was trained: the activation ranges it trained through
        y_trained, y = ir.lower(trained[0]).eval()(ds.test_x), ir.lower(g)(ds.test_x)
    assert (y.argmax(1) == y_trained.argmax(1)).float().mean() >= 0.99 and _sqnr(y_trained, y) > 30, _sqnr(y_trained, y)
    trained_scales = {k[:-len("_fq_scale")]: v for k, v in trained[0].params.items() if k.endswith("_fq_scale")}
    assert trained_scales and all(torch.equal(g.params[f"{k}_s"], v) for k, v in trained_scales.items()), [
        (k, float(g.params[f"{k}_s"]), float(v)) for k, v in trained_scales.items()]
    ir.verify(g)
    assert res.stats["qat"].startswith("4 epochs, loss ")
    assert set(g.params["features.1.0.weight_q"].unique().tolist()) == {-1, 1}
    acc_plain, acc_qat = models.accuracy(ir.lower(plain), ds), models.accuracy(ir.lower(g), ds)
    assert acc_qat > acc_plain + 0.1 and acc_qat >= 0.93, (acc_plain, acc_qat)


def test_qat_without_train_data_is_skipped_and_said_unless_required_and_empty_data_is_refused():
    """QAT follows finetune's rule (one place: passes.finetune.check_train_data / train_or_skip)."""
    _, g, ctx = _setup()
    plain = g.copy()
    create_pass("quantize", {"scheme": "sign"}).run(plain, ctx)
    qat = create_pass("quantize", {"scheme": "sign", "qat_epochs": 3})
    assert qat.check_context(ctx) is None
    res = qat.run(g, ctx)
    assert res.stats["qat"] == "skipped: no train data" and "qat" not in create_pass("quantize", {}).run(
        _setup()[1], ctx).stats
    assert all(torch.equal(g.params[k], plain.params[k]) for k in plain.params)  # plain sign, no training
    strict = create_pass("quantize", {"scheme": "sign", "qat_epochs": 3, "qat_required": True})
    msg = strict.check_context(ctx)
    assert "pass 'quantize' (qat_epochs = 3) needs train data" in msg and "qat_required = false" in msg
    for empty in ([], (torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))):
        ctx_empty = PassContext(ctx.example_inputs, calibration_data=ctx.calibration_data, train_data=empty,
                                quiet=True)
        for p in (qat, strict):
            msg = p.check_context(ctx_empty)
            assert "(qat_epochs = 3) trains on the train data, but it is empty" in msg and "qat_epochs = 0" in msg
            with pytest.raises(PassError, match=r"but it is empty .*set qat_epochs = 0"):
                p.run(_setup()[1], ctx_empty)
    ctx_nocal = PassContext(ctx.example_inputs, calibration_data=[], quiet=True)
    assert "the calibration data is empty" in create_pass("quantize", {}).check_context(ctx_nocal)


def test_the_builtin_sign_recipe_runs_without_train_data_and_says_qat_was_skipped():
    from slimfx.recipe import load_recipe

    m, _, ctx = _setup()
    rec = load_recipe("sign")
    passes = rec.build_passes()
    rec.check_context(passes, ctx)  # it used to be a RecipeError for every model without train data
    g = ir.capture(m, ctx.example_inputs)
    stats = [p.run(g, ctx).stats for p in passes]
    assert stats[-1]["qat"] == "skipped: no train data"
    ir.verify(g)


@settings(max_examples=8)
@given(st.integers(2, 8), st.booleans(), st.sampled_from(["minmax", "percentile", "entropy", "mse",
                                                          "moving-average"]), st.booleans())
def test_bits_and_calibrations_keep_weights_in_range(bits, per_channel, calibration, keep_first_last):
    _, g, ctx = _setup()
    create_pass("quantize", {"bits": bits, "per_channel": per_channel, "calibration": calibration,
                             "keep_first_last": keep_first_last}).run(g, ctx)
    ir.verify(g)
    qmax = min(2 ** (bits - 1) - 1, 64)  # reduce_range (the default) caps weights at 7 bits
    for name in ("c1", "c2", "fc"):
        dq = g.node(name).inputs[1]
        w = g.params[dq.inputs[0].name]
        # below 8 bits the first and last layer (c1, fc) stay 8-bit unless keep_first_last = false
        edge = name != "c2" and keep_first_last and bits < 8
        assert int(w.abs().max()) == (64 if edge else qmax)  # symmetric range fully used by the largest weight
        assert dq.attrs.get("bits") == (4 if bits <= 4 and not edge else None)  # stored as INT4
    assert torch.isfinite(ir.lower(g)(ctx.example_inputs[0])).all()


@pytest.mark.parametrize("reduce_range, qmax", [(True, 64), (False, 127)])
def test_reduce_range_keeps_int8_weights_in_seven_bits_unless_turned_off(reduce_range, qmax):
    _, g, ctx = _setup()
    create_pass("quantize", {"scheme": "int8-static", "reduce_range": reduce_range}).run(g, ctx)
    for name in ("c1", "c2", "fc"):
        w = g.params[g.node(name).inputs[1].inputs[0].name]
        assert int(w.abs().max()) == qmax


def _optimized_op_types(model_bytes: bytes, tmp_path) -> set[str]:
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}


@pytest.mark.parametrize("scheme", ["int8-static", "int8-dynamic", "fixed-point", "sign"])
def test_every_scheme_exports_qdq_onnx_that_matches_the_ir(scheme, tmp_path):
    import onnx

    from slimfx.exporters.onnx import to_onnx_model
    from slimfx.exporters.validate import validate_onnx

    m, g, ctx = _setup()
    create_pass("quantize", {"scheme": scheme}).run(g, ctx)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    model = to_onnx_model(g, inputs=(x,))
    inits = {i.name: i for i in model.graph.initializer}
    weights = [i for i in inits.values() if len(i.dims) > 1]
    assert weights and all(i.data_type == onnx.TensorProto.INT8 for i in weights)  # no float weight stored
    report = validate_onnx(model, g, (x,), atol=1e-3, rtol=1e-3)
    assert report.top1_agreement == 1.0 and report.max_abs_diff < 1e-3
    ops = _optimized_op_types(model.SerializeToString(), tmp_path)
    if scheme == "int8-dynamic":
        assert "DynamicQuantizeLinear" in ops
    else:  # onnxruntime fuses the QDQ pattern into integer kernels, leaving no float conv
        assert {"QLinearConv", "QLinearAdd"} <= ops and "Conv" not in ops, ops


def test_float_first_keeps_only_the_first_weight_layer_float():
    _, g, ctx = _setup()
    first = next(n for n in g if n.op in ("conv2d", "linear"))
    create_pass("quantize", {"float_first": True}).run(g, ctx)
    weights = [n for n in g if n.op in ("conv2d", "linear")]
    assert weights[0].name == first.name and isinstance(weights[0].inputs[1], ir.Param)  # float weight param
    assert g.params[weights[0].inputs[1].name].dtype == torch.float32
    rest = [n.inputs[1] for n in weights[1:]]
    assert rest and all(isinstance(w, ir.Node) and w.op == "dequantize" for w in rest)


def test_float_first_leaves_a_long_first_reduction_int8():
    mlp = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.randn(8, 64)
    g = ir.capture(mlp, (x,))
    create_pass("quantize", {"float_first": True}).run(g, PassContext((x,), calibration_data=[(x,)]))
    assert all(n.inputs[1].op == "dequantize" for n in g.find("linear"))  # fan-in 64: stays int8


class EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(50, 16)
        self.pos = nn.Embedding(6, 16)
        self.fc = nn.Linear(16, 50)
        self.register_buffer("positions", torch.arange(6))

    def forward(self, ids):
        return self.fc(self.tok(ids) + self.pos(self.positions))


@pytest.mark.parametrize("scheme", ["int8-static", "int8-dynamic"])
def test_embedding_tables_are_stored_int8_and_export_as_gather_then_dequantize(scheme, tmp_path):
    import onnx

    from slimfx.exporters.onnx import to_onnx_model
    from slimfx.exporters.validate import validate_onnx

    torch.manual_seed(0)
    m = EmbedNet().eval()
    ids = torch.randint(0, 50, (4, 6))
    g = ir.capture(m, (ids,))
    ctx = PassContext((ids,), calibration_data=[(torch.randint(0, 50, (8, 6)),)], quiet=True)
    params = ir.count_params(g)
    res = create_pass("quantize", {"scheme": scheme}).run(g, ctx)
    assert res.stats["embeddings"] == 2
    assert ir.count_params(g) == params  # the int8 tables are still the model's parameters
    assert g.params["tok.weight_q"].dtype == torch.int8 and "tok.weight" not in g.params
    w = m.tok.weight.detach()
    s = g.params["tok.weight_s"]
    assert s.dim() == 0 and torch.allclose(s, w.abs().max() / 127)  # one symmetric scale per table
    # int8 table rows: error at most half a step
    dq = g.params["tok.weight_q"].float() * s
    assert (dq - w).abs().max() <= s / 2 + 1e-7
    with torch.no_grad():
        assert _sqnr(m(ids), ir.lower(g)(ids)) > 25
    model = to_onnx_model(g, inputs=(ids,))
    inits = {i.name: i for i in model.graph.initializer}
    assert inits["tok.weight_q"].data_type == onnx.TensorProto.INT8
    assert not [i for i in inits.values() if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) > 1]
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == "tok.weight_q")
    assert [n.op_type for n in model.graph.node if gather.output[0] in n.input] == ["DequantizeLinear"]
    report = validate_onnx(model, g, (ids,), atol=1e-4, rtol=1e-4)
    assert report.max_abs_diff < 1e-4


@pytest.mark.parametrize("scheme, per_channel, method", [
    ("int8-static", True, "fx"), ("int8-static", True, "export"), ("int8-dynamic", True, "fx"),
    ("int8-static", False, "fx")])
def test_a_table_tied_to_an_int8_head_is_looked_up_in_the_heads_codes_and_stored_once(
        scheme, per_channel, method):
    """The LM head's int8 weight is the table, rows by output channel: the lookup gathers those codes (and each
    row's scale when they are per channel) instead of storing a per-tensor int8 copy beside them."""
    import onnx

    from slimfx.exporters.onnx import to_onnx_model
    from slimfx.exporters.validate import validate_onnx
    from slimfx.passes.quantize import ptq
    from tests.exporters.test_shared_weights import TiedLm

    torch.manual_seed(0)
    m = TiedLm(vocab=200, d=32).eval()
    ids = torch.randint(0, 200, (4, 6))
    opts = {"scheme": scheme, "per_channel": per_channel, "speed_guard": False}

    def quantized(shared: bool):
        g = ir.capture(m, (ids,), method=method)
        ctx = PassContext((ids,), calibration_data=[(torch.randint(0, 200, (8, 6)),)], quiet=True)
        real = ptq.tied_heads
        ptq.tied_heads = real if shared else (lambda graph, lookups: {})
        try:
            res = create_pass("quantize", opts).run(g, ctx)
        finally:
            ptq.tied_heads = real
        return g, res, to_onnx_model(g, inputs=(ids,))

    g, res, model = quantized(True)
    lookup, head = g.find("embedding")[0], g.find("linear")[-1]
    assert lookup.inputs[1] == head.inputs[1].inputs[0], (lookup, head.inputs[1])  # the head's codes
    assert res.stats["embeddings"] == 1
    tables = [t for t in model.graph.initializer if sorted(t.dims) == [32, 200]]
    assert [t.data_type for t in tables] == [onnx.TensorProto.INT8], [(t.name, list(t.dims)) for t in tables]
    twice, res_twice, model_twice = quantized(False)  # what it stored before: a per-tensor int8 copy too
    assert len([t for t in model_twice.graph.initializer if sorted(t.dims) == [32, 200]]) == 2
    saved = 200 * 32 - 4 * (200 if per_channel else 1)  # a second int8 table less, a column of row scales more
    assert 0 <= res_twice.stats["weight_bytes"]["after"] - res.stats["weight_bytes"]["after"] - 200 * 32 <= 8
    assert model_twice.ByteSize() - model.ByteSize() >= saved
    assert res.stats["weight_bytes"]["before"] == 4 * (200 * 32 + 32 * 32 + 32)  # the tied table counted once
    with torch.no_grad():  # the rows carry the head's rounding: as close to float as the copy's
        assert _sqnr(m(ids), ir.lower(g)(ids)) > _sqnr(m(ids), ir.lower(twice)(ids)) - 1.0 > 25
    assert validate_onnx(model, g, (ids,), atol=1e-4, rtol=1e-4).passed
    from slimfx.ir.analysis import example_inputs  # what inspect, validate and run-pass feed a saved graph

    (drawn,) = example_inputs(g, batch=64)
    assert 100 < int(drawn.max()) < 200  # in range for the table, whose rows the row-scale lookup reads too

class GruText(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.rnn, self.fc = nn.Embedding(40, 12), nn.GRU(12, 10, batch_first=True), nn.Linear(10 + 12, 3)

    def forward(self, ids):
        e = self.emb(ids)
        out, _ = self.rnn(e)  # the GRU emitter transposes its batch_first input
        return self.fc(torch.cat([out[:, -1], e.permute(0, 2, 1).mean(-1)], 1))


def test_an_int8_lookup_read_through_a_transpose_loads_in_onnxruntime_at_opset_21():
    """onnxruntime's transpose optimizer turned DequantizeLinear(int8) -> Transpose into a QuantizeLinear it then
    refused ("output_dtype INT8 does not match y_zero_point type UINT8"): the session of every such file failed."""
    from slimfx.exporters.onnx import to_onnx_model
    from slimfx.exporters.validate import validate_onnx

    torch.manual_seed(0)
    ids = torch.randint(0, 40, (3, 7))
    g = ir.capture(GruText().eval(), (ids,))
    ctx = PassContext((ids,), calibration_data=[(torch.randint(0, 40, (8, 7)),)], quiet=True)
    create_pass("quantize", {"scheme": "int8-static", "speed_guard": False}).run(g, ctx)
    model = to_onnx_model(g, inputs=(ids,), opset=21)
    lookup = next(n.output[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] == "emb.weight_q")
    assert [n.op_type for n in model.graph.node if lookup in n.input] == ["Transpose", "Transpose"]  # int8 moved
    assert validate_onnx(model, g, (ids,), atol=1e-4, rtol=1e-4).passed


def test_a_transpose_of_a_per_channel_int8_dequantize_moves_its_axis_with_it():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from slimfx.exporters.onnx.rewrites import transposes_before_dequantize

    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (4, 5, 6)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, 5).astype(np.float32)
    inits = {"q": numpy_helper.from_array(q, "q"), "s": numpy_helper.from_array(scale, "s"),
             "z": numpy_helper.from_array(np.zeros(5, np.int8), "z")}
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=1),
             helper.make_node("Transpose", ["w"], ["t"], perm=[2, 0, 1]), helper.make_node("Relu", ["t"], ["y"])]
    nodes = transposes_before_dequantize(nodes, inits, opset=21)
    assert [n.op_type for n in nodes] == ["DequantizeLinear", "Transpose", "DequantizeLinear", "Relu"]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              list(inits.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})
    expected = np.maximum(q.astype(np.float32) * scale[None, :, None], 0).transpose(2, 0, 1)
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    assert transposes_before_dequantize(nodes[:1] + nodes[-2:], inits, opset=20) == nodes[:1] + nodes[-2:]


def test_embeddings_option_and_tied_tables_keep_float():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 6))
    g = ir.capture(EmbedNet().eval(), (ids,))
    create_pass("quantize", {"scheme": "int8-dynamic", "embeddings": False}).run(g, PassContext((ids,)))
    assert g.params["tok.weight"].dtype == torch.float32 and "tok.weight_q" not in g.params
    g = ir.capture(EmbedNet().eval(), (ids,))
    fc = g.node("fc")
    fc.inputs = (fc.inputs[0], ir.Param("tok.weight"), fc.inputs[2])  # tie the output layer to the table
    g.remove_unused_params()
    res = create_pass("quantize", {"scheme": "int8-dynamic", "skip": ["linear"]}).run(g, PassContext((ids,)))
    assert res.stats["embeddings"] == 1  # only pos: the fc also reads tok's table
    assert g.node("tok").inputs[1].name == "tok.weight" and g.params["tok.weight"].dtype == torch.float32


def test_zero_zero_points_are_one_shared_param_per_dtype_and_length():
    m, g, ctx = _setup(c=8)
    create_pass("quantize", {"scheme": "int8-static"}).run(g, ctx)
    dqs = [n for n in g if n.op == "dequantize" and isinstance(n.inputs[0], ir.Param)
           and n.inputs[0].name.endswith("weight_q")]
    zps = {n.inputs[2].name for n in dqs}
    assert "zero_int8_8" in zps  # c1 and c2 (8 channels each) share it
    assert sum(n.inputs[2].name == "zero_int8_8" for n in dqs) == 2
    assert not g.params["zero_int8_8"].any()
    with torch.no_grad():
        x = torch.randn(4, 1, 8, 8)
        assert _sqnr(m(x), ir.lower(g)(x)) > 20


def test_per_channel_min_gain_keeps_per_channel_scales_only_where_they_pay():
    m, g, ctx = _setup(c=8)
    with torch.no_grad():
        m.c2.weight.mul_(torch.logspace(-2, 0, 8).reshape(-1, 1, 1, 1))  # c2's channels: 100x apart in range
    g = ir.capture(m, ctx.example_inputs)
    res = create_pass("quantize", {"scheme": "int8-static", "per_channel_min_gain_db": 6.0}).run(g, ctx)
    assert res.changed
    axes = {n.name: n.attrs.get("axis") for n in g if n.op == "dequantize" and isinstance(n.inputs[0], ir.Param)}
    # c1/fc weights (one init distribution per layer): one scale; c2 (ranges 100x apart): one per channel
    assert axes["c1_weight_dq"] is None and axes["fc_weight_dq"] is None and axes["c2_weight_dq"] == 0
    assert axes["c1_bias_dq"] is None and scale_value(g, g.node("c1_bias_dq").inputs[1]).dim() == 0
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert _sqnr(m(x), ir.lower(g)(x)) > 20


def test_bias_scales_are_products_and_small_biases_int16_and_onnxruntime_still_fuses(tmp_path, monkeypatch):
    import onnx
    from onnx import numpy_helper

    from slimfx.exporters.onnx import to_onnx_model

    m, g, ctx = _setup(c=32)  # 32-channel convs: int16 biases pay; the 10-output fc's does not
    with torch.no_grad():
        m.c2.bias.fill_(1e3)  # int32 values beyond int16: stored as int32
    g = ir.capture(m, ctx.example_inputs)
    create_pass("quantize", {"scheme": "int8-static"}).run(g, ctx)
    model = to_onnx_model(g, inputs=ctx.example_inputs)
    made_by = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    bias_dqs = {n.input[0].split(".")[0]: n for n in model.graph.node
                if n.op_type == "DequantizeLinear" and "bias" in n.input[0]}
    assert set(bias_dqs) == {"c1", "c2", "fc"}
    for dq in bias_dqs.values():  # no stored bias scale vector: Mul(input scale, weight scale)
        mul = made_by[dq.input[1]]
        assert mul.op_type == "Mul" and inits[mul.input[0]].ndim == 0 and inits[mul.input[1]].ndim == 1
    assert bias_dqs["fc"].input[0] in inits  # 10 values: 20 bytes saved would not pay for a Cast node
    stored = {k: (made_by[dq.input[0]].input[0] if dq.input[0] in made_by else dq.input[0])
              for k, dq in bias_dqs.items()}
    assert inits[stored["c1"]].dtype == np.int16 and inits[stored["fc"]].dtype == np.int32
    assert inits[stored["c2"]].dtype == np.int32 and np.abs(inits[stored["c2"]]).max() > 2 ** 15
    for layer in ("c1", "c2", "fc"):
        s = scale_value(g, g.node(f"{layer}_bias_dq").inputs[1])
        assert torch.equal(torch.from_numpy(np.asarray(inits[stored[layer]], dtype=np.int32)),
                           g.params[f"{layer}.bias_q"]) and s.dim() == 1
    ops = _optimized_op_types(model.SerializeToString(), tmp_path)
    assert {"QLinearConv", "QGemm"} <= ops and not ops & {"Conv", "Gemm", "Mul", "Cast", "DequantizeLinear"}, ops
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    from slimfx.exporters.validate import validate_onnx

    assert validate_onnx(model, g, (x,), atol=1e-3, rtol=1e-3).max_abs_diff < 1e-3
    assert onnx.checker.check_model(model, full_check=True) is None
    # bit-identical to the plain encoding (stored int32 biases and bias scale vectors)
    from slimfx.exporters.bench import ort_feed, ort_session

    plain = _plain_encoding(g, ctx.example_inputs, monkeypatch)
    assert len(plain.SerializeToString()) > len(model.SerializeToString())
    run = [ort_session(m) for m in (model, plain)]
    a, b = (s.run(None, ort_feed(s, (x,)))[0] for s in run)
    assert np.array_equal(a, b)


def _plain_encoding(g, inputs, monkeypatch):
    """The ONNX model with every bias scale a stored vector and no ONNX-level rewrite (exporters/onnx/rewrites)."""
    import slimfx.exporters.onnx.export as export

    g = g.copy()
    for n in list(g.find("mul")):
        if all(isinstance(f, ir.Param) for f in n.inputs) and all(u.op == "dequantize" for u in n.users):
            stored = g.add_param(n.name, scale_value(g, n), buffer=True)
            for u in list(n.users):
                u.replace_input(n, stored)
            g.erase(n)
    with monkeypatch.context() as patch:
        patch.setattr(export, "rewrite", lambda nodes, inits, outputs, opset: (nodes, inits))
        return export.to_onnx_model(g, inputs=inputs)


def test_compact_bias_storage_never_makes_a_file_bigger(monkeypatch):
    from slimfx.exporters.onnx import to_onnx_model

    for c in (2, 8, 64):
        m, g, ctx = _setup(c=c)
        create_pass("quantize", {"scheme": "int8-static"}).run(g, ctx)
        compact = len(to_onnx_model(g, inputs=ctx.example_inputs).SerializeToString())
        plain = len(_plain_encoding(g, ctx.example_inputs, monkeypatch).SerializeToString())
        assert compact <= plain, (c, compact, plain)
        if c == 64:
            assert compact < plain - 64 * 4  # at least the conv biases' scale vectors are gone


def test_dropout_gets_no_second_quantize_and_the_next_bias_is_still_int32():
    class DropNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.drop, self.fc2 = nn.Linear(16, 32), nn.Dropout(0.2), nn.Linear(32, 10)

        def forward(self, x):
            return self.fc2(self.drop(torch.relu(self.fc1(x))))

    torch.manual_seed(0)
    m = DropNet().eval()
    x = torch.randn(4, 16)
    g = ir.capture(m, (x,))
    ctx = PassContext((x,), calibration_data=[(torch.randn(32, 16),)], quiet=True)
    create_pass("quantize", {"scheme": "int8-static"}).run(g, ctx)
    assert sum(n.op == "quantize" for n in g) == 2  # the input and relu's output, not dropout's too
    fc2 = g.node("fc2")
    assert fc2.inputs[2].op == "dequantize" and g.params[fc2.inputs[2].inputs[0].name].dtype == torch.int32
    with torch.no_grad():
        assert _sqnr(m(x), ir.lower(g)(x)) > 25
