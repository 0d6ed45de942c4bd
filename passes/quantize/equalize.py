"""Cross-layer equalization and bias correction (Nagel et al., "Data-Free Quantization", ICCV 2019).

Equalization rescales output channel i of a layer by 1/s_i and the matching input channel of the
next layer by s_i (exact through ReLU, which is positively homogeneous), choosing
s_i = sqrt(r1_i / r2_i) so both channels get the same weight range: per-tensor weight
quantization then wastes far fewer levels on depthwise convolutions.

Bias correction removes the shift in each quantized layer's mean output that weight rounding
causes: E[y_float] - E[y_quant] per output channel, measured on calibration data, layer by layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from slimfx.ir import Graph, Node, Param, is_depthwise, ops_with, trait
from slimfx.passes.base import Pass, PassContext, PassResult, option, register_pass
from slimfx.passes.quantize.calibrate import calibration_batches, run_with_outputs
from slimfx.passes.quantize.qdq import bias_limit, layer_weight, scale_value

_LAYERS = ops_with(weighted=True)  # layers y = x ⊛ W + b (ir.Weighted): conv1d, conv2d, linear, ...


def _weight(graph: Graph, n: Node) -> torch.Tensor | None:
    """The float weight of a layer equalization rescales (not transposed layers: their weight is [in, out, ...])."""
    if n.op in _LAYERS and len(n.inputs) >= 2 and isinstance(n.inputs[1], Param) \
            and not trait(n.op, "weighted").transposed:
        w = graph.params[n.inputs[1].name]
        return w if w.is_floating_point() else None
    return None


def _groups(n: Node) -> int:
    return n.attrs.get("groups", 1) if trait(n.op, "weighted").grouped else 1


def find_pairs(graph: Graph, *, through_relu6: bool) -> list[tuple[Node, list[Node], Node]]:
    """(first layer, activations between, second layer) where the first's output reaches only the second."""
    pairs = []
    for a in graph:
        if _weight(graph, a) is None or (_groups(a) > 1 and not is_depthwise(graph, a)):
            continue
        acts: list[Node] = []
        cur = a
        while len(cur.users) == 1:
            u = next(iter(cur.users))
            if u.op == "relu" or (u.op == "relu6" and through_relu6):
                acts.append(u)
                cur = u
                continue
            break
        if len(cur.users) != 1:
            continue
        b = next(iter(cur.users))
        if _weight(graph, b) is None or b.inputs[0] is not cur or b.op != a.op:
            continue
        if _groups(b) > 1 and not is_depthwise(graph, b):
            continue
        pairs.append((a, acts, b))
    return pairs


def _out_range(w: torch.Tensor) -> torch.Tensor:
    return w.abs().reshape(w.shape[0], -1).amax(dim=1)


def _in_range(w: torch.Tensor, depthwise: bool) -> torch.Tensor:
    if depthwise:
        return _out_range(w)
    return w.abs().transpose(0, 1).reshape(w.shape[1], -1).amax(dim=1)


def _scale_in(w: torch.Tensor, s: torch.Tensor, depthwise: bool) -> torch.Tensor:
    shape = [1] * w.dim()
    if depthwise:
        shape[0] = -1
    else:
        shape[1] = -1
    return w * s.reshape(shape)


@register_pass("equalize")
@dataclass
class Equalize(Pass):
    """Cross-layer equalization: balance per-channel weight ranges of consecutive layers (exact rewrite)."""

    iterations: int = option(4, ge=1, help="rounds over all layer pairs (each round brings chained pairs "
                                           "closer to balance; typical: 2-8)")
    through_relu6: bool = option(True, help=(
        "also equalize across a relu6, which then becomes a clamp with one upper bound per channel "
        "(still exact); false: only across relu"))
    min_scale: float = option(1e-2, gt=0, le=1, help=(
        "each channel's scale factor is kept in [min_scale, 1/min_scale], so no channel is scaled to "
        "nearly zero"))

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        pairs = find_pairs(graph, through_relu6=self.through_relu6)
        if any(n.op == "batch_norm" for n in graph):
            ctx.logger.warning("equalize: the graph still has batch_norm nodes; run fold-batchnorm first "
                               "so their layers can be equalized")
        bounds: dict[str, torch.Tensor] = {}
        for _ in range(self.iterations):
            for a, acts, b in pairs:
                wa, wb = graph.params[a.inputs[1].name], graph.params[b.inputs[1].name]
                dw = is_depthwise(graph, b)
                r1, r2 = _out_range(wa), _in_range(wb, dw)
                s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp(min=1e-12)), torch.ones_like(r1))
                s = s.clamp(self.min_scale, 1.0 / self.min_scale)
                graph.params[a.inputs[1].name] = wa / s.reshape([-1] + [1] * (wa.dim() - 1))
                if len(a.inputs) > 2 and isinstance(a.inputs[2], Param):
                    graph.params[a.inputs[2].name] = graph.params[a.inputs[2].name] / s
                graph.params[b.inputs[1].name] = _scale_in(wb, s, dw)
                for act in acts:
                    if act.op == "relu6" or act.name in bounds:
                        prev = bounds.get(act.name, torch.full_like(s, 6.0))
                        bounds[act.name] = prev / s
        for act in (x for _, acts, _ in pairs for x in acts):
            if act.name in bounds:
                shape = [-1] + [1] * (len(act.meta.shape) - 2) if act.meta and len(act.meta.shape) > 2 else [-1]
                hi = graph.add_param(f"{act.name}_max", bounds[act.name].reshape(shape).float(), buffer=True)
                lo = graph.add_param(f"{act.name}_min", torch.zeros_like(graph.params[hi.name]), buffer=True)
                act.op = "clamp"
                act.attrs = {"min": lo, "max": hi}
        return PassResult(bool(pairs), {"pairs": len(pairs), "per_channel_clamps": len(bounds)})


@register_pass("bias-correction")
@dataclass
class BiasCorrection(Pass):
    """Correct the mean output shift of each quantized layer: the same as quantize{bias_correction=true}.

    Bias correction compares each layer with the float graph quantize started from, so it runs inside the
    quantize pass: in a pipeline, this step sets `bias_correction = true` on the quantize before it (the
    PassManager does, when it is built); its own record says so, quantize's stats hold the numbers."""

    preserves_outputs = False

    needs_calibration: ClassVar[bool] = True
    runs_after: ClassVar[tuple[str, ...]] = ("quantize",)
    option_of: ClassVar[tuple[str, str] | None] = ("quantize", "bias_correction")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return PassResult(False, {"done_by": "quantize (bias_correction = true)"})


def correct_biases(graph: Graph, reference: Graph, ctx: PassContext) -> dict[str, float]:
    """Bias correction of the quantized `graph` against the float `reference` it was made from, in place:
    each quantized layer's bias moves by the per-channel mean output shift on the calibration data."""
    batches = calibration_batches(ctx)
    layers = [n for n in graph if n.op in _LAYERS and isinstance(n.inputs[1], Node)
              and n.inputs[1].op == "dequantize" and reference.has_node(n.name)]
    if not layers:
        return {"corrected": 0}
    for n in layers:  # a bias to correct: zeros where the layer has none
        if len(n.inputs) < 3 or n.inputs[2] is None:
            w = graph.params[n.inputs[1].inputs[0].name]
            p = graph.add_param(f"{n.name}.bias", torch.zeros(layer_weight(n, w).shape[0]))
            n.inputs = (*n.inputs[:2], p, *n.inputs[3:])
    names = [n.name for n in layers]
    channel_dim = {n.name: trait(n.op, "weighted").channel_dim for n in layers}
    float_means = _channel_means(run_with_outputs(reference, names), batches, names, channel_dim)
    # one lowering; corrections are written in place into its buffers (and into the graph)
    gm = run_with_outputs(graph, names)
    total = 0.0
    for n in layers:
        delta = float_means[n.name] - _channel_means(gm, batches, [n.name], channel_dim, names)[n.name]
        name, value = _corrected_bias(graph, n, delta)
        graph.params[name] = value
        live = gm.get_buffer(name) if name in graph.buffers else gm.get_parameter(name)
        with torch.no_grad():
            live.copy_(value)
        total += float(delta.abs().mean())
    return {"corrected": len(layers), "mean_abs_shift": total / len(layers)}


def _channel_means(gm: torch.nn.Module, batches: list[tuple], names: list[str], channel_dim: dict[str, int],
                   all_names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Per-channel mean of the named values of `gm` (from run_with_outputs over `all_names`)."""
    index = {k: i for i, k in enumerate(all_names or names)}
    sums: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    with torch.no_grad():
        for b in batches:
            _, values = gm(*b)
            for k in names:
                v = values[index[k]].detach().double()
                flat = v.movedim(channel_dim[k], 0).reshape(v.shape[channel_dim[k]], -1)
                sums[k] = sums.get(k, 0) + flat.sum(dim=1)
                count[k] = count.get(k, 0) + flat.shape[1]
    return {k: (sums[k] / count[k]).float() for k in names}


def _corrected_bias(graph: Graph, n: Node, delta: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(param name, new value) for bias += delta in the bias's own form (int32 with scale s_x*s_w, or float)."""
    b = n.inputs[2]
    if isinstance(b, Node) and b.op == "dequantize":
        qref = b.inputs[0]
        q, s = graph.params[qref.name], scale_value(graph, b.inputs[1])
        new = torch.round(q.double() + delta.double() / s.double())
        # a channel whose corrected bias would not leave the accumulator its room keeps its bias (never a
        # saturated one: quantize keeps every bias within half of that limit, so this takes a huge shift)
        limit = bias_limit(layer_weight(n, graph.params[n.inputs[1].inputs[0].name])[0].numel())
        return qref.name, torch.where(new.abs() <= limit, new, q.double()).to(torch.int32)
    assert isinstance(b, Param)
    return b.name, graph.params[b.name] + delta
