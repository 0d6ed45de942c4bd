"""Pruning passes: unstructured masks, dependency-aware structured pruning, sensitivity analysis.

Importing this package registers `prune-weights`, `materialize-masks`, `prune-channels` and
`prune-sensitivity`.
"""

from passes.prune.channels import PruneChannels
from passes.prune.groups import Dependencies, Group, analyze
from passes.prune.masks import MaterializeMasks, PruneWeights, layer_sparsity
from passes.prune.sensitivity import PruneSensitivity

__all__ = ["PruneChannels", "PruneWeights", "MaterializeMasks", "PruneSensitivity", "analyze", "Dependencies",
           "Group", "layer_sparsity"]
