"""Pass API, registry, PassManager and the built-in passes."""

from passes.base import (
    Pass,
    PassContext,
    PassResult,
    create_pass,
    get_pass,
    parse_pass_spec,
    register_pass,
    registered_passes,
)

__all__ = ["Pass", "PassContext", "PassResult", "register_pass", "registered_passes", "get_pass",
           "create_pass", "parse_pass_spec"]
import passes.distill  # noqa: E402,F401  (registers distill, kd-finetune, distill-subgraph)
