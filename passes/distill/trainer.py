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
from slimfx.passes.distill.features import LogitsOnly, as_graph, check_pairs, with_features
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


# --- data --------------------------------------------------------------------------------------------

class TrainData:
    """Re-iterable global batches from (x, y) tensors, a dataset with train_x/train_y, or batches.

    Tensor data is shuffled each epoch by a seeded generator; a batch list is replayed in order.
    """

    def __init__(self, data: Any, batch_size: int = 64, seed: int = 0) -> None:
        self.batch_size, self.seed = batch_size, seed
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
        inputs, _ = next(iter(self.epoch(0)))
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


def _split_out(out: Any, n_feats: int) -> tuple[torch.Tensor, tuple]:
    if n_feats:
        return out[0], tuple(out[1:])
    return out, ()


def distill(teacher: nn.Module | Graph | None, student: nn.Module | Graph, train_data: Any, *,
            loss: str | DistillLoss = "kd", loss_options: dict[str, Any] | None = None,
            features: FeaturePairs = (), epochs: int = 5, optimizer: Optimizer | Callable = "adam",
            lr: float = 1e-3, weight_decay: float = 0.0, batch_size: int = 64,
            schedule: str = "onecycle", grad_clip: float | None = None,
            eval_fn: Callable[[nn.Module], float] | None = None, keep_best: bool = True,
            include_start: bool = False, example_inputs: tuple | None = None, seed: int = 0,
            quiet: bool = False, desc: str = "distill", logger: logging.Logger | None = None) -> DistillResult:
    """Train `student` against `teacher` with a distillation loss; returns a DistillResult.

    loss: a name for make_loss (ce, kd, ctkd, logit-std, at, at+kd, at+ctkd, at+logit-std) or a DistillLoss.
    features: (student_feature, teacher_feature) name pairs for attention transfer (node names or module
    paths). eval_fn(module) -> accuracy picks the best epoch (else the lowest mean training loss) and the
    best weights are restored when keep_best. Deterministic for a seed; DDP-aware (see module docstring).
    """
    logger = logger or log
    crit = make_loss(loss, **(loss_options or {})) if isinstance(loss, str) else loss
    if not isinstance(crit, DistillLoss):
        raise PassError(f"loss must be a name or a DistillLoss, got {type(crit).__name__}")
    if crit.uses_features and not features:
        raise PassError("this loss uses attention transfer: give features=[(student_feature, teacher_feature), ...]"
                        " naming nodes or module paths of the student and the teacher")
    if crit.uses_teacher and teacher is None:
        raise PassError("this distillation loss needs a teacher; pass the original model, or use loss='ce'")
    if epochs < 1:
        raise PassError(f"epochs must be >= 1, got {epochs}")
    try:
        data = TrainData(train_data, batch_size, seed)
    except PassError as e:
        raise PassError(f"{desc}: {e}") from e
    rank, world = dist_info()
    feats = list(features) if crit.uses_features else []
    example = tuple(example_inputs) if example_inputs else data.first_inputs()

    # The module we train: the student itself, or a lowered graph copy with feature outputs.
    via_graph = isinstance(student, Graph) or bool(feats)
    if via_graph:
        s_graph = as_graph(student, example)
        t_graph = as_graph(teacher, example) if feats else None
        if feats:
            check_pairs(s_graph, t_graph, feats)  # type: ignore[arg-type]
        runner = ir.lower(with_features(s_graph, [s for s, _ in feats], role="student"))
    else:
        s_graph = None
        runner = student  # type: ignore[assignment]
    t_module: nn.Module | None = None
    if crit.uses_teacher:
        if feats:
            t_module = ir.lower(with_features(t_graph, [t for _, t in feats], role="teacher"))  # type: ignore[arg-type]
        else:
            t_module = ir.lower(teacher) if isinstance(teacher, Graph) else teacher
    if isinstance(crit, nn.Module):
        crit.set_progress(0, epochs)
    device = next((p.device for p in runner.parameters()), torch.device("cpu"))
    teacher_was_training = t_module.training if t_module is not None else False
    if t_module is not None:
        t_module.eval()

    model: nn.Module = runner
    if world > 1:
        ddp_kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
        model = nn.parallel.DistributedDataParallel(runner, **ddp_kw)
    loss_params = [p for p in crit.parameters() if p.requires_grad]
    params = [p for p in runner.parameters() if p.requires_grad] + loss_params
    opt = _make_optimizer(optimizer, params, lr, weight_decay)
    steps_per_epoch = max(len(data), 1)
    total = epochs * steps_per_epoch
    if schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                    total_steps=total + 1, pct_start=0.1)
    elif schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    elif schedule == "constant":
        sched = None
    else:
        raise PassError(f"unknown schedule {schedule!r}; use 'onecycle', 'cosine' or 'constant'")

    eval_module = LogitsOnly(runner) if feats else runner
    history: list[dict[str, float]] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch, best_metric = -1, None
    metric_name = "accuracy" if eval_fn is not None else "loss"
    show = not quiet and rank == 0 and sys.stderr.isatty()
    bar = tqdm(total=total if len(data) else None, disable=not show, desc=desc, leave=False)
    if include_start and eval_fn is not None and keep_best:
        best_metric, best_epoch = _evaluate(eval_fn, eval_module, rank, world), -1
        best_state = {k: v.detach().clone() for k, v in runner.state_dict().items()}
        history.append({"epoch": 0, "accuracy": best_metric})
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + rank)
            for epoch in range(epochs):
                crit.set_progress(epoch, epochs)
                model.train()
                t0, loss_sum, n_steps = time.perf_counter(), 0.0, 0
                for batch in data.epoch(epoch):
                    if len(batch[0][0]) < world:
                        continue  # every rank needs a sample; all ranks skip the same tiny batch
                    inputs, target = _shard(batch, rank, world)
                    inputs = tuple(t.to(device) for t in inputs)
                    target = target.to(device) if target is not None else None
                    t_logits, t_feats = None, ()
                    if t_module is not None:
                        with torch.no_grad():
                            t_logits, t_feats = _split_out(t_module(*inputs), len(feats))
                    s_logits, s_feats = _split_out(model(*inputs), len(feats))
                    value = crit(s_logits, t_logits, target, s_feats, t_feats)
                    opt.zero_grad(set_to_none=True)
                    value.backward()
                    if world > 1:
                        for p in loss_params:  # DDP syncs the student; the loss's own params we sync here
                            if p.grad is not None:
                                dist.all_reduce(p.grad)
                                p.grad /= world
                    if grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, grad_clip)
                    opt.step()
                    if sched is not None:
                        sched.step()
                    loss_sum += float(value.detach())
                    n_steps += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(value.detach()):.4f}", refresh=False)
                if n_steps == 0:
                    raise PassError(f"{desc}: the train data gave no batches; training needs at least one batch "
                                    f"of >= {world} samples")
                mean_loss = loss_sum / n_steps
                if world > 1:
                    _average_buffers(runner, world)
                    t = torch.tensor([mean_loss], dtype=torch.float64)
                    dist.all_reduce(t)
                    mean_loss = float(t) / world
                row: dict[str, float] = {"epoch": epoch + 1, "loss": mean_loss,
                                         "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
                row.update(crit.metrics())
                metric = -mean_loss
                if eval_fn is not None:
                    acc = _evaluate(eval_fn, eval_module, rank, world)
                    row["accuracy"] = acc
                    metric = acc
                history.append(row)
                logger.info("%s epoch %d/%d: %s", desc, epoch + 1, epochs,
                            ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
                if keep_best and (best_metric is None or metric > best_metric):
                    best_metric, best_epoch = metric, epoch
                    best_state = {k: v.detach().clone() for k, v in runner.state_dict().items()}
    finally:
        bar.close()
        runner.eval()
        if t_module is not None:
            t_module.train(teacher_was_training)
    if keep_best and best_state is not None and best_epoch != epochs - 1:
        runner.load_state_dict(best_state)
        logger.info("%s: restored the best epoch %d (%s=%.4g)", desc, best_epoch + 1, metric_name,
                    best_metric if eval_fn else -best_metric)  # type: ignore[operator]
    if best_metric is not None and eval_fn is None:
        best_metric = -best_metric

    module: nn.Module
    if via_graph:
        trained = dict(runner.state_dict())
        if isinstance(student, Graph):
            _write_back_graph(student, trained)
            module = ir.lower(student)
        else:
            _write_back_module(student, trained)
            module = student
        module.eval()
    else:
        module = runner
    return DistillResult(student, module, history, best_epoch + 1, best_metric, metric_name)


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
        value = float(eval_fn(module)) if rank == 0 else 0.0
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
