"""Pruning passes: unstructured masks, dependency-aware structured pruning, sensitivity analysis.

Importing this package registers `prune-weights`, `materialize-masks`, `prune-channels` and
`prune-sensitivity`.
"""

from passes.prune.channels import PruneChannels
from passes.prune.groups import Dependencies, Group, analyze

__all__ = ["PruneChannels", "analyze", "Dependencies", "Group"]
