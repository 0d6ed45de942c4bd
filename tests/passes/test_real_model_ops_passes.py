"""How the ops of issue 15's class 5 go through passes: structured pruning follows channels through what
preserves or groups them (pixel_shuffle, instance_norm, where, conv_transpose, an LSTM's input) and names
what it cannot (einsum); quantize puts integer weights on transposed convolutions per output channel and
leaves recurrent layers float; fold-batchnorm folds into conv_transpose; and small models built from
these ops compile with the `cleanup` and `int8` recipes."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import slimfx
from slimfx import ir
from slimfx.exporters import export_onnx
from slimfx.passes import PassContext, create_pass
from slimfx.passes.prune import analyze


class Decoder(nn.Module):
    """conv -> pixel_shuffle -> conv_transpose (grouped) -> instance_norm -> leaky where -> conv."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.up = nn.ConvTranspose2d(4, 8, 4, stride=2, padding=1)
        self.norm = nn.InstanceNorm2d(8, affine=True)
        self.mix = nn.ConvTranspose2d(8, 8, 3, padding=1, groups=4)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = self.shuffle(torch.relu(self.c1(x)))
        y = self.norm(self.up(y))
        y = torch.where(y > 0, y, 0.1 * y)
        return self.out(self.mix(y))


class TextRNN(nn.Module):
    """embedding -> linear -> bidirectional LSTM -> GRU -> masked mean -> linear."""

    def __init__(self, cls=nn.LSTM):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 12)
        self.rnn = nn.LSTM(12, 6, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(12, 5, batch_first=True)
        self.head = nn.Linear(5, 4)

    def forward(self, ids):
        y, _ = self.rnn(torch.relu(self.proj(self.emb(ids))))
        y, _ = self.gru(y)
        keep = (ids != 0).unsqueeze(-1)
        return self.head(y.masked_fill(~keep, 0.0).sum(1))


def _ctx(x, n=4):
    torch.manual_seed(1)
    data = [tuple(torch.randn_like(t) if t.is_floating_point() else torch.randint_like(t, 0, 20) for t in x)
            for _ in range(n)]
    return PassContext(x, calibration_data=data, quiet=True)


def test_channels_prune_through_pixel_shuffle_conv_transpose_instance_norm_and_where(tmp_path):
    torch.manual_seed(0)
    m, x = Decoder().eval(), (torch.randn(2, 3, 4, 4),)
    g = ir.capture(m, x)
    deps = analyze(g)
    groups = {tuple(grp.sources()): grp for grp in deps.groups}
    # pixel_shuffle packs 4 of c1's channels into one: they go in units of 4; up and mix share the groups
    assert len(groups[("c1",)].units) == 4 and groups[("c1",)].channels == 16
    assert set(groups) == {("c1",), ("up", "mix")} and len(groups[("up", "mix")].units) == 4
    assert [b["op"] for b in deps.blocked] == ["output"]
    res = create_pass("prune-channels", {"sparsity": 0.5}).run(g, _ctx(x))
    g = res.graph_after(g)  # prune-channels returns its pruned copy
    ir.verify(g)
    assert {tuple(r["sources"]): r["kept_channels"] for r in res.stats["groups"]} == {("c1",): 8, ("up", "mix"): 4}
    # [in, out/groups, k, k]: up loses inputs (c1's channels / 4) and outputs; mix keeps 2 of its 4 groups
    assert tuple(g.params["up.weight"].shape) == (2, 4, 4, 4) and tuple(g.params["mix.weight"].shape) == (4, 2, 3, 3)
    assert g.node("mix").attrs["groups"] == 2 and g.params["norm.weight"].numel() == 4
    assert ir.lower(g)(*x).shape == (2, 3, 16, 16)
    assert export_onnx(g, tmp_path / "m.onnx", inputs=x).validation.passed


def test_an_lstm_lets_the_layer_before_it_shrink_and_einsum_is_named_where_pruning_stops():
    torch.manual_seed(0)
    m, x = TextRNN().eval(), (torch.randint(1, 20, (2, 5)),)
    g = ir.capture(m, x)
    res = create_pass("prune-channels", {"sparsity": 0.5}).run(g, _ctx(x))
    g = res.graph_after(g)  # prune-channels returns its pruned copy
    ir.verify(g)
    kept = {tuple(r["sources"]): r["kept_channels"] for r in res.stats["groups"]}
    assert kept[("proj",)] == 6 and g.params["rnn.weight_ih_l0"].shape == (24, 6)
    assert g.params["rnn.weight_ih_l0_reverse"].shape == (24, 6) and g.params["rnn.weight_hh_l0"].shape == (24, 6)
    torch.testing.assert_close(ir.lower(g)(*x).shape, m(*x).shape)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(4, 8), nn.Linear(4, 8)

        def forward(self, x):
            return torch.einsum("bqd,bkd->bqk", self.q(x), self.k(x))

    g = ir.capture(Attn().eval(), (torch.randn(2, 3, 4),))
    why = {b["source"]: b["why"] for b in analyze(g).blocked if b["op"] == "einsum"}
    assert set(why) == {"q", "k"} and "einsum" in why["q"] and "matmul" in why["q"]


def test_quantize_gives_conv_transpose_int8_weights_per_output_channel_and_keeps_recurrent_layers_float(tmp_path):
    torch.manual_seed(0)
    m, x = Decoder().eval(), (torch.randn(2, 3, 4, 4),)
    g = ir.capture(m, x)
    res = create_pass("quantize", {"scheme": "int8-static"}).run(g, _ctx(x))
    ir.verify(g)
    assert res.stats["quantized_ops"] >= 4
    up_w, mix_w = g.node("up").inputs[1], g.node("mix").inputs[1]
    assert up_w.op == mix_w.op == "dequantize"
    # up: [in, out, k, k], one scale per output channel along axis 1; mix is grouped (out/groups on axis 1)
    assert up_w.attrs["axis"] == 1 and g.params[up_w.inputs[1].name].shape == (8,)
    assert mix_w.attrs["axis"] is None and g.params[mix_w.inputs[1].name].numel() == 1
    bias = g.node("up").inputs[2]
    assert bias.op == "dequantize" and g.params[bias.inputs[0].name].dtype == torch.int32
    assert export_onnx(g, tmp_path / "d.onnx", inputs=x).validation.passed
    loaded = slimfx.load(slimfx.save(g, tmp_path / "d.slimfx"))  # per-axis transposed weights, int32 bias
    assert ir.format_graph(loaded) == ir.format_graph(g) and torch.equal(ir.lower(loaded)(*x), ir.lower(g)(*x))

    m, x = TextRNN().eval(), (torch.randint(1, 20, (2, 5)),)
    for scheme in ("int8-static", "int8-dynamic"):
        g = ir.capture(m, x)
        res = create_pass("quantize", {"scheme": scheme}).run(g, _ctx(x))
        ir.verify(g)
        assert all(isinstance(w, ir.Param) and g.params[w.name].dtype == torch.float32
                   for op in ("lstm", "gru") for w in g.find(op)[0].inputs[2:])
        assert g.node("proj").inputs[1].op == "dequantize" and g.node("head").inputs[1].op == "dequantize"
        # the recurrent layers kept float are named, with why, in the stats and the report's headline
        assert res.stats["kept_float"] == {"rnn": "ONNX has no integer LSTM", "gru": "ONNX has no integer GRU"}
        assert any("2 recurrent layer(s) float (rnn, gru)" in note for note in res.stats["notes"])
        assert export_onnx(g, tmp_path / f"r-{scheme}.onnx", inputs=x).validation.passed
        loaded = slimfx.load(slimfx.save(g, tmp_path / f"r-{scheme}.slimfx"))
        assert ir.format_graph(loaded) == ir.format_graph(g) and torch.equal(ir.lower(loaded)(*x), ir.lower(g)(*x))


def test_qat_sign_and_fixed_point_handle_transposed_weights():
    torch.manual_seed(0)
    m, x = Decoder().eval(), (torch.randn(2, 3, 4, 4),)
    for scheme in ("sign", "fixed-point"):
        g = ir.capture(m, x)
        create_pass("quantize", {"scheme": scheme, "keep_first_last": False}).run(g, _ctx(x))
        ir.verify(g)
        w = g.node("up").inputs[1]
        assert w.op == "dequantize" and (w.attrs["axis"] == 1 if scheme == "sign" else w.attrs["axis"] is None)
        assert ir.lower(g)(*x).shape == (2, 3, 16, 16)


def test_macs_of_transposed_convs_and_recurrent_layers():
    m, x = Decoder().eval(), (torch.randn(2, 3, 4, 4),)
    g = ir.capture(m, x)
    # each input element meets out/groups x k x k weights
    assert ir.node_macs(g.node("up")) == 2 * 4 * 8 * 8 * 8 * 16
    assert ir.node_macs(g.node("mix")) == 2 * 8 * 16 * 16 * 2 * 9
    g = ir.capture(TextRNN().eval(), (torch.randint(1, 20, (2, 5)),))
    assert ir.node_macs(g.node("rnn")) == 2 * 10 * 4 * 6 * (12 + 6)  # directions x steps x gates x h x (in + h)
    assert ir.node_macs(g.node("gru")) == 10 * 3 * 5 * (12 + 5)


def test_bias_correction_adds_a_bias_per_output_channel_to_a_biasless_conv_transpose():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(3, 5, 2, stride=2, bias=False)

        def forward(self, x):
            return self.up(x)

    torch.manual_seed(0)
    m, x = Net().eval(), (torch.randn(2, 3, 4, 4),)
    g = ir.capture(m, x)
    ctx = _ctx(x)
    res = create_pass("quantize", {"scheme": "int8-static", "bias_correction": True}).run(g, ctx)
    assert res.stats["bias_correction"]["corrected"] == 1
    bias = g.node("up").inputs[2]
    assert g.params[bias.name if isinstance(bias, ir.Param) else bias.inputs[0].name].numel() == 5
    ir.verify(g)


def _compile(model, x, recipe, out):
    return slimfx.compile(model, x, recipe, quiet=True, bench_seconds=0.0, formats=("onnx",), out_dir=out)


def test_small_models_of_these_ops_compile_with_cleanup_and_int8(tmp_path):
    class Unet(nn.Module):
        """Down with pixel_unshuffle, einsum channel mixing, rms_norm, up with nearest-exact and a transposed conv."""

        def __init__(self):
            super().__init__()
            self.inc = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.mix = nn.Parameter(torch.randn(16, 8) / 4)
            self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            skip = torch.relu(self.bn(self.inc(x)))
            y = torch.einsum("bchw,cd->bdhw", F.pixel_unshuffle(skip, 2), self.mix)
            y = F.rms_norm(y.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2)
            y = self.up(y) + F.interpolate(skip, scale_factor=1.0, mode="nearest-exact")
            y = torch.cat([y, skip], 1)
            return self.head(y).flatten(1).topk(3, dim=1).values

    torch.manual_seed(0)
    for model, x in [(Unet().eval(), (torch.randn(2, 3, 8, 8),)), (TextRNN().eval(), (torch.randint(1, 20, (2, 6)),))]:
        for recipe in ("cleanup", "int8"):
            result = _compile(model, x, recipe, tmp_path / f"{type(model).__name__}-{recipe}")
            assert result.exports["onnx"].exists()
            assert result.report["validation"]["top1_agreement"] >= 0.99, (type(model).__name__, recipe)
