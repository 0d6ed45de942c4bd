"""ONNX emitter: every model kind and canonical op exports, passes onnx.checker and shape inference,
and matches the IR's lowering in onnxruntime at batch 1 and 7 (dynamic batch)."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimfx import ir
from slimfx.exporters import export_onnx, to_onnx_model, validate_onnx, with_batch
from slimfx.exporters.onnx import EMITTERS
from slimfx.ir.errors import ExportError, ValidationError
from tests.exporters.small_models import SMALL_MODELS, build


def _check_batches(model_proto: onnx.ModelProto, module: nn.Module, x: tuple, atol: float = 1e-5):
    """onnxruntime vs the original module at batch 1 and 7; returns the worst report."""
    rep = validate_onnx(model_proto, module, [with_batch(x, 1), with_batch(x, 7)], atol=atol, rtol=0.0)
    assert rep.batches == [1, 7]
    assert rep.passed, rep.summary()
    return rep


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_small_models_export_and_match(name, tmp_path):
    model, x = build(name)
    g = ir.capture(model, x)
    path = tmp_path / f"{name}.onnx"
    res = export_onnx(g, path, inputs=x)
    assert path.exists() and res.size_bytes == path.stat().st_size
    assert res.validation.passed and res.validation.max_abs_diff < 1e-5
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    out_shape = [d.dim_param or d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim]
    assert out_shape == ["batch", model(*x).shape[-1]]
    # Names come from forward's signature; batch is symbolic.
    assert [i.name for i in m.graph.input] == [n.name for n in g.inputs]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.name for o in m.graph.output] == ["output"]
    rep = _check_batches(m, model, x)
    assert rep.max_abs_diff < 1e-5 and rep.top1_agreement == 1.0 and rep.cosine > 0.999999
    # Lean graph: no run-time shape computation, no identities, no duplicate initializers.
    ops = [n.op_type for n in m.graph.node]
    assert not {"Shape", "Identity", "Cast", "Concat"} & set(ops), ops
    names = [i.name for i in m.graph.initializer]
    assert len(names) == len(set(names))


def test_linear_emits_gemm_for_2d_and_matmul_for_3d():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.b(self.a(x).unsqueeze(1)).squeeze(1)

    m, x = M().eval(), (torch.randn(2, 8),)
    proto = to_onnx_model(ir.capture(m, x), inputs=x)
    ops = [n.op_type for n in proto.graph.node]
    assert ops == ["Gemm", "Unsqueeze", "MatMul", "Add", "Squeeze"]
    _check_batches(proto, m, x)


class OpZoo(nn.Module):
    """Touches most canonical ops once, with shapes that keep everything cheap."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding="same", groups=2)
        self.c2 = nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(8, elementwise_affine=False)
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 8)
        self.bn1d = nn.BatchNorm1d(8)

    def forward(self, x, seq, ids):
        # x: [B, 2, 8, 8], seq: [B, 4, 6], ids: [B, 5] int64
        y = self.gn(self.c2(x))                                     # [B, 4, 4, 4]
        y = F.hardswish(y) + F.hardsigmoid(y) - F.leaky_relu(y, 0.2) * F.silu(y)
        y = torch.clamp(y, -2.0, 3.0).pow(2) + y.abs().sqrt() - torch.rsqrt(y.abs() + 1.0)
        y = F.max_pool2d(y, 2) + F.avg_pool2d(y, 2, count_include_pad=False)   # [B, 4, 2, 2]
        y = F.adaptive_avg_pool2d(y, (1, 2)) * 0.5 + F.adaptive_max_pool2d(y, 1)  # [B, 4, 1, 2]
        y = F.interpolate(y, scale_factor=2.0, mode="nearest")                  # [B, 4, 2, 4]
        y = F.interpolate(y, size=(3, 5), mode="bilinear", align_corners=False)  # [B, 4, 3, 5]
        a, b = y.split([1, 3], dim=1)
        c = torch.cat([b, a], 1).permute(0, 2, 3, 1).flatten(1, 2)                # [B, 15, 4]
        c = F.log_softmax(c, dim=-1) + c.softmax(1) + torch.tanh(c) + torch.sigmoid(c).exp().log()
        s = F.relu6(self.c1(seq))                                                 # [B, 8, 6]
        s = F.avg_pool1d(F.max_pool1d(s, 2, 1), 2)                                # [B, 8, 2]
        s = self.bn1d(s).transpose(1, 2)                                          # [B, 2, 8]
        e = self.ln(self.emb(ids))                                                # [B, 5, 8]
        e = F.gelu(self.lin(e), approximate="tanh")
        e = torch.stack([e[:, 0], e[:, -1], e[:, 1::2].mean(1)], dim=1)           # [B, 3, 8]
        e = torch.cat([e, s], 1)                                                  # [B, 5, 8]
        k0, k1 = e.chunk(2, dim=-1)
        e = (k0 * k1).sum(-1, keepdim=True) / 4 + k0[..., None, 0:1].squeeze(-2)  # [B, 5, 1]
        n = (ids.float() * 0.5 + 1).unsqueeze(-1)                                 # int -> float promotion
        q = c[:, None, :5, :].expand(-1, 2, -1, -1)                               # [B, 2, 5, 4]
        att = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return att.mean((1, 3)) + e.squeeze(-1) + n.squeeze(-1) - torch.erf(e.squeeze(-1)).neg().reciprocal()


def test_op_zoo_matches(tmp_path):
    m = OpZoo().eval()
    with torch.no_grad():
        m.bn1d.running_mean.uniform_(-0.5, 0.5)
        m.bn1d.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 2, 8, 8, generator=g), torch.randn(2, 4, 6, generator=g),
         torch.randint(0, 10, (2, 5), generator=g))
    graph = ir.capture(m, x)
    assert not graph.find("opaque"), [n.name for n in graph.find("opaque")]
    res = export_onnx(graph, tmp_path / "zoo.onnx", inputs=x)
    assert res.validation.passed
    proto = onnx.load(str(tmp_path / "zoo.onnx"))
    used = {n.op for n in graph}
    assert len(used - {"input", "output"}) >= 45, sorted(used)
    _check_batches(proto, m, x, atol=2e-5)


@pytest.mark.parametrize("kind", ["bool", "float", "causal+bool"])
def test_attention_with_a_query_masked_everywhere_gives_zeros_like_torch(kind, tmp_path):
    """A padding mask that masks every key of some query (an all-zero attention_mask row): torch's SDPA gives
    that query zeros, a plain Softmax NaN (a BERT export failed its gate on generated masks for this)."""

    class Attend(nn.Module):
        def forward(self, x, keep):
            mask = keep[:, None, None, :] & keep[:, None, :, None]  # [B, 1, L, L]: padded rows masked everywhere
            if kind == "float":
                mask = torch.where(mask, 0.0, float("-inf"))
            return F.scaled_dot_product_attention(x, x, x, mask, is_causal=False) if kind != "causal+bool" else \
                F.scaled_dot_product_attention(x, x, x, mask & torch.ones(x.shape[2], x.shape[2], dtype=torch.bool).tril())

    x = torch.randn(3, 2, 5, 4)
    keep = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    m = Attend().eval()
    with torch.no_grad():
        ref = m(x, keep)
    assert torch.isfinite(ref).all() and (ref[1] == 0).all()
    res = export_onnx(ir.capture(m, (x, keep)), tmp_path / "a.onnx", inputs=(x, keep))
    report = validate_onnx(res.path, m, (x, keep), atol=1e-5, rtol=1e-5)
    assert report.passed, report.summary()


@pytest.mark.parametrize("opset", [17, 18, 20, 21])
def test_opsets(opset):
    class M(nn.Module):
        def forward(self, x):
            return F.gelu(x.mean(-1, keepdim=True) + x, approximate="none")

    m, x = M().eval(), (torch.randn(2, 3, 4),)
    proto = to_onnx_model(ir.capture(m, x), inputs=x, opset=opset)
    assert proto.opset_import[0].version == opset
    assert ("Gelu" in {n.op_type for n in proto.graph.node}) == (opset >= 20)
    _check_batches(proto, m, x)


def test_dynamic_shape_arithmetic_builds_shape_subgraph():
    """Two batch-dependent output dims that are not copies of input dims need Shape arithmetic."""
    class M(nn.Module):
        def forward(self, x):
            b = x.size(0)
            y = x.reshape(b, 1, 6).expand(b, b * 2 // 2, 6)
            return y.reshape(b * b, 6) + 1.0

    m, x = M().eval(), (torch.randn(2, 6),)
    proto = to_onnx_model(ir.capture(m, x), inputs=x)
    ops = {n.op_type for n in proto.graph.node}
    assert {"Shape", "Expand"} <= ops
    rep = validate_onnx(proto, m, [with_batch(x, 1), with_batch(x, 5)], atol=0.0, rtol=0.0)
    assert rep.passed and rep.max_abs_diff == 0.0


def test_batch_reshape_writes_minus_one_not_copy():
    """A reshape whose only batch-dependent dim is the batch writes it as -1, not 0 ("copy"): with 0,
    onnxruntime keeps the input's symbolic dim and its planner/fusions made tiny_bert's attention
    measurably slower than torch.onnx's export."""
    class M(nn.Module):
        def forward(self, x):
            b = x.size(0)
            q = x.reshape(b, 4, 2, 3).permute(0, 2, 1, 3)
            return q.permute(0, 2, 1, 3).reshape(b, 4, 6) * 2.0

    m, x = M().eval(), (torch.randn(2, 4, 6),)
    proto = to_onnx_model(ir.capture(m, x), inputs=x)
    inits = {i.name: onnx.numpy_helper.to_array(i).tolist() for i in proto.graph.initializer}
    shapes = [inits[n.input[1]] for n in proto.graph.node if n.op_type == "Reshape"]
    assert shapes == [[-1, 4, 2, 3], [-1, 4, 6]]
    rep = validate_onnx(proto, m, [with_batch(x, 1), with_batch(x, 5)], atol=0.0, rtol=0.0)
    assert rep.passed and rep.max_abs_diff == 0.0


def test_fixed_batch(tmp_path):
    m, x = build("cnn_bn")
    res = export_onnx(ir.capture(m, x), tmp_path / "fixed.onnx", inputs=x, dynamic_batch=False)
    proto = onnx.load(str(res.path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert res.validation.batches == [2]
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        validate_onnx(proto, m, with_batch(x, 3))


def test_multiple_outputs_named_in_order():
    class M(nn.Module):
        def forward(self, a, b):
            return a + 1, (a * b, a)

    m, x = M().eval(), (torch.randn(2, 3), torch.randn(2, 3))
    proto = to_onnx_model(ir.capture(m, x), inputs=x)
    assert [o.name for o in proto.graph.output] == ["output_0", "output_1", "output_2"]
    assert [i.name for i in proto.graph.input] == ["a", "b"]
    _check_batches(proto, m, x)


def test_qdq_weights_stay_int8_initializers():
    """int8 weight initializer -> DequantizeLinear(axis=0), activations QuantizeLinear/DequantizeLinear (uint8)."""
    m, x = build("mlp")
    g = ir.capture(m, x)
    lin = g.find("linear")[0]
    w = g.params[lin.inputs[1].name]
    scale = w.abs().amax(1) / 127
    g.add_param("w_q", torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8))
    g.add_param("w_scale", scale)
    g.add_param("w_zp", torch.zeros(w.shape[0], dtype=torch.int8))
    dq_w = g.create_node("dequantize", (ir.Param("w_q"), ir.Param("w_scale"), ir.Param("w_zp")), {"axis": 0},
                         before=lin, meta=ir.TensorMeta(tuple(w.shape), torch.float32))
    xin = lin.inputs[0]
    q_x = g.create_node("quantize", (xin, 0.02, 128), {"dtype": torch.uint8, "axis": None}, before=lin,
                        meta=ir.TensorMeta(xin.meta.shape, torch.uint8))
    dq_x = g.create_node("dequantize", (q_x, 0.02, 128), {"axis": None}, before=lin, meta=xin.meta)
    lin.inputs = (dq_x, dq_w, lin.inputs[2])
    g.remove_unused_params()
    ir.verify(g)
    proto = to_onnx_model(g, inputs=x)
    inits = {i.name: i for i in proto.graph.initializer}
    dql = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    wdq = next(n for n in dql if n.input[0] in inits)
    assert inits[wdq.input[0]].data_type == onnx.TensorProto.INT8
    assert inits[wdq.input[2]].data_type == onnx.TensorProto.INT8
    assert next(a.i for a in wdq.attribute if a.name == "axis") == 0
    ql = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    assert inits[ql.input[2]].data_type == onnx.TensorProto.UINT8 and inits[ql.input[1]].dims == []
    assert "w_q" in inits and w.data_ptr() != 0
    # onnxruntime may fuse into integer kernels: allow the difference of one activation rounding step.
    rep = validate_onnx(proto, g, [with_batch(x, 1), with_batch(x, 7)], atol=2e-3, rtol=0.0)
    assert rep.passed, rep.summary()
    # And the quantization really happened: the float model differs by more than that.
    assert validate_onnx(proto, m, x, atol=1e-6, rtol=0).max_abs_diff > 1e-4


def test_quantize_of_constant_folds_to_int_initializer():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return x + self.b

    m, x = M().eval(), (torch.randn(2, 4),)
    g = ir.capture(m, x)
    add = g.find("add")[0]
    q = g.create_node("quantize", (add.inputs[1], 0.001, 0), {"dtype": torch.int32, "axis": None}, before=add,
                      meta=ir.TensorMeta((4,), torch.int32))
    dq = g.create_node("dequantize", (q, 0.001, 0), {"axis": None}, before=add, meta=ir.TensorMeta((4,), torch.float32))
    add.inputs = (add.inputs[0], dq)
    proto = to_onnx_model(g, inputs=x)
    assert [n.op_type for n in proto.graph.node] == ["DequantizeLinear", "Add"]
    inits = {i.name: i for i in proto.graph.initializer}
    assert inits[proto.graph.node[0].input[0]].data_type == onnx.TensorProto.INT32
    rep = validate_onnx(proto, g, x, atol=1e-6, rtol=0)
    assert rep.passed


class Flip(nn.Module):  # torch.flip: an op slimfx has no canonical form for
    def forward(self, x):
        return torch.flip(x, [1]) + 1


def test_unsupported_op_raises_and_leaves_no_file(tmp_path):
    m, x = Flip().eval(), (torch.randn(2, 3),)
    g = ir.capture(m, x)
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportError) as e:
        export_onnx(g, path, inputs=x)
    msg = str(e.value)
    node = g.node("flip")
    assert "%flip" in msg and "'opaque'" in msg and "flip" in msg and node.where() in msg
    assert "Supported ops:" in msg and "conv2d" in msg and "opaque," not in msg.split("Supported ops:")[1]
    assert list(tmp_path.iterdir()) == []


def test_non_divisible_adaptive_max_pool_is_a_clear_error():
    class M(nn.Module):
        def forward(self, x):
            return F.adaptive_max_pool2d(x, 3)

    m, x = M().eval(), (torch.randn(1, 2, 8, 8),)
    with pytest.raises(ExportError, match=r"adaptive_max_pool2d.*\(8, 8\) to \(3, 3\).*multiple"):
        to_onnx_model(ir.capture(m, x), inputs=x)


@pytest.mark.parametrize("out", [3, (1, 7), (5, 6)])
def test_adaptive_avg_pool_to_any_size_exports_with_window_means(tmp_path, out):
    """Windows of unequal size (8 -> 3, 1 -> 7: torchvision's AdaptiveAvgPool2d((7, 7)) on a small input)."""
    class M(nn.Module):
        def forward(self, x):
            return F.adaptive_avg_pool2d(x, out)

    for shape in [(2, 3, 8, 8), (2, 3, 1, 1), (2, 3, 7, 9)]:
        m, x = M().eval(), (torch.randn(*shape),)
        assert export_onnx(ir.capture(m, x), tmp_path / "m.onnx", inputs=x).validation.passed


def test_validation_failure_leaves_no_file(tmp_path, monkeypatch):
    def wrong_relu(ctx, node):  # a deliberately broken emitter
        return ctx.emit("Sigmoid", [ctx.value(node.inputs[0])])

    monkeypatch.setitem(EMITTERS, "relu", wrong_relu)
    m, x = build("cnn_bn")
    g = ir.capture(m, x)
    with pytest.raises(ValidationError, match=r"max abs diff .* \(atol 1e-05"):
        export_onnx(g, tmp_path / "m.onnx", inputs=x)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValidationError):
        export_onnx(g, tmp_path / "m.onnx", inputs=x, keep_invalid=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")))


def test_a_graph_run_with_integer_kernels_is_checked_at_their_tolerance_and_told_so(tmp_path):
    """onnxruntime's QGemm/QLinearMatMul round apart from the IR's fake-quant: a quantized graph exported without
    tolerances (a user's own quantizing recipe, `slimfx export` of a quantized .slimfx) was held to float32's
    1e-5 and refused as 'a bug in slimfx's exporter'."""
    from slimfx.models.bert import TinyBert
    from slimfx.passes import PassContext, create_pass

    torch.manual_seed(0)
    ids = (torch.randint(0, 50, (2, 16)),)
    g = ir.capture(TinyBert(vocab_size=50, seq_len=16, d_model=64, d_ff=256, num_layers=2).eval(), ids)
    ctx = PassContext(ids, calibration_data=[(torch.randint(0, 50, (16, 16)),)], quiet=True)
    create_pass("quantize", {"scheme": "int8-static", "speed_guard": False}).run(g, ctx)
    many = (torch.randint(0, 50, (32, 16)),)
    assert export_onnx(g, tmp_path / "q.onnx", inputs=many).validation.max_abs_diff > 1e-4  # passes at 0.25
    with pytest.raises(ValidationError, match="integer kernels round apart") as e:
        export_onnx(g, tmp_path / "f.onnx", inputs=many, atol=1e-5, rtol=1e-4)
    assert "bug" not in str(e.value) and not (tmp_path / "f.onnx").exists()


def test_export_replaces_existing_file_atomically(tmp_path):
    m, x = build("mlp")
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    export_onnx(ir.capture(m, x), path, inputs=x)
    assert onnx.load(str(path)).graph.node
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_report_fields():
    m, x = build("mlp")
    proto = to_onnx_model(ir.capture(m, x), inputs=x)
    rep = validate_onnx(proto, m, x)
    d = rep.to_dict()
    assert set(d) >= {"max_abs_diff", "top1_agreement", "sqnr_db", "passed", "cosine", "max_rel_diff"}
    assert d["sqnr_db"] is None or d["sqnr_db"] > 100
    assert rep.top1_agreement == 1.0


def test_conv_attributes_at_onnx_defaults_are_left_out():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, stride=2, padding=1, dilation=2, groups=2)).eval()
    x = (torch.randn(1, 4, 12, 12),)
    g = ir.capture(m, x)
    proto = to_onnx_model(g, inputs=x)
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in proto.graph.node if n.op_type == "Conv"]
    assert attrs[0] == {"kernel_shape": [3, 3]}
    assert attrs[1] == {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [2, 2],
                        "group": 2}
    assert validate_onnx(proto, g, x).max_abs_diff < 1e-4


@pytest.mark.parametrize("method", ["fx", "export"])
def test_cat_with_an_empty_1d_state_exports_as_torch_computes_it(method, tmp_path):
    """transformers' DynamicCache starts each layer's keys as an empty 1-D tensor and torch.cat skips it; ONNX's
    Concat refuses inputs of another rank (a GPT-2 LM from a user's file failed onnx.checker)."""
    class EmptyState(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("past", torch.tensor([]))

        def forward(self, x):
            return torch.cat([self.past, x * 2], dim=2) + 1

    x = torch.randn(2, 3, 5, 4)
    g = ir.capture(EmptyState().eval(), (x,), method=method)
    out = export_onnx(g, tmp_path / "m.onnx", inputs=(x,))  # checked and validated against the IR
    import onnxruntime as ort

    y = ort.InferenceSession(str(out.path)).run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(y), x * 2 + 1)


def test_a_file_onnxruntime_cannot_run_fails_validation_by_name_not_with_onnxruntime_s_exception(tmp_path):
    """An emitted file that onnxruntime refuses to run at a size the model runs at is a ValidationError (exit 2 on
    the command line, the file not written) naming the sizes, not onnxruntime's own exception (an internal
    error, exit 1)."""
    from slimfx.exporters import to_onnx_model, validate_onnx, with_batch
    from slimfx.ir.errors import ValidationError

    x = torch.randn(1, 4)
    g = ir.capture(torch.nn.Linear(4, 2).eval(), (x,))
    fixed = to_onnx_model(g, dynamic_batch=False).SerializeToString()  # takes batch 1 only
    assert validate_onnx(fixed, g, [(x,)]).passed
    with pytest.raises(ValidationError, match=r"onnxruntime cannot run .* on inputs \(float32\[3, 4\]\)"):
        validate_onnx(fixed, g, [(x,), with_batch((x,), 3)])
