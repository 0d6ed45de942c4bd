"""The `distill` pass (alias `kd-finetune`): recover a compressed graph's accuracy by KD from the original.

Used after pruning: the current graph is the student, `ctx.teacher` (the original model, nn.Module or
ir.Graph) the teacher, `ctx.train_data` the data. Trains the graph's params in place; the structure does
not change, so every later pass and exporter sees an ordinary graph.
"""

from __future__ import annotations

import time
from dataclasses import field

from slimfx.ir import Graph
from slimfx.ir.errors import PassError
from slimfx.passes.base import Pass, PassContext, PassResult, register_pass
from slimfx.passes.distill.losses import LOSS_NAMES
from slimfx.passes.distill.trainer import distill
from slimfx.passes.finetune import check_train_data, train_or_skip


@register_pass("distill")
class KDRecovery(Pass):
    """Fine-tune the graph as a student of ctx.teacher on ctx.train_data with a distillation loss."""

    preserves_outputs = False

    loss: str = "kd"
    T: float = 4.0
    alpha: float = 0.9
    beta: float = 1000.0
    features: list[str] = field(default_factory=list)  # "student_feature:teacher_feature" pairs for AT
    epochs: int = 3
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    batch_size: int = 64
    required: bool = False  # raise instead of skipping when there is no teacher or no training data

    def validate(self) -> None:
        if self.loss not in LOSS_NAMES:
            raise PassError(f"pass '{self.name}': option 'loss' must be one of {', '.join(LOSS_NAMES)}, "
                            f"got {self.loss!r}")
        if self.epochs < 1:
            raise PassError(f"pass '{self.name}': option 'epochs' must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise PassError(f"pass '{self.name}': option 'lr' must be > 0, got {self.lr}")
        for f in self.features:
            if ":" not in f:
                raise PassError(f"pass '{self.name}': feature {f!r} must be 'student_feature:teacher_feature' "
                                "(node names or module paths)")
        if self.loss.startswith("at") and not self.features:
            raise PassError(f"pass '{self.name}': loss {self.loss!r} needs features=['student:teacher', ...]")

    def loss_options(self) -> dict:
        base = self.loss.split("+")[-1]
        opts: dict = {}
        if base in ("kd", "ctkd", "logit-std"):
            opts.update(T=self.T, alpha=self.alpha)
        if self.loss.startswith("at"):
            opts["beta"] = self.beta
        return opts

    def check_context(self, ctx: PassContext) -> str | None:
        if self.loss != "ce" and ctx.teacher is None and self.required:
            return (f"{self.name} (required = true) needs a teacher (the original model, ctx.teacher); "
                    "slimfx.compile gives it, a PassContext needs teacher=")
        return check_train_data(ctx, step=self.name, required=self.required, off="remove the step from the recipe")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        needs_teacher = self.loss != "ce"
        problem = self.check_context(ctx)
        if problem:
            raise PassError(problem)
        skip = "no teacher" if needs_teacher and ctx.teacher is None else \
            train_or_skip(ctx, step=self.name, required=self.required, off="remove the step from the recipe")
        if skip:
            ctx.logger.info("%s: skipped, %s", self.name, skip)
            return PassResult(changed=False, stats={"skipped": True, "reason": skip})
        before = ctx.eval_fn(_lowered(graph)) if ctx.eval_fn is not None else None
        t0 = time.perf_counter()
        pairs = [tuple(f.split(":", 1)) for f in self.features]
        result = distill(ctx.teacher if needs_teacher else None, graph, ctx.train_data, loss=self.loss,
                         loss_options=self.loss_options(), features=pairs, epochs=self.epochs,
                         optimizer=self.optimizer, lr=self.lr, weight_decay=self.weight_decay,
                         batch_size=self.batch_size, eval_fn=ctx.eval_fn,
                         example_inputs=ctx.example_inputs or None, seed=ctx.seed, quiet=ctx.quiet,
                         logger=ctx.logger)
        stats = {"loss": self.loss, "epochs": self.epochs, "best_epoch": result.best_epoch,
                 "final_train_loss": round(result.history[-1]["loss"], 6),
                 "seconds": round(time.perf_counter() - t0, 3)}
        if before is not None:
            stats["accuracy_before"] = before
            stats["accuracy_after"] = result.best_metric
        return PassResult(changed=True, stats=stats)


@register_pass("kd-finetune")
class KDFinetune(KDRecovery):
    """Alias of `distill`: fine-tune the graph as a student of ctx.teacher with a distillation loss."""


def _lowered(graph: Graph):
    from slimfx import ir

    return ir.lower(graph).eval()
