"""Pruning passes: unstructured masks, dependency-aware structured pruning, sensitivity analysis.

Importing this package registers `prune-weights`, `materialize-masks`, `prune-channels` and
`prune-sensitivity`.
"""

from slimfx.passes.prune.channels import PruneChannels
from slimfx.passes.prune.groups import (
    PRUNING_RULES,
    Analyzer,
    Dependencies,
    Group,
    analyze,
    register_pruning_rule,
    rule_for,
)
from slimfx.passes.prune.masks import MaterializeMasks, PruneWeights, layer_sparsity
from slimfx.passes.prune.sensitivity import PruneSensitivity

__all__ = ["PruneChannels", "PruneWeights", "MaterializeMasks", "PruneSensitivity", "analyze", "Dependencies",
           "Group", "layer_sparsity", "Analyzer", "PRUNING_RULES", "register_pruning_rule", "rule_for"]
