"""Capture and lowering: canonical ops, bit-exact round trips, clear errors."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from slimfx import ir
from slimfx.ir.errors import CaptureError
from tests.generators import random_model


class ModuleSpelling(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.act(self.bn(self.conv(x))))))


class FunctionalSpelling(ModuleSpelling):
    def forward(self, x):
        y = torch.conv2d(x, self.conv.weight, self.conv.bias, 1, 1)
        y = F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, False)
        y = y.relu()
        y = F.adaptive_avg_pool2d(y, (1, 1))
        return F.linear(torch.flatten(y, 1), self.fc.weight, self.fc.bias)


def ops(graph):
    return [n.op for n in graph if n.op not in ("input", "output")]


def test_module_and_functional_spellings_give_the_same_ops():
    x = torch.randn(2, 3, 8, 8)
    a = ir.capture(ModuleSpelling().eval(), (x,))
    b = ir.capture(FunctionalSpelling().eval(), (x,))
    assert ops(a) == ops(b) == ["conv2d", "batch_norm", "relu", "adaptive_avg_pool2d", "flatten", "linear"]
    conv = a.find("conv2d")[0]
    assert conv.inputs[1] == ir.Param("conv.weight") and conv.attrs["padding"] == (1, 1)
    assert b.find("conv2d")[0].attrs["padding"] == (1, 1)


def test_reshape_spellings_are_one_op():
    class Views(nn.Module):
        def forward(self, x):
            a = x.view(x.size(0), -1)
            b = torch.reshape(x, (2, -1))
            c = x.reshape(2, 48)
            return a + b + c

    g = ir.capture(Views(), (torch.randn(2, 3, 4, 4),))
    assert [n.op for n in g if n.op in ("reshape", "opaque")] == ["reshape"] * 3


def test_text_form_names_params_and_shapes():
    g = ir.capture(ModuleSpelling().eval(), (torch.randn(1, 3, 8, 8),))
    text = str(g)
    assert "%conv = conv2d(%x, @conv.weight, @conv.bias) {stride=(1, 1), padding=(1, 1)" in text
    # symbolic dims are named with their example size: the batch follows the input, channels are fixed
    assert "%x: f32[batch:1, 3, 8, 8]" in text and ": f32[batch:1, 8, 8, 8]" in text and "return %fc" in text
    assert ir.parse(text, g.params).inputs[0].meta.sym == ("batch", None, None, None)


def test_lowering_is_bit_exact_on_fresh_inputs_and_train_mode():
    torch.manual_seed(0)
    m = ModuleSpelling().eval()
    g = ir.capture(m, (torch.randn(1, 3, 8, 8),))
    gm = ir.lower(g)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 8, 8)
        assert torch.equal(gm(x), m(x))
    m.train()
    gm.train()
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(gm(x), m(x))
    # running stats were updated identically in both
    assert torch.equal(gm.get_buffer("bn.running_mean"), m.bn.running_mean)


@given(random_model())
def test_random_architectures_round_trip(case):
    model, inputs = case
    g = ir.capture(model, inputs)
    ir.verify(g)
    gm = ir.lower(g)
    assert torch.equal(gm(*inputs), model(*inputs))
    fresh = torch.randn_like(inputs[0])
    assert torch.equal(gm(fresh), model(fresh))


def test_unknown_calls_become_opaque_nodes_that_still_run():
    class Odd(nn.Module):
        def forward(self, x):
            return torch.triu(x) + torch.flip(x, dims=[1])

    x = torch.randn(2, 5)
    g = ir.capture(Odd(), (x,))
    assert [n.op for n in g.find("opaque")] == ["opaque", "opaque"]
    assert torch.equal(ir.lower(g)(x), Odd()(x))


def test_leaf_modules_stay_opaque():
    class Inner(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # untraceable on its own
                return x * 2
            return x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.inner(x))

    x = torch.randn(3, 4)
    with pytest.raises(CaptureError) as err:
        ir.capture(Outer(), (x,))
    msg = str(err.value)
    assert "Inner at 'inner'" in msg and "test_capture.py" in msg and "if x.sum() > 0" in msg
    assert "leaf_modules=[Inner]" in msg and "concrete_args" in msg
    g = ir.capture(Outer(), (x,), leaf_modules=[Inner])
    assert g.node("inner").op == "opaque"
    m = Outer()
    g = ir.capture(m, (x,), leaf_modules=[Inner])
    assert torch.equal(ir.lower(g)(x), m(x))


def test_a_top_level_forward_that_cannot_be_traced_points_at_its_traceable_parts():
    """A detector's own forward loops over images and keeps boxes above a score (torchvision's FasterRCNN,
    RetinaNet, SSD): the refusal told the user to keep the top-level model opaque, which leaves nothing to
    compile. It now names the model's submodules and says to compile the tensor-only part (the backbone)."""
    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Conv2d(3, 4, 3)
            self.head = nn.Conv2d(4, 5, 1)

        def forward(self, images):
            out = []
            for img in images:  # per image, as GeneralizedRCNN's transform does
                scores = self.head(self.backbone(img[None]))
                out.append(scores[scores > 0.5])
            return out

    with pytest.raises(CaptureError) as err:
        ir.capture(Detector().eval(), (torch.randn(2, 3, 8, 8),), method="fx")
    msg = str(err.value)
    assert "Detector (the top-level model)" in msg and "for img in images" in msg
    assert "leaf_modules=[Detector]" not in msg
    assert "here: backbone, head" in msg and "return that submodule" in msg
    g = ir.capture(Detector().backbone, (torch.randn(2, 3, 8, 8),))  # what the message says to do
    assert [n.op for n in g if n.op not in ("input", "output")] == ["conv2d"]


def test_concrete_args_fix_a_branching_flag():
    class Flag(nn.Module):
        def forward(self, x, double: bool = False):
            return x * 2 if double else x

    g = ir.capture(Flag(), (torch.randn(2),), concrete_args={"double": True})
    x = torch.randn(2)
    assert torch.equal(ir.lower(g)(x), x * 2)


def test_wrong_inputs_are_a_capture_error():
    m = ModuleSpelling().eval()
    with pytest.raises(CaptureError, match=r"do not fit ModuleSpelling: layer 'conv' \(Conv2d\(3, 8.*fails on "
                                           r"float32\[1, 5, 8, 8\].*Example inputs given: \(x: float32\[1, 5, 8, 8\]\)"):
        ir.capture(m, (torch.randn(1, 5, 8, 8),))
    with pytest.raises(CaptureError, match=r"takes 1 input, but 2 example inputs were given: \(x: float32\[1, 3, 8, 8\], "
                                           r"#1: float32\[1\]\)"):
        ir.capture(m, (torch.randn(1, 3, 8, 8), torch.randn(1)))
    with pytest.raises(CaptureError, match="needs a torch.nn.Module"):
        ir.capture(lambda x: x, (torch.randn(1),))


def test_split_chunk_cat_and_indexing():
    class Shapes(nn.Module):
        def forward(self, x):
            a, b = torch.split(x, [2, 3], dim=1)
            c, d = x.chunk(2, dim=0)
            y = torch.cat([b, a], 1)[:, 1:4] * x[:, None, 0].squeeze(1).unsqueeze(-1)
            return y.permute(1, 0).transpose(0, 1).contiguous().sum(0, keepdim=True), torch.stack([c, d]).mean()

    x = torch.randn(4, 5)
    m = Shapes()
    g = ir.capture(m, (x,))
    got = {n.op for n in g}
    assert {"split", "chunk", "getitem", "cat", "slice", "squeeze", "unsqueeze", "permute", "transpose",
            "contiguous", "sum", "stack", "mean"} <= got
    assert "opaque" not in got
    out, ref = ir.lower(g)(x), m(x)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_graph_inputs_keep_forward_argument_names_even_builtin_ones():
    class Named(nn.Module):
        def forward(self, input, mask):  # noqa: A002 - `input` is a common argument name
            return input * mask

    g = ir.capture(Named(), (torch.randn(2, 3), torch.ones(2, 3)))
    assert [n.name for n in g.inputs] == ["input", "mask"]
    x, m = torch.randn(4, 3), torch.zeros(4, 3)
    assert torch.equal(ir.lower(g)(x, m), x * m)


def test_opaque_nodes_point_at_the_users_source_line():
    class Odd(nn.Module):
        def forward(self, x):
            return torch.flip(x, dims=[1])

    node = ir.capture(Odd(), (torch.randn(2, 3),)).find("opaque")[0]
    assert node.source.startswith("test_capture.py:")


def test_nodes_named_like_python_builtins_keep_their_own_shapes_and_dims():
    """fx renames a node that would shadow a builtin (`slice` -> `slice_1`, the input `input` -> `input_1`) and moves
    the next one up (`slice_1` -> `slice_2`): shape propagation and the ONNX exporter's size probe must still
    give every IR node its own values (torch.export's front end names an indexing node `slice`)."""
    class Net(nn.Module):
        def forward(self, input):  # noqa: A002 - `input` is a common argument name
            return input[:, 1:][:, :, :2] * 2

    g = ir.capture(Net(), (torch.randn(2, 4, 3),))
    first, second = g.find("slice")
    g.rename(first, "slice")
    g.rename(second, "slice_1")
    assert [first.name, second.name] == ["slice", "slice_1"]
    x = torch.randn(5, 6, 3)
    ir.propagate_shapes(g, x)
    assert (g.inputs[0].meta.shape, first.meta.shape, second.meta.shape) == ((5, 6, 3), (5, 5, 3), (5, 5, 2))
    assert second.meta.sym[0] == "batch" and first.meta.sym[0] == "batch"
    ir.verify(g)


def test_a_forward_returning_topk_or_max_results_whole_gives_their_tensors(tmp_path):
    """`return x.topk(3)` / `return torch.max(x, 1)` return torch's named tuples of tensors: the outputs are those
    tensors (a tuple), as when forward unpacks them; capture refused them as non-tensor values."""
    from slimfx.exporters import export_onnx

    class Net(torch.nn.Module):
        def forward(self, x):
            return x.topk(3, dim=-1), torch.max(x, 1)

    x = torch.randn(2, 6)
    g = ir.capture(Net().eval(), (x,))
    got = ir.lower(g)(x)
    want = Net()(x)
    assert [[t.tolist() for t in pair] for pair in got] == [[t.tolist() for t in pair] for pair in want]
    assert export_onnx(g, tmp_path / "m.onnx", inputs=(x,)).validation.passed


class _Parametrized(nn.Module):
    """weight_norm convs (HiFi-GAN, wav2vec2's positional conv), a spectral_norm linear (GAN critics) and an
    orthogonal one: their weights are computed from other tensors on every call."""

    def __init__(self):
        super().__init__()
        P = nn.utils.parametrizations
        self.conv = P.weight_norm(nn.Conv1d(4, 8, 3, padding=1))
        self.up = P.weight_norm(nn.ConvTranspose1d(8, 8, 4, stride=2, padding=1))
        self.fc = P.spectral_norm(nn.Linear(8 * 32, 16))
        self.rot = P.orthogonal(nn.Linear(16, 16))

    def forward(self, x):
        h = F.leaky_relu(self.up(F.leaky_relu(self.conv(x), 0.1)), 0.1)
        return self.rot(self.fc(h.flatten(1)))


@pytest.mark.parametrize("method", ["fx", "export"])
def test_parametrized_weights_are_baked_into_params_named_like_the_module_exposes_them(method):
    """aten::_weight_norm, mv and dot were opaque nodes no exporter knew: a model with weight_norm could not
    be compiled at all, even with cleanup."""
    torch.manual_seed(0)
    model = _Parametrized()
    model(torch.randn(4, 4, 16))  # spectral_norm's power iteration in training mode, as a trained model has
    model.eval()
    x = torch.randn(3, 4, 16)
    graph = ir.capture(model, (x,), method=method)
    assert [n.op for n in graph if n.op not in ("input", "output")] == [
        "conv1d", "leaky_relu", "conv_transpose1d", "leaky_relu", "flatten", "linear", "linear"]
    weights = {"conv.weight", "up.weight", "fc.weight", "rot.weight"}
    assert weights <= set(graph.params) and not [k for k in graph.params if "parametrizations" in k]
    for name in weights:
        module = model.get_submodule(name.split(".")[0])
        assert torch.allclose(graph.params[name], module.weight.detach(), atol=1e-6), name
        assert name not in graph.buffers  # trainable, as the weight it replaces
    with torch.no_grad():
        torch.testing.assert_close(ir.lower(graph).eval()(x), model(x), atol=1e-5, rtol=1e-5)


def test_a_graph_captured_in_training_mode_keeps_its_parametrizations():
    """spectral_norm updates its buffers on every training call: nothing there is a constant."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))).train()
    graph = ir.capture(model, (torch.randn(2, 4),))
    assert any("parametrizations" in k for k in graph.params) and "0.weight" not in graph.params


@given(random_model(), st.data())
def test_random_architectures_with_parametrized_layers_capture_to_plain_weights(case, data):
    model, inputs = case
    P = nn.utils.parametrizations
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for layer in layers:
        kind = data.draw(st.sampled_from(["none", "weight_norm", "spectral_norm"]))
        if kind != "none":
            getattr(P, kind)(layer)
    model.eval()
    g = ir.capture(model, inputs)
    ir.verify(g)
    assert not [k for k in g.params if "parametrizations" in k] and all(n.op != "opaque" for n in g)
    with torch.no_grad():
        torch.testing.assert_close(ir.lower(g)(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)
