"""Fusion passes: fold eval-mode batch norms into the conv/linear before them.

There is deliberately no `fuse-activation` pass: see docs/passes.md ("Why there
is no fuse-activation pass").
"""

from __future__ import annotations

import torch

from slimfx.ir import Graph, Node, Param, TensorMeta, ops_with, trait
from slimfx.passes.base import Pass, PassContext, PassResult, register_pass
from slimfx.passes.graph_utils import runs_in_training

FOLDABLE = ops_with(weighted=True)  # layers y = x ⊛ W + b (ir.Weighted): conv1d, conv2d, linear, and registered ones


def _why_not(bn: Node, graph: Graph) -> str | None:
    """None when `bn` can be folded into its producer, else the reason it cannot."""
    if runs_in_training(bn):
        return "runs in training mode (batch statistics)"
    x = bn.inputs[0]
    if not isinstance(x, Node) or x.op not in FOLDABLE:
        return f"input is not a weighted layer ({'/'.join(FOLDABLE)})"
    if len(x.users) != 1:
        return f"%{x.name} has other users ({', '.join('%' + u.name for u in x.users if u is not bn)})"
    w, b = x.inputs[1], x.inputs[2] if len(x.inputs) > 2 else None
    if not isinstance(w, Param) or not (b is None or isinstance(b, Param)):
        return f"%{x.name}'s weight/bias are computed, not params"
    mean, var, gamma, beta = bn.inputs[1:5]
    if not isinstance(mean, Param) or not isinstance(var, Param):
        return "no running statistics"
    if not all(v is None or isinstance(v, Param) for v in (gamma, beta)):
        return "affine weight/bias are computed, not params"
    weight = graph.params[w.name]
    if not weight.is_floating_point():
        return f"weight @{w.name} is {weight.dtype}"
    channels = graph.params[mean.name].numel()
    if weight.shape[0] != channels:
        return f"{channels} batch-norm channels but {weight.shape[0]} output channels"
    dim = trait(x.op, "weighted").channel_dim
    if dim != 1 and not (isinstance(x.meta, TensorMeta) and len(x.meta.shape) >= 2 and dim % len(x.meta.shape) == 1):
        return f"{x.op} output is not [batch, features], so batch_norm does not normalize its features"
    return None


def fold_batchnorm_weights(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor,
                           var: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of conv/linear(x) followed by eval batch_norm, computed in float64.

    scale = gamma / sqrt(var + eps);  W' = W * scale (per output channel);  b' = (b - mean) * scale + beta
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


@register_pass("fold-batchnorm")
class FoldBatchNorm(Pass):
    """Folds eval-mode batch_norm into the conv1d/conv2d/linear that feeds it (incl. bias-less convs)."""

    preserves_outputs = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        bns = graph.find("batch_norm")
        if not bns:
            return PassResult(changed=False, stats={"folded": 0, "not_folded": 0})
        readers = {k: len(v) for k, v in graph.param_users().items()}
        folded, not_folded = 0, 0
        reasons: dict[str, str] = {}
        blocked: list[str] = []
        dropped: set[str] = set()
        for bn in bns:
            reason = _why_not(bn, graph)
            if reason is not None:
                not_folded += 1
                reasons[bn.name] = f"{bn.where()}: {reason}"
                if not reason.startswith("input is not a weighted layer"):
                    blocked.append(f"%{bn.name} ({bn.where()}): {reason}")  # a layer it could fold, but not this
                ctx.logger.debug("fold-batchnorm: %%%s (%s) not folded: %s", bn.name, bn.where(), reason)
                continue
            x: Node = bn.inputs[0]
            w, b = x.inputs[1], x.inputs[2] if len(x.inputs) > 2 else None
            p = graph.params
            mean, var, gamma, beta = (p[r.name] if isinstance(r, Param) else None for r in bn.inputs[1:5])
            new_w, new_b = fold_batchnorm_weights(p[w.name], p[b.name] if b is not None else None, mean, var,
                                                  gamma, beta, float(bn.attrs.get("eps", 1e-5)))
            bias_name = b.name if b is not None else (w.name[:-len("weight")] + "bias" if w.name.endswith("weight")
                                                      else f"{w.name}.bias")
            w_ref = _store(graph, w, w.name, new_w, readers)
            b_ref = _store(graph, b, bias_name, new_b, readers)
            x.inputs = (x.inputs[0], w_ref, b_ref, *x.inputs[3:])
            x.meta = bn.meta
            graph.replace_all_uses(bn, x)
            graph.erase(bn)
            for r in bn.params():
                readers[r.name] -= 1
                if not readers[r.name]:
                    dropped.add(r.name)
            folded += 1
        for name in dropped:  # the statistics no node reads any more (cheaper than a full scan)
            del graph.params[name]
            graph.buffers.discard(name)
        stats: dict = {"folded": folded, "not_folded": not_folded}
        if reasons:
            stats["not_folded_reasons"] = reasons
        if blocked:  # after a conv/linear and still not folded: say so in the report's headline
            more = f" (and {len(blocked) - 2} more; see not_folded_reasons)" if len(blocked) > 2 else ""
            stats["notes"] = [f"{len(blocked)} batch norm(s) after a conv/linear not folded: "
                              + "; ".join(blocked[:2]) + more]
        return PassResult(changed=folded > 0, stats=stats)


def _store(graph: Graph, old: Param | None, name: str, value: torch.Tensor, readers: dict[str, int]) -> Param:
    """Put a folded tensor in place of param `old` when this node is its only reader, else under a fresh
    name (never mutate a tensor in place: it may share storage with the user's model)."""
    if old is not None and readers.get(old.name) == 1:
        graph.params[old.name] = value
        return old
    if old is not None:
        readers[old.name] -= 1  # others still read it
    ref = graph.add_param(name, value)
    readers[ref.name] = 1
    return ref


__all__ = ["FoldBatchNorm", "fold_batchnorm_weights"]
