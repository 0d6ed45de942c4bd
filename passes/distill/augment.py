"""Input augmentation for the distillation loop, applied to each global batch before teacher and student see it.

With a teacher, both models get the same augmented inputs (consistent teaching, Beyer et al. 2022, "Knowledge
distillation: a good teacher is patient and consistent"): the teacher labels inputs the train set does not
hold, which is what distillation can add over training on the labels. A scratch baseline trained with the same
`augment` sees the same augmented inputs (with their labels mixed the same way), so the comparison stays fair.

- "none": the batches as they are.
- "mixup" / "mixup:A": each sample blended with another of its batch, x = lam*x_i + (1-lam)*x_j with lam drawn
  per sample from Beta(A, A) (A defaults to 1: lam uniform); the label term becomes the same blend of the two
  one-hot labels. Floating-point inputs of any shape; class-index labels.
- "shift" / "shift:N": translate every image by a random whole number of pixels in [-N, N] along each of its
  last two dimensions (N defaults to 1), zero-filled; the labels stay. Floating-point inputs with at least 3
  dimensions (batch, ..., height, width). The teacher must be right on shifted inputs: the zoo's digits_cnn
  is not (71% on 1-pixel shifts of the test digits), so this is for images larger than 8x8.

Deterministic: the draws come from a generator seeded by (seed, epoch, batch index), independent of the global
RNG, so the same seed gives the same augmented batches (and every DDP rank the same global batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slimfx.ir.errors import PassError

AUGMENT_HELP = ("none: the batches as they are; mixup or mixup:A: blend each sample with another of its batch, "
                "weight lam ~ Beta(A, A) per sample (default A=1), labels blended the same way; shift or shift:N: "
                "translate each image by a random number of pixels in [-N, N] (default 1), zero-filled. Teacher "
                "and student see the same augmented batch, and so does a scratch baseline with the same option")


@dataclass(frozen=True)
class Augment:
    """A parsed augment spec: kind 'none', 'mixup' (param: Beta's A) or 'shift' (param: pixels)."""

    kind: str = "none"
    param: float = 0.0

    def __bool__(self) -> bool:
        return self.kind != "none"


def parse_augment(spec: str | None) -> Augment:
    """The Augment a spec names; PassError (with the accepted forms) for anything else."""
    text = (spec or "none").strip().lower()
    name, sep, arg = text.partition(":")
    if name == "none" and not sep:
        return Augment()
    if name == "shift":
        if not sep:
            return Augment("shift", 1)
        if arg.isdigit() and int(arg) >= 1:
            return Augment("shift", int(arg))
    if name == "mixup":
        if not sep:
            return Augment("mixup", 1.0)
        try:
            a = float(arg)
        except ValueError:
            a = -1.0
        if 0 < a < float("inf"):
            return Augment("mixup", a)
    raise PassError(f"unknown augment {spec!r}; use 'none', 'mixup' or 'mixup:A' (A > 0, the Beta(A, A) of the "
                    "blend weight), 'shift' or 'shift:N' (N >= 1 pixels)")


@dataclass(frozen=True)
class MixedTarget:
    """The labels of a mixup batch: sample i is lam[i] of class a[i] and 1 - lam[i] of class b[i]."""

    a: torch.Tensor
    b: torch.Tensor
    lam: torch.Tensor

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, idx) -> MixedTarget:
        return MixedTarget(self.a[idx], self.b[idx], self.lam[idx])

    def to(self, device) -> MixedTarget:
        return MixedTarget(self.a.to(device), self.b.to(device), self.lam.to(device))

    def probs(self, num_classes: int) -> torch.Tensor:
        """[batch, num_classes] class probabilities, what cross-entropy takes as a soft target."""
        check_labels(torch.cat([self.a, self.b]), num_classes)
        oh = torch.nn.functional.one_hot
        lam = self.lam.unsqueeze(1)
        return lam * oh(self.a, num_classes).float() + (1 - lam) * oh(self.b, num_classes).float()


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """PassError unless every class-index label names one of the model's `num_classes` outputs (cross-entropy
    and mixup index the logits with them; out of range, torch fails with an IndexError or a RuntimeError)."""
    if not labels.numel():
        return
    low, top = labels.min(), labels.max()
    if int(low) < 0:
        raise PassError(f"the data's labels include {int(low)}, but class-index labels start at 0: give labels "
                        f"0..{num_classes - 1} (one per output of the model being trained; e.g. map -1 or any "
                        "'ignore' label away, or drop those samples)")
    if int(top) >= num_classes:
        raise PassError(f"the data's labels go up to {int(top)}, but the model being trained gives {num_classes} "
                        f"outputs per sample: a classifier needs one output per class of the data ({int(top) + 1} "
                        f"or more; e.g. its last layer nn.Linear(..., {int(top) + 1})), or give labels 0.."
                        f"{num_classes - 1}")


def float_indices(target) -> PassError | None:
    """The error for class-index labels held in a floating-point tensor (1-D, one per sample), else None: cross-
    entropy takes integer indices or per-class probabilities shaped like the logits, and mixup blends indices."""
    if isinstance(target, torch.Tensor) and target.is_floating_point() and target.dim() == 1:
        return PassError(f"the train labels are {target.dtype} numbers, one per sample: class-index labels must be "
                         "an integer tensor; give y.long() (or per-class probabilities, [batch, classes])")
    return None


def soft_target(target, logits: torch.Tensor):
    """A MixedTarget as probabilities over the logits' classes; class-index labels checked against the logits'
    classes; any other target as it is."""
    if isinstance(target, MixedTarget):
        return target.probs(logits.shape[-1])
    if logits.dim() == 2 and logits.shape[-1] > 1 and (e := float_indices(target)) is not None:
        raise e
    if isinstance(target, torch.Tensor) and not target.is_floating_point() and target.numel() and logits.dim() >= 2:
        check_labels(target, logits.shape[-1])
    return target


def apply(aug: Augment, inputs: tuple[torch.Tensor, ...], target, gen: torch.Generator):
    """(inputs, target) of one global batch, augmented with draws from `gen`."""
    if not aug:
        return inputs, target
    for i, t in enumerate(inputs):
        need_image = aug.kind == "shift"
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and (t.dim() >= 3 or not need_image)):
            shape = f"{list(t.shape)} ({t.dtype})" if isinstance(t, torch.Tensor) else type(t).__name__
            what = "floating-point [batch, ..., height, width] images" if need_image else "floating-point inputs"
            raise PassError(f"augment '{aug.kind}' needs {what}, but input {i} is {shape}; use augment 'none'")
    n = len(inputs[0])
    if aug.kind == "shift":
        m = int(aug.param)
        d = torch.randint(-m, m + 1, (n, 2), generator=gen)
        return tuple(_translate(t, d, m) for t in inputs), target
    # mixup
    if target is not None and (not isinstance(target, torch.Tensor) or target.is_floating_point()
                               or target.dim() != 1):
        floats = isinstance(target, torch.Tensor) and target.is_floating_point() and target.dim() == 1
        raise PassError("augment 'mixup' blends class-index labels (a 1-D integer tensor per batch); these labels "
                        f"are {list(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__}"
                        f"{f' {target.dtype}' if floats else ''}: "
                        f"{'class indices held as floats need y.long(); other labels: ' if floats else ''}"
                        "use augment 'none'")
    perm = torch.randperm(n, generator=gen)
    lam = _beta(aug.param, n, gen)
    mixed = tuple(_blend(t, perm, lam) for t in inputs)
    return mixed, (MixedTarget(target, target[perm], lam) if target is not None else None)


def _beta(a: float, n: int, gen: torch.Generator) -> torch.Tensor:
    """n draws of Beta(a, a), seeded from `gen` (torch.distributions cannot take a generator)."""
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
    return torch.from_numpy(rng.beta(a, a, n)).float()


def _blend(t: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    w = lam.to(t.dtype).reshape(-1, *([1] * (t.dim() - 1)))
    return w * t + (1 - w) * t[perm]


def _translate(t: torch.Tensor, d: torch.Tensor, m: int) -> torch.Tensor:
    h, w = t.shape[-2:]
    padded = torch.nn.functional.pad(t, (m, m, m, m))
    out = torch.empty_like(t)
    for dy, dx in {(int(a), int(b)) for a, b in d}:
        rows = ((d[:, 0] == dy) & (d[:, 1] == dx)).nonzero().flatten()
        # output pixel (y, x) reads input (y - dy, x - dx): the content moves by (dy, dx)
        out[rows] = padded[rows, ..., m - dy:m - dy + h, m - dx:m - dx + w]
    return out
