"""Augmentation in the distillation loop: seeded and deterministic, the same batch for teacher and student, labels
blended as the inputs (mixup) or kept (shift), and actionable errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimfx.ir.errors import PassError
from slimfx.passes import parse_pass_spec
from slimfx.passes.distill import distill
from slimfx.passes.distill.augment import Augment, MixedTarget, parse_augment
from slimfx.passes.distill.trainer import TrainData


def _epoch(augment: str, seed: int, epoch: int = 0, n: int = 20):
    """One epoch of batches of 20 samples; sample k is all k + 1 and has label k, so both say where it came from."""
    x = (torch.arange(n, dtype=torch.float32) + 1).reshape(n, 1, 1, 1).expand(n, 1, 4, 4).clone()
    return list(TrainData((x, torch.arange(n)), 8, seed, augment).epoch(epoch))


def test_specs_parse_to_their_parameters_and_bad_ones_name_the_accepted_forms():
    assert parse_augment("none") == Augment() and not parse_augment(None)
    assert parse_augment("mixup") == Augment("mixup", 1.0) and parse_augment("MixUp:0.4") == Augment("mixup", 0.4)
    assert parse_augment("shift") == Augment("shift", 1) and parse_augment("shift:2") == Augment("shift", 2)
    for bad in ("crop", "shift:0", "shift:1.5", "mixup:0", "mixup:x", "none:1"):
        with pytest.raises(PassError, match="use 'none', 'mixup' or 'mixup:A'.*'shift' or 'shift:N'"):
            parse_augment(bad)
    with pytest.raises(PassError, match="pass 'distill': unknown augment 'crop'"):
        parse_pass_spec("distill{augment=crop}")


def test_mixup_is_deterministic_under_a_seed_and_blends_inputs_and_labels_alike():
    a, b, c = _epoch("mixup", seed=3), _epoch("mixup", seed=3), _epoch("mixup", seed=4)
    plain = _epoch("none", seed=3)
    assert all(torch.equal(i1[0], i2[0]) and torch.equal(t1.lam, t2.lam) for (i1, t1), (i2, t2) in zip(a, b))
    assert not torch.equal(a[0][0][0], c[0][0][0])
    assert not torch.equal(_epoch("mixup", seed=3, epoch=1)[0][0][0], a[0][0][0])  # new draws each epoch
    for (inputs, target), (_, p_target) in zip(a, plain):
        assert isinstance(target, MixedTarget) and torch.equal(target.a, p_target)  # the same shuffled batch
        assert sorted(target.b.tolist()) == sorted(target.a.tolist())  # partners come from the same batch
        assert ((target.lam >= 0) & (target.lam <= 1)).all() and target.lam.std() > 0  # per-sample weights
        blend = target.lam * (target.a + 1) + (1 - target.lam) * (target.b + 1)
        assert torch.allclose(inputs[0][:, 0, 0, 0], blend) and torch.equal(inputs[0], inputs[0][:, :, :1, :1]
                                                                           .expand_as(inputs[0]))
        probs = target.probs(20)
        assert torch.allclose(probs.sum(1), torch.ones(len(probs)))
        rows = torch.arange(len(probs))
        assert torch.allclose(probs[rows, target.a] + probs[rows, target.b] * (target.a != target.b),
                              torch.ones(len(probs)))
        assert torch.allclose(probs[rows, target.b] * (target.a != target.b),
                              (1 - target.lam) * (target.a != target.b))


def test_shift_moves_each_image_by_at_most_n_pixels_and_keeps_labels():
    n = 40
    x = torch.zeros(n, 1, 6, 6)
    x[:, 0, 2, 3] = 1.0  # one lit pixel, away from the edges
    y = torch.arange(n) % 10
    batches = list(TrainData((x, y), 16, 0, "shift:2").epoch(0))
    again = list(TrainData((x, y), 16, 0, "shift:2").epoch(0))
    plain = list(TrainData((x, y), 16, 0, "none").epoch(0))
    moves = set()
    for (inputs, target), (i2, _), (_, p_target) in zip(batches, again, plain):
        assert torch.equal(inputs[0], i2[0]) and torch.equal(target, p_target)
        for img in inputs[0]:
            assert img.sum() == 1.0  # moved, not lost
            r, c = (img[0] == 1).nonzero()[0].tolist()
            moves.add((r - 2, c - 3))
    assert moves <= {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)} and len(moves) > 5


def test_teacher_and_student_see_the_same_augmented_batch():
    seen: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}

    class Recorder(nn.Module):
        def __init__(self, role: str) -> None:
            super().__init__()
            self.role, self.fc = role, nn.Linear(16, 3)

        def forward(self, x):
            if self.training or self.role == "teacher":
                seen[self.role].append(x.detach().clone())
            return self.fc(x.flatten(1))

    torch.manual_seed(0)
    x, y = torch.rand(24, 1, 4, 4), torch.randint(0, 3, (24,))
    distill(Recorder("teacher"), Recorder("student"), (x, y), loss="kd", epochs=2, batch_size=8,
            augment="mixup:0.5", quiet=True, seed=1, example_inputs=(x[:2],))
    t, s = seen["teacher"][-6:], seen["student"][-6:]  # 3 batches x 2 epochs (the first teacher call is a probe)
    assert len(s) == 6 and all(torch.equal(a, b) for a, b in zip(t, s))
    assert not any(torch.equal(b, x[:8]) for b in s)


def test_augment_errors_name_the_input_and_the_fix():
    with pytest.raises(PassError, match="augment 'shift' needs floating-point .*height, width.* images, but input 0 "
                                        r"is \[8, 16\].*use augment 'none'"):
        list(TrainData((torch.rand(8, 16), torch.zeros(8, dtype=torch.long)), 8, 0, "shift").epoch(0))
    with pytest.raises(PassError, match="mixup' blends class-index labels.*use augment 'none'"):
        list(TrainData((torch.rand(8, 16), torch.rand(8)), 8, 0, "mixup").epoch(0))
    with pytest.raises(PassError, match=r"labels go up to 5, but the model being trained gives 3 outputs.*nn.Linear\(\.\.\., 6\)"):
        MixedTarget(torch.tensor([5]), torch.tensor([0]), torch.tensor([0.5])).probs(3)


def test_the_pass_and_the_default_recipe_distil_with_the_sweeps_loss_T_alpha_and_beta():
    from slimfx.distilling import DEFAULTS
    from slimfx.recipe import load_recipe

    (opts,) = [o for name, o in load_recipe("default").passes if name == "distill"]
    step = parse_pass_spec("distill")
    for name in ("loss", "T", "alpha", "beta"):
        assert getattr(step, name) == getattr(DEFAULTS, name) and opts.get(name, getattr(DEFAULTS, name)) == \
            getattr(DEFAULTS, name), name
    # the fine-tune keeps plain batches: it runs on any model (token ids cannot be blended)
    assert step.augment == "none" and parse_augment(DEFAULTS.augment).kind == "mixup"
