"""Quantization-aware fine-tuning with a straight-through estimator (STE).

A temporary copy of the graph reads every quantized weight through
`fake_quantize` (its scale recomputed from the current weight: absmax per
channel, power of two, or mean|w| for sign) and every quantized activation
through `fake_quantize` with its calibrated params. Training that copy on
ctx.train_data updates the float weights; the quantize pass then folds them
into integer params as usual. Training itself is passes.finetune.train_graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from slimfx.ir import Graph, Param, TensorMeta
from slimfx.ir.errors import PassError
from slimfx.passes.base import PassContext
from slimfx.passes.finetune import train_graph
from slimfx.passes.quantize.qdq import Plan, weight_axis

if TYPE_CHECKING:
    from slimfx.passes.quantize.ptq import Quantize


def fake_quant_graph(q: Quantize, graph: Graph, plan: Plan, ranges: dict) -> Graph:
    """A copy of `graph` that computes the quantized model in float with STE gradients."""
    g = graph.copy()
    kinds = q.lowbit_ops(plan)
    for name in [n.name for n in plan.weight_ops]:
        n = g.node(name)
        ref = n.inputs[1]
        assert isinstance(ref, Param)
        kind = kinds[name]
        qmax = q.weight_qmax(kind)
        mode = {"sign": "sign", "fixed-point": "pow2"}.get(kind or "", "absmax")
        axis = weight_axis(n) if (mode == "sign" or (mode == "absmax" and q.per_channel)) else None
        shape = tuple(g.params[ref.name].shape)
        fq = g.create_node("fake_quantize", (ref, None, None), {"qmin": -qmax, "qmax": qmax, "axis": axis,
                                                               "mode": mode},
                           name=f"{name}_weight_fq", before=n, meta=TensorMeta(shape, torch.float32))
        ins = list(n.inputs)
        ins[1] = fq
        n.inputs = tuple(ins)
    if q.scheme != "int8-dynamic":
        for name, qp in q.activation_qparams(plan, ranges).items():
            t = g.node(name)
            users = list(t.users)
            s = g.add_param(f"{name}_fq_scale", qp.scale, buffer=True)
            z = g.add_param(f"{name}_fq_zero_point", qp.zero_point.to(torch.float32), buffer=True)
            fq = g.create_node("fake_quantize", (t, s, z), {"qmin": qp.qmin, "qmax": qp.qmax, "axis": None,
                                                           "mode": "fixed"},
                               name=f"{name}_fq", after=t if t.op != "input" else g.inputs[-1], meta=t.meta)
            for u in users:
                u.replace_input(t, fq)
    return g


def finetune_fake_quant(q: Quantize, graph: Graph, plan: Plan, ranges: dict, ctx: PassContext) -> list[float]:
    """STE fine-tuning of the weights `plan` quantizes; writes the trained weights back into `graph`."""
    if ctx.train_data is None:
        raise PassError("quantize: qat_epochs > 0 needs training data; give the PassContext train_data "
                        "(an iterable of (inputs_tuple, target) batches) or set qat_epochs = 0")
    g = fake_quant_graph(q, graph, plan, ranges)
    try:
        hist = train_graph(g, ctx.train_data, epochs=q.qat_epochs, lr=q.qat_lr, optimizer=q.qat_optimizer,
                           seed=ctx.seed, quiet=ctx.quiet, desc="quantization-aware fine-tuning")
    except PassError as e:
        raise PassError(f"pass 'quantize' (qat_epochs = {q.qat_epochs}): {e}; or set qat_epochs = 0") from e
    losses = hist["loss"]
    for name, t in g.params.items():
        if name in graph.params and t.is_floating_point() and name not in graph.buffers:
            graph.params[name] = t.detach().clone()
    ctx.logger.info("QAT: loss %.4f -> %.4f over %d epochs", losses[0], losses[-1], len(losses))
    return losses


__all__ = ["fake_quant_graph", "finetune_fake_quant"]
