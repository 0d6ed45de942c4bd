"""Distillation losses: KD, adaptive temperature (CTKD, logit standardization), attention transfer.

Every loss is an nn.Module with one call signature so the trainer can swap them by name:

    loss(student_logits, teacher_logits, target, student_features=(), teacher_features=())

`uses_teacher` / `uses_features` say what a loss reads; `set_progress(epoch, epochs)` lets a loss
follow a curriculum (CTKD's reversal weight); `metrics()` reports loss-internal values (the learned T).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from slimfx.ir.errors import PassError


def _check_logits(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise PassError(f"distillation needs student and teacher logits of the same shape; student gives "
                        f"{list(student.shape)}, teacher gives {list(teacher.shape)}. Give the student the "
                        "teacher's number of classes (its last layer), or distil features only")


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: torch.Tensor | float) -> torch.Tensor:
    """Per-sample KL(softmax(t/T) || softmax(s/T)); T may be a scalar or a [B, 1] tensor."""
    log_ps = F.log_softmax(student_logits / T, dim=1)
    log_pt = F.log_softmax(teacher_logits / T, dim=1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)


class DistillLoss(nn.Module):
    """Base class: the common signature and the optional hooks."""

    uses_teacher: bool = True
    uses_features: bool = False

    @property
    def needs_labels(self) -> bool:
        """Whether the loss reads class labels (a cross-entropy term); losses that only imitate the teacher do not."""
        return False

    def set_progress(self, epoch: int, epochs: int) -> None:
        """Called by the trainer at the start of each epoch (0-based) for curricula."""

    def metrics(self) -> dict[str, float]:
        """Loss-internal values worth logging each epoch."""
        return {}


class CELoss(DistillLoss):
    """Plain cross-entropy on labels: training from scratch or fine-tuning without a teacher."""

    uses_teacher = False
    needs_labels = True  # type: ignore[assignment]

    def forward(self, student_logits, teacher_logits=None, target=None, student_features=(),
                teacher_features=()):
        if target is None:
            raise PassError("cross-entropy (loss 'ce': training from scratch or fine-tuning) needs labels, but a "
                            "train batch has none (inputs, None); give (inputs, labels) train data, or distil from a "
                            "teacher with a loss that needs no labels (kd with alpha=1)")
        return F.cross_entropy(student_logits, target)


class KDLoss(DistillLoss):
    """Hinton et al. 2015: (1-alpha)*CE(s, y) + alpha*T^2*KL(softmax(t/T) || softmax(s/T)).

    The T^2 factor keeps the soft term's gradient scale independent of T.
    """

    def __init__(self, T: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        if T <= 0:
            raise PassError(f"KD temperature T must be > 0, got {T}")
        if not 0.0 <= alpha <= 1.0:
            raise PassError(f"KD weight alpha must be in [0, 1], got {alpha}")
        self.T, self.alpha = float(T), float(alpha)

    @property
    def needs_labels(self) -> bool:
        return self.alpha < 1.0

    def temperature(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> Any:
        return self.T

    def soft_term(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        T = self.temperature(student_logits, teacher_logits)
        return (soft_kl(student_logits, teacher_logits, T) * T ** 2).mean() if isinstance(T, float) \
            else (soft_kl(student_logits, teacher_logits, T) * T.reshape(-1) ** 2).mean()

    def forward(self, student_logits, teacher_logits, target=None, student_features=(), teacher_features=()):
        _check_logits(student_logits, teacher_logits)
        loss = self.alpha * self.soft_term(student_logits, teacher_logits.detach())
        if self.alpha < 1.0:
            if target is None:
                raise PassError("KD with alpha < 1 needs labels (the CE term); pass targets or set alpha=1")
            loss = loss + (1.0 - self.alpha) * F.cross_entropy(student_logits, target)
        return loss


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Identity forward; multiplies the gradient by -lam backward (Ganin & Lempitsky 2015)."""
    return _GradReverse.apply(x, lam)


class CTKDLoss(KDLoss):
    """Curriculum temperature KD (Li et al., AAAI 2023): a learnable global T trained adversarially.

    T = t_min + (t_max - t_min) * sigmoid(GRL(raw, lambda)): the optimizer that minimises the loss for the
    student *maximises* it for T (gradient reversal), so T moves to make the task harder. lambda follows a
    cosine curriculum from 0 to `lambda_max` over the first `warmup` fraction of the epochs.
    """

    def __init__(self, T: float = 4.0, alpha: float = 0.9, t_min: float = 1.0, t_max: float = 20.0,
                 lambda_max: float = 1.0, warmup: float = 0.5) -> None:
        super().__init__(T, alpha)
        if not t_min < T < t_max:
            raise PassError(f"CTKD initial T={T} must lie strictly between t_min={t_min} and t_max={t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)
        frac = (T - t_min) / (t_max - t_min)
        self.raw = nn.Parameter(torch.tensor(math.log(frac / (1 - frac))))
        self.lambda_max, self.warmup = float(lambda_max), float(warmup)
        self.lam = 0.0

    def set_progress(self, epoch: int, epochs: int) -> None:
        span = max(self.warmup * epochs, 1e-9)
        t = min(epoch / span, 1.0)
        self.lam = self.lambda_max * 0.5 * (1.0 - math.cos(math.pi * t))

    def current_T(self) -> torch.Tensor:
        return self.t_min + (self.t_max - self.t_min) * torch.sigmoid(grad_reverse(self.raw, self.lam))

    def temperature(self, student_logits, teacher_logits):
        return self.current_T().reshape(1, 1).expand(student_logits.shape[0], 1)

    def metrics(self) -> dict[str, float]:
        return {"T": float(self.current_T().detach()), "lambda": self.lam}


class LogitStdKDLoss(KDLoss):
    """Logit standardization KD (Sun et al., CVPR 2024): per-sample temperature from the logits' spread.

    Both logit vectors are z-scored per sample, then KD runs at base temperature T: equivalently each
    sample has temperature T * std(z), and the student matches the teacher's logit *relations*, not scale.
    """

    def __init__(self, T: float = 2.0, alpha: float = 0.9, eps: float = 1e-7) -> None:
        super().__init__(T, alpha)
        self.eps = eps

    def standardize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + self.eps)

    def soft_term(self, student_logits, teacher_logits):
        s, t = self.standardize(student_logits), self.standardize(teacher_logits)
        return (soft_kl(s, t, self.T) * self.T ** 2).mean()


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017: Q = vec(mean_c |A_c|^p) / ||.||_2, one unit vector per sample [B, H*W]."""
    if feature.dim() < 3:
        raise PassError(f"attention transfer needs feature maps [B, C, H, W...], got shape {list(feature.shape)}")
    return F.normalize(feature.abs().pow(p).mean(dim=1).flatten(1), dim=1)


class AttentionTransferLoss(DistillLoss):
    """beta/2 * sum_j mean((Q_s_j - Q_t_j)^2) over matched feature pairs (the authors' code; beta=1e3).

    Channel counts may differ between student and teacher (the map sums over channels); spatial sizes
    must match, and a mismatch raises naming the pair.
    """

    uses_features = True

    def __init__(self, beta: float = 1000.0, p: float = 2.0, names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.beta, self.p = float(beta), float(p)
        self.names = list(names) if names else None

    def _pair_name(self, j: int) -> str:
        return self.names[j] if self.names and j < len(self.names) else f"#{j}"

    def forward(self, student_logits=None, teacher_logits=None, target=None, student_features=(),
                teacher_features=()):
        if len(student_features) != len(teacher_features):
            raise PassError(f"attention transfer got {len(student_features)} student feature maps but "
                            f"{len(teacher_features)} teacher maps; give one teacher feature per student feature")
        if not student_features:
            raise PassError("attention transfer needs at least one (student, teacher) feature pair; "
                            "name them with features=[('student_node_or_module', 'teacher_node_or_module')]")
        total = 0.0
        for j, (fs, ft) in enumerate(zip(student_features, teacher_features)):
            if fs.shape[0] != ft.shape[0] or fs.shape[2:] != ft.shape[2:]:
                raise PassError(f"attention transfer pair {self._pair_name(j)}: student feature {list(fs.shape)} "
                                f"and teacher feature {list(ft.shape)} differ in spatial size; pick layers "
                                "with the same H x W (channels may differ)")
            diff = attention_map(fs, self.p) - attention_map(ft.detach(), self.p)
            total = total + diff.pow(2).mean()
        return self.beta / 2 * total


class CombinedLoss(DistillLoss):
    """A logit loss (CE, KD, CTKD, logit-std KD) plus attention transfer: AT, AT+KD, AT+CTKD."""

    uses_features = True

    def __init__(self, logit_loss: DistillLoss, at: AttentionTransferLoss) -> None:
        super().__init__()
        self.logit_loss, self.at = logit_loss, at
        self.uses_teacher = True

    @property
    def needs_labels(self) -> bool:
        return self.logit_loss.needs_labels

    def set_progress(self, epoch: int, epochs: int) -> None:
        self.logit_loss.set_progress(epoch, epochs)

    def metrics(self) -> dict[str, float]:
        return self.logit_loss.metrics()

    def forward(self, student_logits, teacher_logits, target=None, student_features=(), teacher_features=()):
        return (self.logit_loss(student_logits, teacher_logits, target)
                + self.at(None, None, None, student_features, teacher_features))


class MSELoss(DistillLoss):
    """Mean squared error to the teacher's output: block-wise distillation of activations (no labels)."""

    def forward(self, student_out, teacher_out, target=None, student_features=(), teacher_features=()):
        if student_out.shape != teacher_out.shape:
            raise PassError(f"output regression needs student and teacher outputs of the same shape; student "
                            f"gives {list(student_out.shape)}, teacher gives {list(teacher_out.shape)}")
        return F.mse_loss(student_out, teacher_out.detach())


_LOGIT_LOSSES: dict[str, type[DistillLoss]] = {
    "ce": CELoss, "mse": MSELoss, "kd": KDLoss, "ctkd": CTKDLoss, "logit-std": LogitStdKDLoss,
}
_AT_OPTIONS = ("beta", "p", "names")
#: the loss names make_loss builds (the type of the distill pass's `loss` option)
LossName = Literal["ce", "mse", "kd", "ctkd", "logit-std", "at", "at+kd", "at+ctkd", "at+logit-std"]
LOSS_NAMES: tuple[str, ...] = get_args(LossName)


def make_loss(name: str, **options: Any) -> DistillLoss:
    """Build a loss by name: ce | mse | kd | ctkd | logit-std | at (CE+AT) | at+kd | at+ctkd | at+logit-std.

    Options go to the parts that accept them (T, alpha, ... to the logit loss; beta, p to AT).
    """
    key = name.strip().lower().replace("_", "-")
    parts = key.split("+")
    if key not in LOSS_NAMES:
        raise PassError(f"unknown distillation loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    at_opts = {k: options.pop(k) for k in _AT_OPTIONS if k in options}
    if parts[0] != "at":
        if at_opts:
            raise PassError(f"loss {name!r} has no attention-transfer term; options {sorted(at_opts)} apply "
                            "only to 'at', 'at+kd', 'at+ctkd', 'at+logit-std'")
        return _build(_LOGIT_LOSSES[key], key, options)
    logit = _build(_LOGIT_LOSSES[parts[1] if len(parts) > 1 else "ce"], key, options)
    return CombinedLoss(logit, AttentionTransferLoss(**at_opts))


def _build(cls: type[DistillLoss], name: str, options: dict[str, Any]) -> DistillLoss:
    if cls in (CELoss, MSELoss) and options:
        raise PassError(f"loss {name!r} takes no options {sorted(options)} (T and alpha need a teacher: use 'kd')")
    try:
        return cls(**options)
    except TypeError as e:
        raise PassError(f"loss {name!r}: {e}") from e
