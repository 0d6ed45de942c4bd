"""Pass API, registry, PassManager, pattern rewriter and rewrite rules, and the built-in passes."""

from slimfx.passes.base import (
    Pass,
    PassContext,
    PassResult,
    create_pass,
    get_pass,
    option,
    parse_pass_spec,
    register_pass,
    registered_passes,
)
from slimfx.passes.manager import PassManager, PassRecord, PipelineResult, compare_outputs
from slimfx.passes.rewrite import Match, Pattern, call, precompute
from slimfx.passes.rules import PatternPass, Rule, RulePass, RuleSet, apply_rules, rewrite

# Built-in passes register themselves on import.
from slimfx.passes import cleanup, fuse  # noqa: E402,F401,I001  isort: skip

__all__ = ["Pass", "PassContext", "PassResult", "register_pass", "registered_passes", "get_pass",
           "create_pass", "parse_pass_spec", "option", "PassManager", "PassRecord", "PipelineResult",
           "compare_outputs", "Pattern", "Match", "call", "precompute", "Rule", "RuleSet", "apply_rules", "rewrite",
           "RulePass", "PatternPass"]

# Pass packages register their passes on import.
import slimfx.passes.distill  # noqa: E402,F401
import slimfx.passes.finetune  # noqa: E402,F401
import slimfx.passes.prune  # noqa: E402,F401
import slimfx.passes.quantize  # noqa: E402,F401
