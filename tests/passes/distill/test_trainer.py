"""The trainer: KD beats nothing-learned, determinism, best-checkpoint, graph students, AT features, DDP."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slimfx import ir
from slimfx.ir.errors import PassError
from slimfx.passes.distill import (
    auto_pairs,
    computed_sizes,
    distill,
    resolve_feature,
    stage_ends,
    with_features,
)
from tests.passes.distill.helpers import SmallCNN, accuracy, digits, trained


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_kd_trains_student_deterministically_and_keeps_best():
    teacher = trained("cnn")
    x, y, _, _ = digits()
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        student = SmallCNN(4, 8, dropout=0.1)
        res = distill(teacher, student, (x[:700], y[:700]), loss="kd", epochs=3, lr=3e-3, eval_fn=accuracy, seed=7,
                      quiet=True)
        runs.append((_state(student), res))
    (s1, r1), (s2, r2) = runs
    assert all(torch.equal(s1[k], s2[k]) for k in s1)  # seeded: bit-identical
    assert [h["loss"] for h in r1.history] == [h["loss"] for h in r2.history]
    accs = [h["accuracy"] for h in r1.history]
    assert len(accs) == 3 and r1.best_metric == max(accs) and r1.best_epoch == accs.index(max(accs)) + 1
    assert accuracy(r1.module) == pytest.approx(max(accs))  # the best epoch's weights are what we hold
    assert max(accs) > 0.7


def test_graph_student_trained_in_place_with_attention_transfer():
    teacher = trained("cnn")
    x, y, _, _ = digits()
    torch.manual_seed(1)
    student_mod = SmallCNN(4, 8)
    g = ir.capture(student_mod.eval(), (x[:2],))
    before = {k: v.clone() for k, v in g.params.items()}
    acc_before = accuracy(ir.lower(g).eval())
    res = distill(teacher, g, (x[:700], y[:700]), loss="at+kd", features=[("relu2", "relu2"), ("bn1", "relu1")], epochs=2,
                  lr=3e-3, quiet=True)
    assert res.student is g
    changed = [k for k in before if not torch.equal(before[k], g.params[k])]
    assert "conv1.weight" in changed and "fc.weight" in changed
    assert g.outputs.op == "linear"  # the feature taps were added to a copy, not to the student graph
    assert accuracy(ir.lower(g).eval()) > acc_before + 0.2
    # an nn.Module student trained through feature taps gets its weights written back
    res2 = distill(teacher, student_mod, (x[:700], y[:700]), loss="at", features=[("relu2", "relu2")], epochs=1, quiet=True)
    assert res2.module is student_mod and accuracy(student_mod) > acc_before + 0.2


def test_feature_taps_are_extra_outputs_and_checked():
    teacher = trained("cnn")
    x = digits()[0][:2]
    g = ir.capture(teacher, (x,))
    assert resolve_feature(g, "relu2").name == "relu2"
    assert resolve_feature(g, "bn1").op == "batch_norm"
    tapped = with_features(g, ["relu1", "pool"])
    out = ir.lower(tapped).eval()(x)
    assert isinstance(out, tuple) and [tuple(o.shape) for o in out] == [(2, 10), (2, 16, 8, 8), (2, 32, 4, 4)]
    assert torch.allclose(out[0], teacher(x))
    with pytest.raises(PassError, match="'layer9' is neither a node name nor a module path.*conv1"):
        resolve_feature(g, "layer9", role="teacher")
    with pytest.raises(PassError, match=r"\('pool', 'relu1'\) does not match in spatial size.*\[2, 8, 4, 4\].*\[2, 16, 8, 8\]"):
        distill(teacher, SmallCNN(4, 8), digits()[:2], loss="at+kd", features=[("pool", "relu1")], epochs=1,
                quiet=True)


def test_trainer_errors_are_actionable():
    x, y, _, _ = digits()
    with pytest.raises(PassError, match="needs a teacher"):
        distill(None, SmallCNN(4, 8), (x, y), loss="kd", epochs=1, quiet=True)
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(PassError, match=r"no feature maps of the same spatial size in the student \(sizes none\) "
                                        r"and the teacher \(sizes 8x8, 4x4\); name pairs"):
        distill(trained("cnn"), flat, (x, y), loss="at+kd", epochs=1, quiet=True)
    wide = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 12))
    with pytest.raises(PassError, match=r"student gives \[64, 12\], teacher gives \[64, 10\]"):
        distill(trained("cnn"), wide, (x, y), loss="kd", epochs=1, quiet=True)
    with pytest.raises(PassError, match=r"features names attention-transfer pairs, but the loss KDLoss has no "
                                        r"attention transfer, so they would be ignored"):  # was ignored silently
        distill(trained("cnn"), SmallCNN(4, 8), (x, y), loss="kd", features=[("relu2", "relu2")], epochs=1,
                quiet=True)
    class Pair(torch.nn.Module):  # two outputs: which one is the logits is the user's to say
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x):
            y = self.fc(x.flatten(1))
            return y, y.sum(1)

    with pytest.raises(PassError, match=r"the student returns a tuple of 2, but distillation compares one logits "
                                        r"tensor \[batch, classes\].*return only its logits"):
        distill(trained("cnn"), Pair(), (x, y), loss="kd", epochs=1, quiet=True)  # was an AttributeError
    # labels beyond the student's outputs: an error naming both, whatever the loss or augmentation (was an
    # IndexError from cross-entropy for ce / at without mixup, and a mixup message with it)
    five = SmallCNN(4, 8)
    five.fc = torch.nn.Linear(8 * 16, 5)
    for teacher, loss, augment in ((None, "ce", "none"), (trained("cnn"), "at", "none"), (None, "ce", "mixup")):
        with pytest.raises(PassError, match=r"labels go up to 9, but the model being trained gives 5 outputs"):
            distill(teacher, five, (x, y), loss=loss, augment=augment, epochs=1, quiet=True)


def test_attention_transfer_pairs_the_last_map_of_each_shared_resolution_unless_pairs_are_named():
    x, y, _, _ = digits()
    teacher = trained("resnet")  # 16 x 8x8 all the way, then global pooling (1x1: left out)
    teacher_graph = ir.capture(teacher, (x[:2],))
    assert {k: n.name for k, n in stage_ends(teacher_graph).items()} == {(8, 8): "stage_2_relu2"}
    student = SmallCNN(4, 8)  # 8x8 (relu1, relu2), then 4x4 (pool)
    assert auto_pairs(ir.capture(student, (x[:2],)), teacher_graph) == [("relu2", "stage_2_relu2")]
    res = distill(teacher, student, (x[:256], y[:256]), loss="at+kd", epochs=1, quiet=True)
    assert res.features == [("relu2", "stage_2_relu2")]
    res = distill(teacher, SmallCNN(4, 8), (x[:256], y[:256]), loss="at+kd", features=[("relu1", "stem")], epochs=1,
                  quiet=True)
    assert res.features == [("relu1", "stem")]
    assert distill(teacher, SmallCNN(4, 8), (x[:256], y[:256]), loss="kd", epochs=1, quiet=True).features == []


def test_automatic_pairs_never_pair_a_pooled_map_with_a_computed_one():
    from torch import nn

    from slimfx import models

    x = torch.rand(2, 1, 8, 8)
    teacher = ir.capture(models.get("digits_cnn").build(0), (x,))  # convs at 8x8 and 4x4; 2x2 = 4x4 max-pooled
    assert computed_sizes(teacher) == {(8, 8), (4, 4)}
    assert {k: n.name for k, n in stage_ends(teacher).items()} == {
        (8, 8): "features_1_2", (4, 4): "features_3_2", (2, 2): "features_4"}

    def conv(cin, cout, stride=1):
        return [nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU()]

    def pairs(*layers):
        return auto_pairs(ir.capture(nn.Sequential(*layers, nn.Flatten(), nn.LazyLinear(10)), (x,)), teacher)

    # one conv stage pooled to 4x4: its 4x4 map is its 8x8 stage, not a stage like the teacher's third conv
    assert pairs(*conv(1, 8), nn.MaxPool2d(2)) == [("_1", "features_1_2")]
    # pooled with pooled is the same kind: both 2x2 maps are their 4x4 stage max-pooled
    assert pairs(*conv(1, 4), nn.MaxPool2d(2), *conv(4, 8), nn.MaxPool2d(2)) == [
        ("_1", "features_1_2"), ("_4", "features_3_2"), ("_5", "features_4")]
    # a stride-2 conv computes at 4x4 (and the student has no 8x8 map)
    assert pairs(*conv(1, 8, 2)) == [("_1", "features_3_2")]
    # shared sizes, but each computed in one network and pooled in the other: no pair, and the error says why
    with pytest.raises(PassError, match=r"no feature maps of the same spatial size and kind: at the sizes both have "
                                        r"\(4x4, 2x2\) one network computes \(a conv writes maps of sizes 2x2 in the "
                                        r"student, 4x4 in the teacher\).*name pairs yourself"):
        pairs(nn.AvgPool2d(2), *conv(1, 4, 2))


# --- DistributedDataParallel: 2 processes on gloo end with identical weights ------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out_dir: str, rank: int, world: int) -> None:
    torch.set_num_threads(1)
    teacher = trained("cnn")
    x, y, _, _ = digits()
    torch.manual_seed(3)
    student = SmallCNN(4, 8)
    res = distill(teacher, student, (x[:800], y[:800]), loss="ctkd", epochs=2, lr=3e-3, batch_size=64, eval_fn=accuracy,
                  seed=0, quiet=True)
    torch.save({"state": student.state_dict(), "acc": accuracy(student), "history": res.history},
               os.path.join(out_dir, f"w{world}_r{rank}.pt"))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _run(out_dir, rank, world)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_each_other_and_one_process():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, _free_port(), d), nprocs=2, join=True)
        _run(d, 0, 1)
        r0, r1, single = (torch.load(os.path.join(d, f), weights_only=False) for f in ("w2_r0.pt", "w2_r1.pt", "w1_r0.pt"))
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # DDP keeps the replicas bit-identical
    drop_time = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert drop_time(r0["history"]) == drop_time(r1["history"])  # all-reduced loss, broadcast accuracy, same T
    assert r0["acc"] > 0.5
    # same global batches as one process; only per-shard BN statistics differ
    assert abs(r0["acc"] - single["acc"]) < 0.03
    assert abs(r0["history"][-1]["loss"] - single["history"][-1]["loss"]) < 0.15 * single["history"][-1]["loss"]


def test_label_mistakes_are_pass_errors_naming_the_fix_not_torch_crashes():
    """Negative labels were a RuntimeError from cross-entropy ("Class values must be non-negative"), unlabelled
    batches a TypeError inside cross-entropy, and an eval_fn that measures no accuracy (unlabelled validation:
    slimfx.data.accuracy gives None) a TypeError from float(None): all internal errors to a CLI user."""
    x, y, _, _ = digits()
    y = y[:64].clone()
    y[3] = -1
    for teacher, loss, augment in ((None, "ce", "none"), (trained("cnn"), "kd", "none"), (None, "ce", "mixup")):
        with pytest.raises(PassError, match=r"the data's labels include -1, but class-index labels start at 0"):
            distill(teacher, SmallCNN(4, 8), (x[:64], y), loss=loss, augment=augment, epochs=1, quiet=True)
    with pytest.raises(PassError, match=r"loss 'ce'.*needs labels, but a train batch has none"):
        distill(None, SmallCNN(4, 8), (x[:64], None), loss="ce", epochs=1, quiet=True)
    with pytest.raises(PassError, match=r"eval_fn\) gave no accuracy \(None\): the validation data needs labels"):
        distill(trained("cnn"), SmallCNN(4, 8), (x[:64], None), loss="kd", loss_options={"alpha": 1.0}, epochs=1,
                eval_fn=lambda m: None, quiet=True)


def test_class_indices_in_a_float_tensor_are_named_with_the_fix():
    """Float class indices were a RuntimeError from cross-entropy ("expected target dtype to be Long") without
    augmentation, and with mixup an error advising augment 'none', which led to that crash."""
    x, y, _, _ = digits()
    with pytest.raises(PassError, match=r"the train labels are torch.float32 numbers, one per sample: class-index "
                                        r"labels must be an integer tensor; give y.long\(\)"):
        distill(None, SmallCNN(4, 8), (x[:64], y[:64].float()), loss="ce", epochs=1, quiet=True)
    with pytest.raises(PassError, match=r"these labels are \[64\] torch.float32: class indices held as floats need "
                                        r"y.long\(\); other labels: use augment 'none'"):
        distill(None, SmallCNN(4, 8), (x[:64], y[:64].float()), loss="ce", augment="mixup", epochs=1, quiet=True)
