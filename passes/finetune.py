"""`finetune`: recover accuracy after pruning by training the graph's params for a few epochs.

There is one training loop in passes: `passes.distill.trainer.distill`. Fine-tuning is that loop with
a plain cross-entropy loss and no teacher; `train_graph` is the graph-shaped entry point to it, used
here and by quantization-aware training. The graph's params are updated in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from slimfx.ir import Graph
from slimfx.ir.errors import PassError
from slimfx.passes.base import Pass, PassContext, PassResult, option, register_pass
from slimfx.passes.distill.trainer import OPTIMIZER_HELP, Optimizer, TrainData, distill

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]


def data_problem(data: Any, what: str = "train data") -> str | None:
    """Why `data` gives nothing to learn from: 'there is no <what>' (None) or 'the <what> is empty' (no batches,
    or tensors with no samples); None when it holds some. A one-shot iterator is not consumed to find out:
    the trainer reports it empty when it reads it."""
    if data is None:
        return f"there is no {what}"
    try:
        if hasattr(data, "train_x") and hasattr(data, "train_y"):
            n = len(data.train_x)
        elif isinstance(data, torch.Tensor) or (isinstance(data, (tuple, list)) and len(data) == 2
                                                 and isinstance(data[0], torch.Tensor)):
            first = data if isinstance(data, torch.Tensor) else data[0]
            n = len(first) if first.dim() else 1
        elif hasattr(data, "__len__") and not isinstance(data, Iterator):
            n = len(data)
        else:
            return None
    except TypeError:  # a __len__ that does not answer
        return None
    return f"the {what} is empty" if n == 0 else None


def check_train_data(ctx: PassContext, *, step: str, required: bool, required_option: str = "required",
                     off: str) -> str | None:
    """The one rule for every step that trains (finetune, distill, quantize's QAT), as check_context asks
    it before any work: what is wrong with ctx.train_data for `step`, or None. No train data is fine
    unless the step is `required` (it is skipped); train data that is empty is always wrong (an empty list
    is not data). `off` is the option that turns the step off, e.g. 'set epochs = 0'."""
    problem = data_problem(ctx.train_data)
    if problem is None or (ctx.train_data is None and not required):
        return None
    if ctx.train_data is None:
        return (f"{step} needs train data and none was given: give train data ((inputs, target) batches), or "
                f"set {required_option} = false to skip it when there is none")
    return (f"{step} trains on the train data, but it is empty (no batches or no samples): give at least one "
            f"(inputs, target) batch, or {off}")


def train_or_skip(ctx: PassContext, *, step: str, required: bool, required_option: str = "required",
                  off: str) -> str | None:
    """At run time, by the rule of `check_train_data`: None to train; 'no train data' (the reason to record
    in stats) when the step is skipped; a PassError when it cannot run."""
    problem = check_train_data(ctx, step=step, required=required, required_option=required_option, off=off)
    if problem:
        raise PassError(problem)
    if ctx.train_data is None:
        ctx.logger.info("%s: no train data in the context; skipped", step)
        return "no train data"
    return None


def iter_batches(data: Any, batch_size: int = 64, *, shuffle: bool = True, seed: int = 0) -> Iterator[Batch]:
    """Training data as `(inputs_tuple, target)` batches: an (x, y) tensor pair is split into batches
    of `batch_size` (shuffled, seeded), an iterable of `(inputs, target)` batches is normalized."""
    td = TrainData(data, batch_size, seed)
    if not shuffle and td.x is not None:
        x, y = td.x, td.y
        for i in range(0, len(x[0]), batch_size):
            yield tuple(t[i:i + batch_size] for t in x), y[i:i + batch_size]  # type: ignore[index]
        return
    for inputs, target in td.epoch(0):
        if target is None:
            raise PassError("train data must be an (x, y) tensor pair or an iterable of (inputs, target) batches; "
                            "got batches without targets")
        yield inputs, target


def train_graph(graph: Graph, data: Any, *, epochs: int = 3, lr: float = 1e-3, batch_size: int = 64,
                optimizer: Optimizer = "adam", weight_decay: float = 0.0,
                eval_fn: Callable[[torch.nn.Module], float] | None = None, seed: int = 0, quiet: bool = False,
                desc: str = "finetune") -> dict[str, Any]:
    """Train `graph.params` in place on `data` with cross-entropy (cosine learning-rate decay).

    With `eval_fn(module) -> accuracy` the best epoch, the starting point (epoch 0) included, is kept;
    without it, the last. Returns per-epoch losses and eval scores, best_epoch and best_eval.
    """
    if not any(t.is_floating_point() and k not in graph.buffers for k, t in graph.params.items()):
        raise PassError(f"{desc}: the graph has no trainable float params")
    res = distill(None, graph, data, loss="ce", epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
                  weight_decay=weight_decay, schedule="cosine", eval_fn=eval_fn, keep_best=eval_fn is not None,
                  include_start=True, seed=seed, quiet=quiet, desc=desc)
    trained = [r for r in res.history if r["epoch"] > 0]
    return {"loss": [r["loss"] for r in trained],
            "eval": [r["accuracy"] for r in res.history if "accuracy" in r],
            "best_epoch": res.best_epoch if eval_fn is not None else epochs,
            "best_eval": res.best_metric if eval_fn is not None else None}


@register_pass("finetune")
@dataclass
class Finetune(Pass):
    """Train the graph's params on the context's train data for a few epochs (recovery after pruning)."""

    preserves_outputs = False

    epochs: int = option(3, ge=0, help="passes over the train data; 0 turns the step off (typical: 1-10)")
    lr: float = option(1e-3, gt=0, help="learning rate at the start, decayed to 0 by a cosine schedule "
                                        "(typical: 1e-4 to 1e-2 for adam, 1e-2 to 1e-1 for sgd)")
    batch_size: int = option(64, ge=1, help="samples per step when the train data is an (x, y) tensor pair "
                                            "(batches given as a list are used as they are)")
    optimizer: Optimizer = option("adam", help=OPTIMIZER_HELP)
    weight_decay: float = option(0.0, ge=0, help="weight decay (decoupled, as AdamW); 0 turns it off "
                                                 "(typical: 1e-4 to 1e-2)")
    required: bool = option(False, help=(
        "false: without train data the step is skipped and the report says so, so one recipe serves models "
        "with and without data; true: no train data is an error"))

    def check_context(self, ctx: PassContext) -> str | None:
        if self.epochs == 0:
            return None
        return check_train_data(ctx, step="pass 'finetune'", required=self.required, off="set epochs = 0")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if self.epochs == 0:
            return PassResult(changed=False, stats={"skipped": True, "reason": "epochs=0"})
        reason = train_or_skip(ctx, step="pass 'finetune'", required=self.required, off="set epochs = 0")
        if reason is not None:
            return PassResult(changed=False, stats={"skipped": True, "reason": reason})
        hist = train_graph(graph, ctx.train_data, epochs=self.epochs, lr=self.lr,
                           batch_size=self.batch_size, optimizer=self.optimizer, weight_decay=self.weight_decay,
                           eval_fn=ctx.eval_fn, seed=ctx.seed, quiet=ctx.quiet)
        stats = {"skipped": False, "epochs": self.epochs, "loss": [round(x, 5) for x in hist["loss"]]}
        if ctx.eval_fn is not None:
            stats.update(eval=hist["eval"], best_epoch=hist["best_epoch"], best_eval=hist["best_eval"])
        return PassResult(changed=hist["best_epoch"] != 0, stats=stats)


__all__ = ["Finetune", "train_graph", "iter_batches", "data_problem", "check_train_data", "train_or_skip"]

