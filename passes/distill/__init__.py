"""Knowledge distillation: losses, feature taps, the trainer, and the KD-recovery and subgraph-swap passes."""

from slimfx.passes.distill.features import (
    as_graph,
    auto_pairs,
    check_pairs,
    computed_sizes,
    resolve_feature,
    stage_ends,
    with_features,
)
from slimfx.passes.distill.losses import (
    LOSS_NAMES,
    AttentionTransferLoss,
    CELoss,
    CombinedLoss,
    CTKDLoss,
    DistillLoss,
    KDLoss,
    LogitStdKDLoss,
    MSELoss,
    attention_map,
    grad_reverse,
    make_loss,
)
from slimfx.passes.distill.trainer import DistillResult, TrainData, distill

__all__ = [
    "LOSS_NAMES", "AttentionTransferLoss", "CELoss", "CombinedLoss", "CTKDLoss", "DistillLoss", "KDLoss",
    "LogitStdKDLoss", "MSELoss", "attention_map", "grad_reverse", "make_loss",
    "as_graph", "auto_pairs", "check_pairs", "computed_sizes", "resolve_feature", "stage_ends", "with_features",
    "DistillResult", "TrainData", "distill",
]

# registered passes
from slimfx.passes.distill.recover import KDFinetune, KDRecovery  # noqa: E402
from slimfx.passes.distill.subgraph import DistillSubgraph  # noqa: E402

__all__ += ["KDRecovery", "KDFinetune", "DistillSubgraph"]
