"""Built-in passes: what each removes or folds, what it must keep, and that outputs never change."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings

from slimfx import ir
from slimfx.passes import PassContext, PassManager, create_pass
from slimfx.passes.fuse import fold_batchnorm_weights
from tests.generators import random_model
from tests.passes.nets import ConstantSubgraph, Conv1dBn, ConvBnNet, Duplicates, Noops, SharedConv, make

BUILTINS = ["remove-identity", "fold-constants", "cse", "fold-batchnorm", "dce"]


def run(model, x, passes, tol=1e-5):
    x = x if isinstance(x, tuple) else (x,)
    recs = PassManager(passes, check_numerics=tol).run(ir.capture(model, x), PassContext(example_inputs=x))
    g = recs.graph
    with torch.no_grad():
        ref, out = model(*x), ir.lower(g).eval()(*x)
    for a, b in zip(ref if isinstance(ref, tuple) else (ref,), out if isinstance(out, tuple) else (out,)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    return g, {r.name: r.stats for r in recs}


def ops(g):
    return [n.op for n in g if n.op not in ("input", "output")]


def test_remove_identity_removes_noops_and_keeps_real_work():
    g, stats = run(make(Noops), torch.randn(3, 6), ["remove-identity", "dce"])
    assert ops(g) == ["linear", "reshape", "mul", "add"]
    assert stats["remove-identity"]["removed_dropout"] == 1 and stats["remove-identity"]["removed_mul"] == 2
    assert stats["dce"]["nodes_removed"] == 2  # the shape/getitem that fed the removed reshape


def test_dropout_is_kept_when_the_graph_trains():
    m = make(Noops).train()
    g = ir.capture(m, (torch.randn(3, 6),))
    assert g.training
    create_pass("remove-identity").run(g, PassContext())
    assert g.find("dropout")


def test_int_times_float_one_is_not_a_noop():
    class IntScale(nn.Module):
        def forward(self, ids):
            return ids * 1.0, ids + 0

    g, _ = run(IntScale(), torch.arange(6), ["remove-identity"])
    assert ops(g) == ["mul"]  # ids * 1.0 makes floats: kept; ids + 0 is a no-op


def test_cse_merges_duplicates_including_swapped_operands():
    g, stats = run(make(Duplicates), torch.randn(3, 6), ["cse"])
    assert stats["cse"]["merged"] == 5  # linear, relu, add (swapped), sigmoid, mul
    assert ops(g).count("linear") == 1 and ops(g).count("sigmoid") == 1


def test_cse_keeps_dropout_in_training_and_different_constants_apart():
    class Two(nn.Module):
        def forward(self, x):
            return nn.functional.dropout(x, 0.5, True) + nn.functional.dropout(x, 0.5, True) + x * 2 + x * 2.5

    g = ir.capture(Two(), (torch.ones(4),))
    create_pass("cse").run(g, PassContext())
    assert len(g.find("dropout")) == 2 and len(g.find("mul")) == 2


def test_fold_constants_precomputes_param_only_subgraphs():
    m = make(ConstantSubgraph)
    g, stats = run(m, torch.randn(3, 4), ["fold-constants", "remove-identity", "dce"])
    assert ops(g) == ["matmul", "add"]
    assert stats["fold-constants"]["folded"] == 1
    folded = [k for k in g.params if k.startswith("folded.")]
    assert len(folded) == 1 and folded[0] not in g.buffers  # computed from trainable weights: trainable
    torch.testing.assert_close(g.params[folded[0]], (m.w * m.scale.unsqueeze(1)).t().detach())
    assert "w" not in g.params and "scale" not in g.params  # now unused


def test_fold_constants_does_not_bloat_the_model():
    class Expand(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.randn(1, 4))

        def forward(self, x):
            return x + self.b.expand(1000, 4)

    g, stats = run(Expand(), torch.randn(1000, 4), [create_pass("fold-constants", {"max_growth_numel": 100})])
    assert stats["fold-constants"]["folded"] == 0 and g.find("expand")
    g, stats = run(Expand(), torch.randn(1000, 4), ["fold-constants"])
    assert stats["fold-constants"]["folded"] == 1


@pytest.mark.parametrize("cls, shape, n_bn", [(ConvBnNet, (2, 3, 8, 8), 4), (Conv1dBn, (2, 4, 7), 1)])
def test_fold_batchnorm_folds_conv_and_linear(cls, shape, n_bn):
    g, stats = run(make(cls), torch.randn(*shape), ["fold-batchnorm"])
    assert stats["fold-batchnorm"] == {"folded": n_bn, "not_folded": 0}
    assert not g.find("batch_norm")
    assert not any(".running_" in k for k in g.params)


def test_folded_weights_equal_the_float64_formula():
    m = make(ConvBnNet)
    g, _ = run(m, torch.randn(2, 3, 8, 8), ["fold-batchnorm"])
    bn, conv = m.b2, m.c2  # the bias-less conv
    bn.requires_grad_(False), conv.requires_grad_(False)
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    w_ref = conv.weight.double() * scale.view(-1, 1, 1, 1)
    b_ref = bn.bias.double() - bn.running_mean.double() * scale
    node = g.node("c2")
    w, b = g.param(node.inputs[1]).double(), g.param(node.inputs[2]).double()
    assert float((w - w_ref).abs().max() / w_ref.abs().max()) < 1e-6
    assert float((b - b_ref).abs().max() / b_ref.abs().max()) < 1e-6
    assert node.inputs[2].name == "c2.bias"
    assert not conv.weight.detach().equal(g.param("c2.weight"))  # the user's model was not touched in place


def test_fold_batchnorm_skips_shared_convs_and_training_graphs():
    g, stats = run(make(SharedConv), torch.randn(1, 3, 4, 4), ["fold-batchnorm"])
    st = stats["fold-batchnorm"]
    assert (st["folded"], st["not_folded"]) == (0, 1) and g.find("batch_norm")
    bn = g.find("batch_norm")[0]
    assert "is also used by %add" in st["not_folded_reasons"][bn.name]  # never silent: in the stats and the headline
    assert st["notes"][0].startswith("1 batch norm(s) after a conv/linear not folded: %" + bn.name)
    g = ir.capture(make(ConvBnNet).train(), (torch.randn(2, 3, 8, 8),))
    res = create_pass("fold-batchnorm").run(g, PassContext())
    assert not res.changed and len(g.find("batch_norm")) == 4


def test_fold_batchnorm_weights_handles_affine_free_norms():
    w, mean, var = torch.randn(3, 2), torch.randn(3), torch.rand(3) + 0.5
    nw, nb = fold_batchnorm_weights(w, None, mean, var, None, None, 1e-5)
    x = torch.randn(4, 2)
    ref = nn.functional.batch_norm(x @ w.t(), mean, var, eps=1e-5)
    torch.testing.assert_close(x @ nw.t() + nb, ref)


def test_cleanup_passes_are_idempotent():
    m = make(ConvBnNet)
    x = torch.randn(2, 3, 8, 8)
    g, _ = run(m, x, BUILTINS)
    text = str(g)
    again = PassManager(BUILTINS).run(g, PassContext(example_inputs=(x,)))
    assert str(again.graph) == text and not any(r.changed for r in again)


@settings(max_examples=12, deadline=None)
@given(random_model())
def test_every_builtin_pass_preserves_outputs_of_random_models(case):
    model, x = case
    g, stats = run(model, x, BUILTINS)  # verify after each + numerics within 1e-5 relative
    # every batch norm that directly follows an unshared conv/linear is gone
    for n in g.find("batch_norm"):
        src = n.inputs[0]
        assert not (isinstance(src, ir.Node) and src.op in ("conv2d", "conv1d") and len(src.users) == 1)


def test_fold_batchnorm_with_a_conv_weight_shared_by_two_convs():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, bias=False)
            self.b1, self.b2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.b1(self.c(x)) + self.b2(self.c(x))

    m = make(Twice)
    g, stats = run(m, torch.randn(1, 3, 6, 6), ["fold-batchnorm"])
    assert stats["fold-batchnorm"]["folded"] == 2
    convs = g.find("conv2d")
    assert convs[0].inputs[1] != convs[1].inputs[1]  # each conv got its own folded weight
    assert sorted(g.params) == sorted(p.name for c in convs for p in c.params())  # no stale stats left


def test_dce_keeps_side_effects():
    class InPlace(nn.Module):
        def forward(self, x):
            y = x.clone()
            y.add_(1.0)          # result unused, effect needed
            torch.tanh(x)        # dead
            y[0] = 5.0           # setitem: unused, effect needed
            return y

    x = torch.randn(3)
    g, stats = run(InPlace(), x, ["dce", "cse", "fold-constants"])
    assert stats["dce"]["nodes_removed"] == 1 and not g.find("tanh")
    # add_ on an intermediate is captured as its functional add, read by every later use of y; clone and the
    # setitem stay opaque writes
    assert len(g.find("opaque")) == 2 and len(g.find("add")) == 1
    assert stats["cse"] == stats["fold-constants"] == {"skipped_in_place_writes": 1}
    torch.testing.assert_close(ir.lower(g)(x), InPlace()(x))
