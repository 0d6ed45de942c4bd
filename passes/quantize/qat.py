"""Quantization-aware fine-tuning with a straight-through estimator (STE).

A temporary copy of the graph reads every quantized weight through
`fake_quantize` (its scale recomputed from the current weight: absmax per
channel, power of two, or mean|w| for sign) and every quantized activation
through `fake_quantize` with its calibrated params. Training that copy on
ctx.train_data updates the float weights; the quantize pass then folds them
into integer params as usual.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ir import Graph, Param, TensorMeta, lower
from ir.errors import PassError
from passes.base import PassContext
from passes.quantize.calibrate import progress
from passes.quantize.qdq import Plan

if TYPE_CHECKING:
    from passes.quantize.ptq import Quantize


def fake_quant_graph(q: Quantize, graph: Graph, plan: Plan, ranges: dict) -> Graph:
    """A copy of `graph` that computes the quantized model in float with STE gradients."""
    g = graph.copy()
    kinds = q.lowbit_ops(plan)
    for name in [n.name for n in plan.weight_ops]:
        n = g.node(name)
        ref = n.inputs[1]
        assert isinstance(ref, Param)
        kind = kinds[name]
        qmax = 2 ** (q.bits - 1) - 1
        mode = {"sign": "sign", "fixed-point": "pow2"}.get(kind or "", "absmax")
        axis = 0 if (mode == "sign" or (mode == "absmax" and q.per_channel)) else None
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


def train_graph(graph: Graph, data, *, epochs: int, lr: float, quiet: bool = True,
                loss_fn=None, desc: str = "fine-tuning") -> list[float]:
    """Train a graph's float params in place with Adam + cosine schedule on (inputs, target) batches.

    Returns the mean loss of each epoch.
    """
    batches = list(data)
    if not batches:
        raise PassError("fine-tuning needs training data: give the PassContext train_data "
                        "(an iterable of (inputs_tuple, target) batches)")
    gm = lower(graph)
    gm.train()
    params = [p for p in gm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    total = epochs * len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y))
    losses = []
    for _ in progress(range(epochs), desc=desc, quiet=quiet, total=epochs):
        run = 0.0
        for inputs, target in batches:
            inputs = inputs if isinstance(inputs, tuple) else (inputs,)
            out = gm(*inputs)
            out = out[0] if isinstance(out, (tuple, list)) else out
            loss = loss_fn(out, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            run += loss.item()
        losses.append(run / len(batches))
    gm.eval()
    return losses


def finetune_fake_quant(q: Quantize, graph: Graph, plan: Plan, ranges: dict, ctx: PassContext) -> list[float]:
    """STE fine-tuning of the weights `plan` quantizes; writes the trained weights back into `graph`."""
    if ctx.train_data is None:
        raise PassError("quantize: qat_epochs > 0 needs training data; give the PassContext train_data "
                        "(an iterable of (inputs_tuple, target) batches) or set qat_epochs = 0")
    g = fake_quant_graph(q, graph, plan, ranges)
    losses = train_graph(g, ctx.train_data, epochs=q.qat_epochs, lr=q.qat_lr, quiet=ctx.quiet,
                         desc="quantization-aware fine-tuning")
    for name, t in g.params.items():
        if name in graph.params and t.is_floating_point() and name not in graph.buffers:
            graph.params[name] = t.detach().clone()
    ctx.logger.info("QAT: loss %.4f -> %.4f over %d epochs", losses[0], losses[-1], len(losses))
    return losses


__all__ = ["fake_quant_graph", "train_graph", "finetune_fake_quant"]
