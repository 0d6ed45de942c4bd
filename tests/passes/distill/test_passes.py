"""The registered passes: `distill` (KD recovery) and `distill-subgraph` (block swap)."""

from __future__ import annotations

import pytest
import torch

from slimfx import ir
from slimfx.ir.errors import PassError
from slimfx.passes import PassContext, parse_pass_spec
from tests.passes.distill.helpers import SmallCNN, accuracy, digits, trained


def _batches(n: int = 700, bs: int = 64):
    x, y, _, _ = digits()
    return [((x[i:i + bs],), y[i:i + bs]) for i in range(0, n, bs)]


def test_distill_pass_skips_without_data_and_raises_when_required():
    x = digits()[0][:2]
    g = ir.capture(SmallCNN(4, 8).eval(), (x,))
    res = parse_pass_spec("distill").run(g, PassContext(example_inputs=(x,)))
    assert not res.changed and res.stats["skipped"] and "teacher" in res.stats["reason"]
    with pytest.raises(PassError, match="needs a teacher"):
        parse_pass_spec("kd-finetune{required=True}").run(g, PassContext(example_inputs=(x,)))
    teacher = SmallCNN(4, 8).eval()
    with pytest.raises(PassError, match="needs train data and none was given.*required = false"):
        parse_pass_spec("distill{required=True}").run(g, PassContext(example_inputs=(x,), teacher=teacher))
    with pytest.raises(PassError, match="train data, but it is empty"):
        parse_pass_spec("distill").run(g, PassContext(example_inputs=(x,), teacher=teacher, train_data=[]))
    assert parse_pass_spec("distill").check_context(PassContext(teacher=teacher, train_data=[])) is not None
    with pytest.raises(PassError, match="option 'loss' must be one of"):
        parse_pass_spec("distill{loss=kl}")
    with pytest.raises(PassError, match="feature 'relu2' must be 'student_feature:teacher_feature'"):
        parse_pass_spec("distill{loss=at+kd, features=['relu2']}")


def test_distill_pass_recovers_a_student_graph_from_the_teacher():
    x = digits()[0][:2]
    torch.manual_seed(0)
    g = ir.capture(SmallCNN(4, 8).eval(), (x,))
    ctx = PassContext(example_inputs=(x,), train_data=_batches(), teacher=trained("cnn"), eval_fn=accuracy, quiet=True)
    res = parse_pass_spec("distill{epochs=2, lr=0.003, loss=at+ctkd, features=['relu2:relu2']}").run(g, ctx)
    assert res.changed and res.stats["accuracy_after"] > res.stats["accuracy_before"] + 0.3
    assert accuracy(ir.lower(g).eval()) == pytest.approx(res.stats["accuracy_after"])
    assert res.stats["features"] == ["relu2:relu2"]
    ir.verify(g)


@pytest.fixture(scope="module")
def resnet():
    teacher = trained("resnet")
    x, _, xt, _ = digits()
    return teacher, ir.capture(teacher, (x[:2],)), x, xt


@pytest.mark.parametrize("opt, key", [("width=0.5", "layers_narrowed"), ("low_rank=0.5", "layers_factorized"),
                                      ("depth=2", "blocks_removed")])
def test_distill_subgraph_swaps_stage_and_keeps_predictions(resnet, opt, key):
    teacher, g0, x, xt = resnet
    g = g0.copy()
    ctx = PassContext(example_inputs=(x[:2],), calibration_data=[(x[i:i + 100],) for i in range(0, 700, 100)],
                      quiet=True)
    res = parse_pass_spec(f"distill-subgraph{{module=stage, {opt}, epochs=6, lr=0.003}}").run(g, ctx)
    s = res.stats
    assert s[key] >= 1
    assert s["macs_after"] < s["macs_before"] and s["params_after"] < s["params_before"]
    assert s["block_macs_after"] < s["block_macs_before"]
    ir.verify(g)
    assert all(n.module_path and n.module_path.startswith("stage") for n in g if n.name.startswith("stage_"))
    assert all(name.startswith("stage.") for name in g.params if "stage" in name)
    with torch.no_grad():
        agree = (ir.lower(g).eval()(xt).argmax(1) == teacher(xt).argmax(1)).float().mean()
    assert agree > 0.85, (agree, s)
    assert s["block_rel_error"] < 0.5


def test_distill_subgraph_custom_student_and_onnx_export(resnet, tmp_path):
    teacher, g0, x, xt = resnet
    g = g0.copy()
    ctx = PassContext(example_inputs=(x[:2],), train_data=_batches(), quiet=True)
    res = parse_pass_spec("distill-subgraph{nodes=stage_1_conv1..stage_2_relu2, "
                          "student='tests.passes.distill.helpers:conv_student', epochs=4}").run(g, ctx)
    assert res.stats["custom"].endswith("conv_student")
    assert any(name.startswith("stage.") and name.endswith("0.weight") for name in g.params)
    ir.verify(g)
    exporters = pytest.importorskip("exporters")
    out = exporters.export_onnx(g, tmp_path / "swapped.onnx", inputs=(xt[:4],))
    assert (tmp_path / "swapped.onnx").is_file() and out is not None


def test_distill_subgraph_selection_errors(resnet):
    _, g0, x, _ = resnet
    ctx = PassContext(example_inputs=(x[:2],), calibration_data=[(x[:64],)], quiet=True)
    with pytest.raises(PassError, match="exactly one value from outside; it reads %stage_0_relu1, %relu"):
        parse_pass_spec("distill-subgraph{nodes=stage_0_conv2..stage_0_relu2, low_rank=0.5}").run(g0.copy(), ctx)
    with pytest.raises(PassError, match="exactly one output used outside; it has %relu, %stage_0_conv1"):
        parse_pass_spec("distill-subgraph{nodes=relu..stage_0_conv1, low_rank=0.5}").run(g0.copy(), ctx)
    with pytest.raises(PassError, match="no node lies in module 'layer3'; top-level modules: fc, pool, relu, stage, stem"):
        parse_pass_spec("distill-subgraph{module=layer3, width=0.5}").run(g0.copy(), ctx)
    with pytest.raises(PassError, match="depth=1 would drop 5 of the 6 blocks under 'stage.0', but only 0"):
        parse_pass_spec("distill-subgraph{module=stage.0, depth=1}").run(g0.copy(), ctx)
    with pytest.raises(PassError, match="say how to shrink"):
        parse_pass_spec("distill-subgraph{module=stage}")
