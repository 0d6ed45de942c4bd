"""`finetune`: recover accuracy after pruning by training the graph's params for a few epochs.

The training loop is `train_graph(graph, data, loss_fn, epochs, lr, ...)`, reusable by other
recovery passes (distillation passes a KD loss). It trains the lowered module, whose float params
share storage with `graph.params` (ir.lower), so the graph is updated in place; params are also
written back explicitly at the end (and the best epoch's, when an eval function picks one).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ir import Graph, lower
from ir.errors import PassError
from passes.base import Pass, PassContext, PassResult, register_pass

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]


def iter_batches(data: Any, batch_size: int = 64, *, shuffle: bool = True, seed: int = 0) -> Iterator[Batch]:
    """Normalize training data to `(inputs_tuple, target)` batches.

    Accepts an (x, y) tensor pair (split into shuffled batches of `batch_size`) or an iterable
    of `(inputs, target)` batches where inputs is a tensor or a tuple of tensors.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data) \
            and data[0].shape[:1] == data[1].shape[:1] and data[0].dim() >= 1 and data[1].dim() >= 1:
        x, y = data
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if shuffle \
            else torch.arange(len(x))
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            yield (x[idx],), y[idx]
        return
    for item in data:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise PassError("train data must be an (x, y) tensor pair or an iterable of (inputs, target) batches; "
                            f"got a batch of type {type(item).__name__}")
        inputs, target = item
        yield (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), target


def _num_batches(data: Any, batch_size: int) -> int | None:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return math.ceil(len(data[0]) / batch_size)
    try:
        return len(data)
    except TypeError:
        return None


def cross_entropy(output: Any, target: torch.Tensor, inputs: tuple | None = None) -> torch.Tensor:
    """Default loss: cross-entropy of the (first) output against integer class targets."""
    out = output[0] if isinstance(output, (tuple, list)) else output
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


def _optimizer(name: str, params: list[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise PassError(f"unknown optimizer {name!r}; use sgd, adam or adamw")


def train_graph(graph: Graph, data: Any, loss_fn: Callable[..., torch.Tensor] = cross_entropy, *,
                epochs: int = 3, lr: float = 1e-3, batch_size: int = 64, optimizer: str = "adam",
                weight_decay: float = 0.0, eval_fn: Callable[[torch.nn.Module], float] | None = None,
                seed: int = 0, quiet: bool = False, desc: str = "finetune") -> dict[str, Any]:
    """Train `graph.params` in place on `data` (see `iter_batches`) with `loss_fn(output, target, inputs)`.

    Cosine learning-rate decay over all steps. With `eval_fn(module) -> accuracy`, the best epoch
    (including the starting point, epoch 0) is kept. Returns losses per epoch and eval scores.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gm = lower(graph)
    named = dict(gm.named_parameters())
    params = [p for p in named.values() if p.requires_grad]
    if not params:
        raise PassError("finetune: the graph has no trainable float params")
    opt = _optimizer(optimizer, params, lr, weight_decay)
    per_epoch = _num_batches(data, batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * per_epoch)) if per_epoch else None
    history: dict[str, Any] = {"loss": [], "eval": []}
    best_score, best_state, best_epoch = None, None, epochs
    if eval_fn is not None:
        gm.eval()
        best_score = float(eval_fn(gm))
        best_state = {k: v.detach().clone() for k, v in _state(gm).items()}
        best_epoch = 0
        history["eval"].append(best_score)
    show = not quiet and sys.stderr.isatty()
    bar = tqdm(total=(per_epoch or 0) * epochs or None, desc=desc, disable=not show, leave=False)
    for epoch in range(1, epochs + 1):
        gm.train()
        total, count = 0.0, 0
        for inputs, target in iter_batches(data, batch_size, shuffle=True, seed=seed + epoch):
            opt.zero_grad()
            loss = loss_fn(gm(*inputs), target, inputs)
            if not torch.isfinite(loss):
                raise PassError(f"finetune: loss became {loss.item()} at epoch {epoch}; lower the learning rate "
                                f"(lr={lr})")
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += float(loss) * len(target)
            count += len(target)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{float(loss):.4f}")
        history["loss"].append(total / max(1, count))
        gm.eval()
        if eval_fn is not None:
            score = float(eval_fn(gm))
            history["eval"].append(score)
            if score > best_score:
                best_score, best_epoch = score, epoch
                best_state = {k: v.detach().clone() for k, v in _state(gm).items()}
    bar.close()
    gm.eval()
    final = best_state if best_state is not None else {k: v.detach() for k, v in _state(gm).items()}
    with torch.no_grad():  # write back explicitly (storage is shared, but a rebinding optimizer would break it)
        for k, v in final.items():
            if k in graph.params:
                if graph.params[k].shape == v.shape:
                    graph.params[k].copy_(v)
                else:
                    graph.params[k] = v.clone()
    history["best_epoch"] = best_epoch
    history["best_eval"] = best_score
    return history


def _state(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(gm.state_dict())


@register_pass("finetune")
@dataclass
class Finetune(Pass):
    """Train the graph's params on the context's train data for a few epochs (recovery after pruning).

    required: when false (default) and the context has no train data, the pass logs and skips
    (stats say `skipped`), so one recipe serves models with and without data; when true it fails.
    """

    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = 0.0
    required: bool = False

    def validate(self) -> None:
        if self.epochs < 0:
            raise PassError(f"pass 'finetune': epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise PassError(f"pass 'finetune': lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise PassError(f"pass 'finetune': batch_size must be >= 1, got {self.batch_size}")

    def check_context(self, ctx: PassContext) -> str | None:
        if self.required and ctx.train_data is None:
            return "finetune (required=true) needs train data (an (x, y) pair or (inputs, target) batches)"
        return None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        self.validate()
        if ctx.train_data is None:
            if self.required:
                raise PassError("pass 'finetune' needs training data and the context has none: give train_data "
                                "(an (x, y) tensor pair or (inputs, target) batches), or set required=false to "
                                "skip fine-tuning when there is no data")
            ctx.logger.info("finetune: no train data in the context; skipped")
            return PassResult(changed=False, stats={"skipped": True, "reason": "no train data"})
        if self.epochs == 0:
            return PassResult(changed=False, stats={"skipped": True, "reason": "epochs=0"})
        hist = train_graph(graph, ctx.train_data, cross_entropy, epochs=self.epochs, lr=self.lr,
                           batch_size=self.batch_size, optimizer=self.optimizer, weight_decay=self.weight_decay,
                           eval_fn=ctx.eval_fn, seed=ctx.seed, quiet=ctx.quiet)
        stats = {"skipped": False, "epochs": self.epochs, "loss": [round(x, 5) for x in hist["loss"]]}
        if ctx.eval_fn is not None:
            stats.update(eval=hist["eval"], best_epoch=hist["best_epoch"], best_eval=hist["best_eval"])
        return PassResult(changed=hist["best_epoch"] != 0, stats=stats)


__all__ = ["Finetune", "train_graph", "iter_batches", "cross_entropy"]

