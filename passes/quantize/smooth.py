"""`smooth-quant`: move activation outliers into the weights before static int8 (Xiao et al. 2023).

Transformer activations have a few channels far larger than the rest; one per-tensor int8 scale then
spends its range on them. For a layer norm whose output only linears read, each input channel j gets
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (X on the calibration data, W over every linear reading it):
the layer norm's weight and bias are divided by s, the linears' weight columns multiplied by s. The
function is unchanged (exact up to float rounding); the activation's channels are evened out (alpha 1
moves everything into the weights, 0 nothing), which per-channel weight scales absorb better.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimfx.ir import Graph, Node, Param
from slimfx.passes.base import Pass, PassContext, PassResult, option, register_pass
from slimfx.passes.quantize.calibrate import calibration_batches, collect
from slimfx.passes.quantize.qdq import through_noops


def smoothable(graph: Graph) -> list[tuple[Node, list[Node]]]:
    """(layer norm, the linears reading it) where only linears with param weights read the layer norm
    (through identity / inference dropout) and no other op reads its params."""
    users = graph.param_users()
    groups = []
    for ln in graph.find("layer_norm"):
        w, b = ln.inputs[1], ln.inputs[2]
        if not isinstance(w, Param) or not (b is None or isinstance(b, Param)) \
                or len(tuple(ln.attrs.get("normalized_shape", ()))) != 1:
            continue
        readers = [n for n in graph if n.op != "output" and any(
            isinstance(a, Node) and through_noops(a) is ln for a in n.inputs)]
        if not readers or any(n.op != "linear" or not isinstance(n.inputs[1], Param)
                               or through_noops(n.inputs[0]) is not ln for n in readers):
            continue
        own = [w] + ([b] if b is not None else []) + [n.inputs[1] for n in readers]
        if any(len(users[p.name]) != 1 for p in own):
            continue
        groups.append((ln, readers))
    return groups


@register_pass("smooth-quant")
@dataclass
class SmoothQuant(Pass):
    """Per-channel activation-to-weight scale migration before static int8 (layer norm -> linears)."""

    preserves_outputs = True
    needs_calibration = True

    alpha: float = option(0.5, ge=0, le=1, help=(
        "how much of each activation channel's range moves into the weights: 0 none, 1 all (typical 0.5; "
        "0.75-0.85 for models with strong outliers)"))

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        groups = smoothable(graph)
        if not groups:
            return PassResult(False, {"smoothed": 0, "linears": 0})
        amax: dict[str, torch.Tensor] = {}

        def sink(name: str, v: torch.Tensor) -> None:
            a = v.detach().abs().reshape(-1, v.shape[-1]).amax(dim=0).double()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a

        collect(graph, calibration_batches(ctx), [ln.name for ln, _ in groups], sink, quiet=ctx.quiet)
        scales = []
        for ln, linears in groups:
            a = amax[ln.name]
            w = torch.stack([graph.params[n.inputs[1].name].detach().abs().amax(dim=0).double()
                             for n in linears]).amax(dim=0)
            s = a.clamp(min=1e-5) ** self.alpha / w.clamp(min=1e-5) ** (1 - self.alpha)
            s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
            def scaled(p: Param, by: torch.Tensor) -> None:
                t = graph.params[p.name]
                graph.params[p.name] = (t.detach().double() * by).to(t.dtype)

            scaled(ln.inputs[1], 1 / s)
            if ln.inputs[2] is not None:
                scaled(ln.inputs[2], 1 / s)
            for n in linears:
                scaled(n.inputs[1], s)
            scales.append(float(s.max() / s.min()))
        return PassResult(True, {"smoothed": len(groups), "linears": sum(len(ls) for _, ls in groups),
                                 "alpha": self.alpha, "max_scale_spread": max(scales)})
