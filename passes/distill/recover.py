"""The `distill` pass (alias `kd-finetune`): recover a compressed graph's accuracy by KD from the original.

Used after pruning: the current graph is the student, `ctx.teacher` (the original model, nn.Module or
ir.Graph) the teacher, `ctx.train_data` the data. loss, T, alpha and beta default to what
benchmarks/distill_sweep.py chose for `slimfx distill`; epochs and lr stay a fine-tune's (the graph starts
from trained weights, the sweep's students from scratch), and augment stays 'none' (the pass runs on any model,
token ids included, which mixup cannot blend). Trains the graph's params in place; the structure does
not change, so every later pass and exporter sees an ordinary graph.
"""

from __future__ import annotations

import time

from slimfx.ir import Graph
from slimfx.ir.errors import PassError
from slimfx.passes.base import Pass, PassContext, PassResult, option, register_pass
from slimfx.passes.distill.augment import AUGMENT_HELP, parse_augment
from slimfx.passes.distill.losses import LossName
from slimfx.passes.distill.trainer import OPTIMIZER_HELP, Optimizer, distill
from slimfx.passes.finetune import check_train_data, train_or_skip


@register_pass("distill")
class KDRecovery(Pass):
    """Fine-tune the graph as a student of ctx.teacher on ctx.train_data with a distillation loss."""

    preserves_outputs = False

    loss: LossName = option("kd", help=(
        "ce: labels only (no teacher); mse: match the teacher's logits; kd: Hinton's KD, (1-alpha)*CE + "
        "alpha*T^2*KL at temperature T; ctkd: KD with a learned temperature; logit-std: KD on z-scored logits; "
        "at, at+kd, at+ctkd, at+logit-std: attention transfer on `features` plus CE or that logit loss"))
    T: float = option(2.0, gt=0, help="KD temperature softening both distributions (typical: 2-8; 2 won the "
                                      "sweep in docs/distillation.md); the starting temperature for ctkd, which "
                                      "needs it between 1 and 20")
    alpha: float = option(0.9, ge=0, le=1, help="weight of the teacher (soft) term; 1 - alpha weighs the "
                                                "labels (kd, ctkd, logit-std)")
    beta: float = option(1.0, ge=0, help="weight of the attention-transfer term (at* losses); 1 won the sweep "
                                         "over 3, 10 and 100, the paper's 1e3 wrecks small students")
    features: list[str] = option([], help=(
        "attention-transfer pairs 'student_feature:teacher_feature' (node names or module paths), "
        "e.g. ['layer2:layer2']; empty: the at* losses pair the last feature map of each spatial size the "
        "student and the teacher share, where both compute or both only pool (stats name the pairs)"))
    epochs: int = option(3, ge=1, help="passes over the train data (typical: 1-10)")
    lr: float = option(1e-3, gt=0, help="peak learning rate of a one-cycle schedule (typical: 1e-4 to 3e-3)")
    weight_decay: float = option(0.0, ge=0, help="weight decay (decoupled, as AdamW); 0 turns it off")
    optimizer: Optimizer = option("adam", help=OPTIMIZER_HELP)
    batch_size: int = option(64, ge=1, help="samples per step when the train data is an (x, y) tensor pair")
    augment: str = option("none", help=AUGMENT_HELP)
    required: bool = option(False, help=(
        "false: without a teacher or train data the step is skipped and the report says so; true: that is "
        "an error"))

    def validate(self) -> None:
        try:
            parse_augment(self.augment)
        except PassError as e:
            raise PassError(f"pass '{self.name}': {e}") from None
        for f in self.features:
            if ":" not in f:
                raise PassError(f"pass '{self.name}': feature {f!r} must be 'student_feature:teacher_feature' "
                                "(node names or module paths)")

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
                         batch_size=self.batch_size, augment=self.augment, eval_fn=ctx.eval_fn,
                         example_inputs=ctx.example_inputs or None, seed=ctx.seed, quiet=ctx.quiet,
                         logger=ctx.logger)
        stats = {"loss": self.loss, "epochs": self.epochs, "best_epoch": result.best_epoch,
                 "final_train_loss": round(result.history[-1]["loss"], 6),
                 "seconds": round(time.perf_counter() - t0, 3)}
        if result.features:
            stats["features"] = [f"{s}:{t}" for s, t in result.features]
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
