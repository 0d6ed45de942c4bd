"""Knowledge distillation: losses, feature taps, the trainer, and the KD-recovery and subgraph-swap passes."""

from passes.distill.features import as_graph, check_pairs, resolve_feature, with_features
from passes.distill.losses import (
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
from passes.distill.trainer import DistillResult, TrainData, distill

__all__ = [
    "LOSS_NAMES", "AttentionTransferLoss", "CELoss", "CombinedLoss", "CTKDLoss", "DistillLoss", "KDLoss",
    "LogitStdKDLoss", "MSELoss", "attention_map", "grad_reverse", "make_loss",
    "as_graph", "check_pairs", "resolve_feature", "with_features",
    "DistillResult", "TrainData", "distill",
]

# registered passes
from passes.distill.recover import KDFinetune, KDRecovery  # noqa: E402
from passes.distill.subgraph import DistillSubgraph  # noqa: E402

__all__ += ["KDRecovery", "KDFinetune", "DistillSubgraph"]
