"""The distillation trainer: one loop for KD, adaptive-T KD, attention transfer and plain fine-tuning.

`distill(teacher, student, train_data, loss=...)` trains `student` (an nn.Module or an ir.Graph) in
place against `teacher` (nn.Module, ir.Graph, or None for loss="ce"). Feature maps for attention transfer
are read by making them extra graph outputs (see features.py). Under torchrun (torch.distributed
initialised) the student is wrapped in DistributedDataParallel and each global batch is sharded across
ranks, so N processes take the same optimizer steps as one process on the same global batches.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from slimfx import ir
from slimfx.ir import Graph
from slimfx.ir.errors import PassError
from slimfx.passes.distill.augment import apply, parse_augment, soft_target
from slimfx.passes.distill.features import LogitsOnly, as_graph, auto_pairs, check_pairs, with_features
from slimfx.passes.distill.losses import DistillLoss, make_loss

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor | None]
FeaturePairs = Sequence[tuple[str, str]]

log = logging.getLogger("slimfx.distill")


@dataclass
class DistillResult:
    """What training did. `student` is the object given (trained in place); `module` runs it (logits out)."""

    student: Any
    module: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_metric: float | None = None
    metric_name: str = "loss"
    features: list[tuple[str, str]] = field(default_factory=list)  # the attention-transfer pairs used


# --- data --------------------------------------------------------------------------------------------

class TrainData:
    """Re-iterable global batches from (x, y) tensors, a dataset with train_x/train_y, or batches.

    Tensor data is shuffled each epoch by a seeded generator; a batch list is replayed in order. `augment`
    (see augment.py) transforms every batch's inputs, seeded by (seed, epoch, batch).
    """

    def __init__(self, data: Any, batch_size: int = 64, seed: int = 0, augment: str = "none") -> None:
        self.batch_size, self.seed = batch_size, seed
        self.augment = parse_augment(augment)
        self.x: tuple[torch.Tensor, ...] | None = None
        self.y: torch.Tensor | None = None
        self.batches: Iterable | None = None
        if hasattr(data, "train_x") and hasattr(data, "train_y"):
            self.x, self.y = (data.train_x,), data.train_y
        elif (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor)
              and isinstance(data[1], torch.Tensor) and data[0].shape[:1] == data[1].shape[:1]):
            self.x, self.y = (data[0],), data[1]
        elif (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor)
              and data[1] is None):
            self.x, self.y = (data[0],), None  # unlabelled inputs (losses that need only the teacher)
        elif isinstance(data, Iterable):
            # replayed every epoch, so one-shot iterators (and unsized iterables) are materialised once
            self.batches = data if hasattr(data, "__len__") and iter(data) is not data else list(data)
        else:
            raise PassError(f"train_data must be (x, y) tensors, a dataset with train_x/train_y, or an iterable "
                            f"of (inputs, target) batches; got {type(data).__name__}")
        if len(self) == 0:
            raise PassError("the train data is empty (no batches or no samples); give at least one "
                            "(inputs, target) batch")

    def __len__(self) -> int:
        if self.x is not None:
            return math.ceil(len(self.x[0]) / self.batch_size)
        return len(self.batches)  # type: ignore[arg-type]

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if not self.augment:
            yield from self._plain(epoch)
            return
        for i, (inputs, target) in enumerate(self._plain(epoch)):
            g = torch.Generator().manual_seed((self.seed * 100003 + epoch) * 1009 + i + 7)
            yield apply(self.augment, inputs, target, g)

    def _plain(self, epoch: int) -> Iterator[Batch]:
        if self.x is not None:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            perm = torch.randperm(len(self.x[0]), generator=g)
            for i in range(0, len(perm), self.batch_size):
                idx = perm[i:i + self.batch_size]
                yield tuple(t[idx] for t in self.x), (self.y[idx] if self.y is not None else None)
            return
        for b in self.batches:  # type: ignore[union-attr]
            yield normalize_batch(b)

    def first_inputs(self) -> tuple[torch.Tensor, ...]:
        inputs, _ = next(iter(self._plain(0)))
        return tuple(t[:2] for t in inputs)


def normalize_batch(b: Any) -> Batch:
    """(inputs, target) with inputs a tuple of tensors; a bare tensor is an unlabelled input batch."""
    if isinstance(b, torch.Tensor):
        return (b,), None
    if isinstance(b, (tuple, list)) and len(b) == 2:
        inputs, target = b
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        return inputs, target
    raise PassError(f"a training batch must be (inputs, target); got {type(b).__name__} of length "
                    f"{len(b) if hasattr(b, '__len__') else '?'}")


def _shard(batch: Batch, rank: int, world: int) -> Batch:
    inputs, target = batch
    if world == 1:
        return batch
    return tuple(t[rank::world] for t in inputs), (target[rank::world] if target is not None else None)


def dist_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# --- the loop -------------------------------------------------------------------------------------------

#: The optimizers the training loop builds by name: the type of every pass option that names one
#: (finetune, distill, quantize's QAT), so an option accepts exactly what the loop knows.
Optimizer = Literal["adam", "adamw", "sgd"]
OPTIMIZER_HELP = ("adam: Adam (with weight_decay > 0 the decay is decoupled, as AdamW); adamw: AdamW (the "
                  "same as adam for any weight_decay, named as in PyTorch); sgd: SGD with Nesterov momentum 0.9")
_OPTIMIZERS: dict[str, Callable[[list, float, float], torch.optim.Optimizer]] = {
    "adam": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd) if wd
    else torch.optim.Adam(params, lr=lr),
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd),
}
assert tuple(_OPTIMIZERS) == get_args(Optimizer)


def _make_optimizer(optimizer: Optimizer | Callable, params: list, lr: float, weight_decay: float):
    if callable(optimizer):
        return optimizer(params)
    if optimizer not in _OPTIMIZERS:
        raise PassError(f"unknown optimizer {optimizer!r}; use {', '.join(map(repr, _OPTIMIZERS))} or a "
                        "callable(params) -> Optimizer")
    return _OPTIMIZERS[optimizer](params, lr, weight_decay)


def _split_out(out: Any, n_feats: int, role: str) -> tuple[torch.Tensor, tuple]:
    """(logits, feature maps) of the teacher's or student's output; PassError unless the model's own output is
    one tensor (the losses compare one logits tensor per model)."""
    logits, feats = (out[0], tuple(out[1:])) if n_feats else (out, ())
    if not isinstance(logits, torch.Tensor):
        what = f"a {type(logits).__name__} of {len(logits)}" if isinstance(logits, tuple | list) else \
            type(logits).__name__
        raise PassError(f"the {role} returns {what}, but distillation compares one logits tensor [batch, classes] "
                        f"per model; make the {role}'s forward return only its logits (e.g. a wrapper module whose "
                        "forward returns the classification output)")
    return logits, feats


def distill(teacher: nn.Module | Graph | None, student: nn.Module | Graph, train_data: Any, *,
            loss: str | DistillLoss = "kd", loss_options: dict[str, Any] | None = None,
            features: FeaturePairs = (), epochs: int = 5, optimizer: Optimizer | Callable = "adam",
            lr: float = 1e-3, weight_decay: float = 0.0, batch_size: int = 64,
            schedule: str = "onecycle", grad_clip: float | None = None,
            eval_fn: Callable[[nn.Module], float] | None = None, keep_best: bool = True,
            include_start: bool = False, example_inputs: tuple | None = None, seed: int = 0,
            augment: str = "none", quiet: bool = False, desc: str = "distill",
            logger: logging.Logger | None = None) -> DistillResult:
    """Train `student` against `teacher` with a distillation loss; returns a DistillResult.

    loss: a name for make_loss (ce, kd, ctkd, logit-std, at, at+kd, at+ctkd, at+logit-std) or a DistillLoss.
    features: (student_feature, teacher_feature) name pairs for attention transfer (node names or module
    paths); none given with an attention-transfer loss: paired automatically by spatial size (the last
    feature map of each resolution the two share, where both compute or both only pool, see
    features.auto_pairs), and result.features says which.
    eval_fn(module) -> accuracy (on validation data, never test) picks the best epoch (else the lowest mean
    training loss) and the best weights are restored when keep_best. augment: 'none', 'mixup[:A]' or 'shift[:N]'
    (augment.py): teacher and student see the same augmented batch. Deterministic for a seed; DDP-aware
    (see module docstring).
    """
    logger = logger or log
    crit = _criterion(loss, loss_options, teacher)
    if epochs < 1:
        raise PassError(f"epochs must be >= 1, got {epochs}")
    try:
        data = TrainData(train_data, batch_size, seed, augment)
    except PassError as e:
        raise PassError(f"{desc}: {e}") from e
    rank, world = dist_info()
    example = tuple(example_inputs) if example_inputs else data.first_inputs()
    mods = _modules(teacher, student, crit, features, example)
    crit.set_progress(0, epochs)
    opt, sched, params, loss_params = _optimizer(mods.runner, crit, optimizer, lr, weight_decay, schedule,
                                                 epochs * len(data))
    step = _Step(mods, crit, opt, sched, params, loss_params, grad_clip, rank, world)
    best = _Best(keep_best, eval_fn is not None)
    show = not quiet and rank == 0 and sys.stderr.isatty()
    bar = tqdm(total=epochs * len(data), disable=not show, desc=desc, leave=False)
    if include_start and eval_fn is not None and keep_best:
        acc = _evaluate(eval_fn, mods.eval_module, rank, world)
        best.offer(acc, -1, mods.runner)
        step.history.append({"epoch": 0, "accuracy": acc})
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + rank)
            for epoch in range(epochs):
                row = step.epoch(data, epoch, epochs, bar, desc)
                metric = -row["loss"]
                if eval_fn is not None:
                    metric = row["accuracy"] = _evaluate(eval_fn, mods.eval_module, rank, world)
                logger.info("%s epoch %d/%d: %s", desc, epoch + 1, epochs,
                            ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
                best.offer(metric, epoch, mods.runner)
    finally:
        bar.close()
        mods.runner.eval()
        if mods.teacher is not None:
            mods.teacher.train(mods.teacher_was_training)
    if best.restore(mods.runner, epochs):
        logger.info("%s: restored the best epoch %d (%s=%.4g)", desc, best.epoch + 1, best.name,
                    best.reported())
    return DistillResult(student, _finish(student, mods), step.history, best.epoch + 1, best.reported(),
                         best.name, list(mods.feats))


def _criterion(loss: str | DistillLoss, loss_options: dict[str, Any] | None, teacher: Any) -> DistillLoss:
    crit = make_loss(loss, **(loss_options or {})) if isinstance(loss, str) else loss
    if not isinstance(crit, DistillLoss):
        raise PassError(f"loss must be a name or a DistillLoss, got {type(crit).__name__}")
    if crit.uses_teacher and teacher is None:
        raise PassError("this distillation loss needs a teacher; pass the original model, or use loss='ce'")
    return crit


@dataclass
class _Modules:
    """What the loop runs: `runner` is trained (the student, or a lowered graph copy with feature outputs),
    `teacher` gives the targets (None for teacher-free losses), `feats` the attention-transfer pairs used."""

    runner: nn.Module
    teacher: nn.Module | None
    feats: list[tuple[str, str]]
    via_graph: bool
    teacher_was_training: bool = False

    @property
    def eval_module(self) -> nn.Module:
        return LogitsOnly(self.runner) if self.feats else self.runner


def _modules(teacher: nn.Module | Graph | None, student: nn.Module | Graph, crit: DistillLoss,
             features: FeaturePairs, example: tuple) -> _Modules:
    feats: list[tuple[str, str]] = []
    t_graph = None
    if features and not crit.uses_features:
        raise PassError(f"features names attention-transfer pairs, but the loss {type(crit).__name__} has no attention "
                        "transfer, so they would be ignored: drop features, or use loss='at+kd' (or at, at+ctkd, "
                        "at+logit-std)")
    if crit.uses_features:
        if teacher is None:
            raise PassError("attention transfer reads the teacher's feature maps; give a teacher")
        s_graph, t_graph = as_graph(student, example), as_graph(teacher, example)
        feats = [tuple(p) for p in features] if features else auto_pairs(s_graph, t_graph)  # type: ignore[misc]
        check_pairs(s_graph, t_graph, feats)
    via_graph = isinstance(student, Graph) or bool(feats)
    if via_graph:
        s_graph = as_graph(student, example)
        runner = ir.lower(with_features(s_graph, [s for s, _ in feats], role="student"))
    else:
        runner = student  # type: ignore[assignment]
    t_module: nn.Module | None = None
    if crit.uses_teacher:
        if feats:
            t_module = ir.lower(with_features(t_graph, [t for _, t in feats], role="teacher"))  # type: ignore[arg-type]
        else:
            t_module = ir.lower(teacher) if isinstance(teacher, Graph) else teacher
    mods = _Modules(runner, t_module, feats, via_graph)
    if t_module is not None:
        mods.teacher_was_training = t_module.training
        t_module.eval()
    return mods


def _optimizer(runner: nn.Module, crit: DistillLoss, optimizer: Optimizer | Callable, lr: float,
               weight_decay: float, schedule: str, total: int):
    """(optimizer, scheduler or None, every trained param, the loss's own params)."""
    loss_params = [p for p in crit.parameters() if p.requires_grad]
    params = [p for p in runner.parameters() if p.requires_grad] + loss_params
    opt = _make_optimizer(optimizer, params, lr, weight_decay)
    if schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                    total_steps=total + 1, pct_start=0.1)
    elif schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    elif schedule == "constant":
        sched = None
    else:
        raise PassError(f"unknown schedule {schedule!r}; use 'onecycle', 'cosine' or 'constant'")
    return opt, sched, params, loss_params


class _Step:
    """One epoch of optimizer steps over the (sharded) global batches; keeps the history rows."""

    def __init__(self, mods: _Modules, crit: DistillLoss, opt, sched, params: list, loss_params: list,
                 grad_clip: float | None, rank: int, world: int) -> None:
        self.mods, self.crit, self.opt, self.sched = mods, crit, opt, sched
        self.params, self.loss_params, self.grad_clip, self.rank, self.world = (params, loss_params, grad_clip,
                                                                                rank, world)
        self.device = next((p.device for p in mods.runner.parameters()), torch.device("cpu"))
        self.model: nn.Module = mods.runner
        if world > 1:
            ddp_kw = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            self.model = nn.parallel.DistributedDataParallel(mods.runner, **ddp_kw)
        self.history: list[dict[str, float]] = []

    def epoch(self, data: TrainData, epoch: int, epochs: int, bar, desc: str) -> dict[str, float]:
        self.crit.set_progress(epoch, epochs)
        self.model.train()
        t0, loss_sum, n_steps = time.perf_counter(), 0.0, 0
        for batch in data.epoch(epoch):
            if len(batch[0][0]) < self.world:
                continue  # every rank needs a sample; all ranks skip the same tiny batch
            value = self.step(_shard(batch, self.rank, self.world), len(batch[0][0]))
            loss_sum += value
            n_steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        if n_steps == 0:
            raise PassError(f"{desc}: the train data gave no batches; training needs at least one batch "
                            f"of >= {self.world} samples")
        mean_loss = loss_sum / n_steps
        if self.world > 1:
            _average_buffers(self.mods.runner, self.world)
            t = torch.tensor([mean_loss], dtype=torch.float64)
            dist.all_reduce(t)
            mean_loss = float(t) / self.world
        row: dict[str, float] = {"epoch": epoch + 1, "loss": mean_loss, "lr": self.opt.param_groups[0]["lr"],
                                 "seconds": time.perf_counter() - t0}
        row.update(self.crit.metrics())
        self.history.append(row)
        return row

    def step(self, batch: Batch, n_global: int) -> float:
        """One optimizer step on this rank's shard of a global batch of `n_global` samples; the shard's loss."""
        inputs = tuple(t.to(self.device) for t in batch[0])
        target = batch[1].to(self.device) if batch[1] is not None else None
        n_feats = len(self.mods.feats)
        t_logits, t_feats = None, ()
        if self.mods.teacher is not None:
            with torch.no_grad():
                t_logits, t_feats = _split_out(self.mods.teacher(*inputs), n_feats, "teacher")
        s_logits, s_feats = _split_out(self.model(*inputs), n_feats, "student")
        value = self.crit(s_logits, t_logits, soft_target(target, s_logits), s_feats, t_feats)
        self.opt.zero_grad(set_to_none=True)
        # DDP averages the ranks' gradients; weighting each shard's mean loss by its share of the global batch
        # makes that average the gradient of the global batch's mean loss, as in one process, also when the
        # last batch does not split evenly
        (value * (len(inputs[0]) * self.world / n_global) if self.world > 1 else value).backward()
        if self.world > 1:
            for p in self.loss_params:  # DDP syncs the student; the loss's own params we sync here
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        return float(value.detach())


class _Best:
    """The best epoch so far by a metric where higher is better (accuracy, or minus the training loss)."""

    def __init__(self, keep: bool, accuracy: bool) -> None:
        self.keep, self.accuracy = keep, accuracy
        self.name = "accuracy" if accuracy else "loss"
        self.epoch, self.metric = -1, None
        self.state: dict[str, torch.Tensor] | None = None

    def offer(self, metric: float, epoch: int, runner: nn.Module) -> None:
        if self.keep and (self.metric is None or metric > self.metric):
            self.metric, self.epoch = metric, epoch
            self.state = {k: v.detach().clone() for k, v in runner.state_dict().items()}

    def restore(self, runner: nn.Module, epochs: int) -> bool:
        """Load the best weights unless the last epoch was the best; True when it loaded them."""
        if self.keep and self.state is not None and self.epoch != epochs - 1:
            runner.load_state_dict(self.state)
            return True
        return False

    def reported(self) -> float | None:
        if self.metric is None:
            return None
        return self.metric if self.accuracy else -self.metric


def _finish(student: nn.Module | Graph, mods: _Modules) -> nn.Module:
    """The trained student as a module; a graph copy's weights written back to the object given."""
    if not mods.via_graph:
        return mods.runner
    trained = dict(mods.runner.state_dict())
    module: nn.Module
    if isinstance(student, Graph):
        _write_back_graph(student, trained)
        module = ir.lower(student)
    else:
        _write_back_module(student, trained)
        module = student
    return module.eval()


def _average_buffers(module: nn.Module, world: int) -> None:
    """Average float buffers (BN running stats) over ranks: each rank's last forward saw only its shard."""
    with torch.no_grad():
        for b in module.buffers():
            if b.is_floating_point():
                dist.all_reduce(b)
                b /= world


def _evaluate(eval_fn: Callable[[nn.Module], float], module: nn.Module, rank: int, world: int) -> float:
    """eval_fn on rank 0, broadcast so every rank picks the same best epoch."""
    was = module.training
    module.eval()
    try:
        got = eval_fn(module) if rank == 0 else 0.0
        if got is None:  # e.g. slimfx.data.accuracy on validation batches without labels
            raise PassError("the evaluation that picks the best epoch (eval_fn) gave no accuracy (None): the "
                            "validation data needs labels (inputs, labels) to choose an epoch by; give labelled "
                            "validation data, or no eval_fn (then the epoch with the lowest training loss is kept)")
        value = float(got)
    finally:
        module.train(was)
    if world > 1:
        t = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(t, 0)
        value = float(t)
    return value


def _write_back_graph(graph: Graph, trained: dict[str, torch.Tensor]) -> None:
    for name, value in trained.items():
        if name in graph.params:
            graph.params[name].copy_(value)


def _write_back_module(module: nn.Module, trained: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    missing = [k for k, _ in module.named_parameters() if k not in trained]
    if missing:
        raise PassError(f"could not map trained graph weights back onto the student module: parameters "
                        f"{missing[:5]} were not captured (shared or unused weights?). Pass the student as an "
                        "ir.Graph instead")
    with torch.no_grad():
        for k, v in trained.items():
            if k in state:
                state[k].copy_(v)
