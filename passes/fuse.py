"""Fusion passes: fold eval-mode batch norms into the conv/conv_transpose/linear before them.

There is deliberately no `fuse-activation` pass: see docs/passes.md ("Why there
is no fuse-activation pass").
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from slimfx.ir import (
    Graph,
    Node,
    Param,
    TensorMeta,
    Weighted,
    canonical_weight,
    from_canonical_weight,
    ops_with,
    trait,
)
from slimfx.passes.base import PassContext, PassResult, register_pass
from slimfx.passes.graph_utils import runs_in_training
from slimfx.passes.rewrite import Match, call, precompute
from slimfx.passes.rules import Rule, RulePass, RuleSet

FOLDABLE = ops_with(weighted=True)  # layers y = x ⊛ W + b (ir.Weighted): conv1d, conv2d, linear, and registered ones


@precompute
def fold_batchnorm_weights(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor,
                           var: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of conv/linear(x) followed by eval batch_norm, computed in float64.

    scale = gamma / sqrt(var + eps);  W' = W * scale (per output channel);  b' = (b - mean) * scale + beta

    A plain function on tensors; the fold-batchnorm rules call it at rewrite time (`@precompute`).
    """
    scale = torch.rsqrt(var.double() + eps)
    if gamma is not None:
        scale = scale * gamma.double()
    b = bias.double() if bias is not None else torch.zeros_like(scale)
    new_b = (b - mean.double()) * scale
    if beta is not None:
        new_b = new_b + beta.double()
    new_w = weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    return new_w.to(weight.dtype), new_b.to(weight.dtype)


def _fold_transposed(layer: Weighted) -> precompute:
    """fold_batchnorm_weights for a transposed layer, whose weight is [in, out/groups, k...] (ir.Weighted):
    folded in the [out, in/groups, k...] layout and put back (groups = the norm's channels / out/groups)."""
    @precompute
    def fold(weight, bias, mean, var, gamma, beta, eps):
        groups = mean.numel() // weight.shape[layer.out_axis]
        new_w, new_b = fold_batchnorm_weights.fn(canonical_weight(weight, layer, groups), bias, mean, var, gamma,
                                                 beta, eps)
        return from_canonical_weight(new_w, layer, groups), new_b
    return fold


def _fold_rule(op: str) -> Rule:
    """batch_norm(layer(x, w, b)) -> layer(x, w', b'), the layer keeping its attributes and name."""
    layer = trait(op, "weighted")
    fold = _fold_transposed(layer) if layer.transposed else fold_batchnorm_weights

    def pattern(x, w, mean, var, b=None, gamma=None, beta=None, tracked=None, eps=None):
        return call("batch_norm", call(op, x, w, b), mean, var, gamma, beta, tracked, eps=eps)

    def replacement(x, w, b, mean, var, gamma, beta, eps):
        new_w, new_b = fold(w, b, mean, var, gamma, beta, eps)
        return call(op, x, new_w, new_b)

    return Rule(pattern, replacement, lambda m: _unfoldable(m) is None, name=op)


def fold_rules() -> RuleSet:
    """One rule per layer op that a batch norm folds into (ops registered later get theirs too)."""
    return _fold_rules(tuple(sorted(FOLDABLE)))


@functools.cache
def _fold_rules(ops: tuple[str, ...]) -> RuleSet:
    return RuleSet([_fold_rule(op) for op in ops])


def _unfoldable(m: Match) -> str | None:
    """None when the matched batch_norm can be folded into its layer, else the reason it cannot."""
    bn = m.anchor
    if runs_in_training(bn):
        return "runs in training mode (batch statistics)"
    layer = bn.inputs[0]
    if not isinstance(m["w"], Param) or not (m["b"] is None or isinstance(m["b"], Param)):
        return f"%{layer.name}'s weight/bias are computed, not params"
    if not isinstance(m["mean"], Param) or not isinstance(m["var"], Param):
        return "no running statistics"
    if not all(v is None or isinstance(v, Param) for v in (m["gamma"], m["beta"])):
        return "affine weight/bias are computed, not params"
    if not isinstance(m["eps"], (int, float)):
        return f"eps is {m['eps']!r}, not a number"
    weight = m.param("w")
    if not weight.is_floating_point():
        return f"weight {m['w']} is {weight.dtype}"
    channels = m.param("mean").numel()
    out_channels = _canonical(layer, weight).shape[0]
    if out_channels != channels:
        return f"{channels} batch-norm channels but {out_channels} output channels"
    dim = trait(layer.op, "weighted").channel_dim
    if dim != 1 and not (isinstance(layer.meta, TensorMeta) and len(layer.meta.shape) >= 2
                         and dim % len(layer.meta.shape) == 1):
        return f"{layer.op} output is not [batch, features], so batch_norm does not normalize its features"
    return None


def _canonical(layer: Node, weight: torch.Tensor) -> torch.Tensor:
    """The layer's weight as [out, in/groups, k...] (a transposed conv's is [in, out/groups, k...])."""
    kind = trait(layer.op, "weighted")
    return canonical_weight(weight, kind, int(layer.attrs.get("groups", 1)) if kind.grouped else 1)


def _why_not(bn: Node, rules: RuleSet) -> str:
    x = bn.inputs[0]
    if not isinstance(x, Node) or x.op not in FOLDABLE:
        return f"input is not a weighted layer ({'/'.join(FOLDABLE)})"
    pattern = rules[x.op].pattern
    m = pattern.match_at(bn)
    if m is None:
        return pattern.why_not(bn) or ""
    return _unfoldable(m) or ""


@register_pass("fold-batchnorm")
class FoldBatchNorm(RulePass):
    """Folds eval-mode batch_norm into the conv/conv_transpose/linear that feeds it (incl. bias-less convs)."""

    preserves_outputs = True

    def rule_set(self) -> RuleSet:
        return fold_rules()

    def summarize(self, counts: dict[str, int], graph: Graph) -> dict[str, Any]:
        left = graph.find("batch_norm")
        stats: dict[str, Any] = {"folded": sum(counts.values()), "not_folded": len(left)}
        if not left:
            return stats
        reasons = {bn.name: _why_not(bn, self.rule_set()) for bn in left}
        stats["not_folded_reasons"] = {bn.name: f"{bn.where()}: {reasons[bn.name]}" for bn in left}
        # After a conv/linear and still not folded (an opaque reader, computed weights): the report's headline.
        blocked = [f"%{bn.name} ({bn.where()}): {reasons[bn.name]}" for bn in left
                   if not reasons[bn.name].startswith("input is not a weighted layer")]
        if blocked:
            more = f" (and {len(blocked) - 2} more; see not_folded_reasons)" if len(blocked) > 2 else ""
            stats["notes"] = [f"{len(blocked)} batch norm(s) after a conv/linear not folded: "
                              + "; ".join(blocked[:2]) + more]
        return stats

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = super().run(graph, ctx)
        if ctx.logger.isEnabledFor(logging.DEBUG):
            for name, reason in result.stats.get("not_folded_reasons", {}).items():
                ctx.logger.debug("fold-batchnorm: %%%s (%s) not folded", name, reason)
        return result


__all__ = ["FoldBatchNorm", "fold_batchnorm_weights"]
