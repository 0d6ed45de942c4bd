"""Whole-model distillation as one job: a teacher, a student, a `Data`, and `Settings` -> the trained student and
its numbers, each labelled with the split it came from. `slimfx distill` runs it, and so does
benchmarks/distill_sweep.py, so the sweep's numbers are the command's numbers.

- The best epoch is chosen on `data.validation` (never test); `validation_accuracy` is that epoch's.
- `test_accuracy` is measured once, on `data.test`, with the weights that are returned.
- `baseline=True` also trains the same student (a fresh build from the same seed) from scratch with
  cross-entropy on the same data, epochs, learning rate and batches: what distillation has to beat.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn

from slimfx.data import Data, accuracy

log = logging.getLogger("slimfx.distill")


@dataclass(frozen=True)
class Settings:
    """How a student is trained. The defaults are the ones benchmarks/distill_sweep.py chose on validation
    accuracy over three teacher/student pairs (docs/distillation.md has the table)."""

    loss: str = "kd"
    T: float = 2.0
    alpha: float = 0.9
    beta: float = 1.0
    epochs: int = 40
    lr: float = 1e-2
    batch_size: int = 64
    augment: str = "mixup:1"
    features: tuple[tuple[str, str], ...] = ()

    def loss_options(self) -> dict[str, Any]:
        """The options `make_loss` takes for this loss: T and alpha for the logit part, beta for AT."""
        opts: dict[str, Any] = {}
        if self.loss.split("+")[-1] in ("kd", "ctkd", "logit-std"):
            opts.update(T=self.T, alpha=self.alpha)
        if self.loss.startswith("at"):
            opts["beta"] = self.beta
        return opts

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v:g}" for k, v in self.loss_options().items())
        aug = f", augment {self.augment}" if self.augment != "none" else ""
        return f"{self.loss}{' (' + opts + ')' if opts else ''}, {self.epochs} epochs, lr {self.lr:g}{aug}"


DEFAULTS = Settings()


@dataclass
class Arm:
    """One trained student: which loss, the chosen epoch, accuracy per split, the per-epoch history."""

    label: str
    loss: str
    params: int
    best_epoch: int
    epochs: int
    validation_accuracy: float | None
    test_accuracy: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    features: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = [f"{s}:{t}" for s, t in self.features]
        return d


def train_arm(label: str, teacher: nn.Module | None, student: nn.Module, data: Data, settings: Settings, *,
              seed: int = 0, quiet: bool = False, logger: logging.Logger | None = None) -> Arm:
    """Train `student` in place with `settings` (loss 'ce' needs no teacher); the best epoch on validation."""
    from slimfx.passes.distill import distill

    train, validation, test = data.split("train"), data.split("validation"), data.split("test")
    (logger or log).info("%s: %s; each epoch's accuracy is on the validation split", label, settings.describe())
    t0 = time.perf_counter()
    res = distill(teacher if settings.loss != "ce" else None, student, train, loss=settings.loss,
                  loss_options=settings.loss_options(), features=list(settings.features), epochs=settings.epochs,
                  lr=settings.lr, batch_size=settings.batch_size, augment=settings.augment, eval_fn=lambda m: accuracy(m, validation),
                  seed=seed, quiet=quiet, desc=label, logger=logger or log)
    test_acc = accuracy(student, test) if test is not None else None
    return Arm(label, settings.loss, sum(p.numel() for p in student.parameters()), res.best_epoch,
               settings.epochs, res.best_metric, test_acc, res.history, res.features,
               round(time.perf_counter() - t0, 3))


def run(teacher: nn.Module, make_student: Callable[[], nn.Module], make_data: Callable[[], Data],
        settings: Settings = DEFAULTS, *, baseline: bool = False, seed: int = 0, quiet: bool = False,
        logger: logging.Logger | None = None) -> tuple[nn.Module, list[Arm]]:
    """Distil a fresh `make_student()` from `teacher`; with `baseline`, also train another fresh one from scratch.

    Returns (the distilled student, [distilled arm, baseline arm?]). `make_student` must build the same
    initial weights each call (slimfx.loading seeds user callables; zoo models build from a seed), and
    `make_data` gives each arm its data afresh, so both see the same batches in the same order.
    """
    student = make_student()
    arms = [train_arm("distill", teacher, student, make_data(), settings, seed=seed, quiet=quiet, logger=logger)]
    if baseline:
        scratch = replace(settings, loss="ce", features=())
        arms.append(train_arm("baseline", None, make_student(), make_data(), scratch, seed=seed, quiet=quiet,
                              logger=logger))
    return student, arms


__all__ = ["Settings", "DEFAULTS", "Arm", "train_arm", "run"]
