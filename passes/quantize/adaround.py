"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"): learned
rounding of a layer's integer weights, layer by layer on calibration data, on CPU.

Rounding each weight to the nearest integer minimises each weight's own error, not the layer's output
error. AdaRound keeps the scale and learns, per weight, whether to round down or up: w_int = floor(w / s)
+ h(V), with h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1) (a rectified sigmoid, zeta = 1.1,
gamma = -0.1), V initialised so that h(V) = w / s - floor(w / s). It minimises, with Adam on V,

    || act(layer(x_q, s * clamp(floor(w / s) + h(V), qmin, qmax), b)) - act(layer(x, w, b)) ||^2
    + lambda * sum(1 - |2 h(V) - 1| ^ beta)

where x_q is the layer's input in the model quantized so far (earlier layers already rounded, activations
quantized), x its input in the float model, `act` a ReLU/ReLU6 the layer's output goes through, and beta is
annealed from 20 to 2 (cosine) after a warm-up of 20% of the iterations without the regulariser, which
then drives every h(V) to 0 or 1. At the end w_int = floor(w / s) + (V >= 0). The reconstruction term
sums over channels and averages over the rest (AIMET's form), lambda = 0.01.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch

from slimfx.ir import Graph, Node, get_op, trait
from slimfx.passes.base import PassContext
from slimfx.passes.quantize.calibrate import calibration_batches, collect
from slimfx.passes.quantize.observers import QParams
from slimfx.passes.quantize.qdq import CLIPPING_ACTS

ZETA, GAMMA = 1.1, -0.1
REG_WEIGHT = 0.01
BETA_START, BETA_END = 20.0, 2.0
WARMUP = 0.2
LEARNING_RATE = 1e-2
BATCH = 32


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _init_v(rest: torch.Tensor) -> torch.Tensor:
    """V with h(V) = rest (rest in [0, 1))."""
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def layer_fn(op: str, attrs: dict, bias: torch.Tensor | None,
             act: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """y = act(op(x, w, bias, **attrs)) for a weighted op of the IR (conv, linear, ...)."""
    impl = get_op(op).impl

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = impl(x, w, bias, **attrs)
        return act(y) if act is not None else y
    return f


def reconstruction_error(f: Callable, xs: torch.Tensor, w: torch.Tensor, target: torch.Tensor,
                         channel_dim: int) -> float:
    """Mean over samples (and positions) of the squared output error summed over channels."""
    with torch.no_grad():
        total, n = 0.0, 0
        for i in range(0, len(xs), 64):
            d = f(xs[i:i + 64], w) - target[i:i + 64]
            e = (d * d).sum(dim=channel_dim)
            total += float(e.sum())
            n += e.numel()
    return total / max(n, 1)


def adaround(f: Callable, w: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, xs: torch.Tensor,
             target: torch.Tensor, *, iters: int, channel_dim: int, seed: int = 0) -> tuple[torch.Tensor, float, float]:
    """Integer weights (int64) for `w` with the (broadcastable) `scale` and zero point 0, learned so that
    f(xs, w_int * scale) matches `target`; returns them and the reconstruction error of nearest rounding
    and of the learned rounding."""
    w = w.detach().float()
    scale = scale.detach().float()
    ws = w / scale
    floor = torch.floor(ws)
    nearest = torch.round(ws).clamp(qmin, qmax)
    err_nearest = reconstruction_error(f, xs, nearest * scale, target, channel_dim)
    v = _init_v(ws - floor).requires_grad_(True)
    # Adam on V, written out: torch.optim imports torch._dynamo, seconds of start-up for one tensor
    m1, m2 = torch.zeros_like(v), torch.zeros_like(v)
    b1, b2, eps = 0.9, 0.999, 1e-8
    gen = torch.Generator().manual_seed(seed)
    n = len(xs)
    warm = int(WARMUP * iters)
    for it in range(iters):
        idx = torch.randint(0, n, (min(BATCH, n),), generator=gen)
        h = rectified_sigmoid(v)
        w_soft = torch.clamp(floor + h, qmin, qmax) * scale
        d = f(xs[idx], w_soft) - target[idx]
        loss = (d * d).sum(dim=channel_dim).mean()
        if it >= warm:
            rel = (it - warm) / max(iters - warm, 1)
            beta = BETA_END + 0.5 * (BETA_START - BETA_END) * (1 + math.cos(rel * math.pi))
            loss = loss + REG_WEIGHT * (1 - (2 * h - 1).abs().pow(beta)).sum()
        (grad,) = torch.autograd.grad(loss, [v])
        with torch.no_grad():
            m1.mul_(b1).add_(grad, alpha=1 - b1)
            m2.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            step = LEARNING_RATE * math.sqrt(1 - b2 ** (it + 1)) / (1 - b1 ** (it + 1))
            v.addcdiv_(m1, m2.sqrt().add_(eps * math.sqrt(1 - b2 ** (it + 1))), value=-step)
    with torch.no_grad():
        learned = (floor + (v >= 0).float()).clamp(qmin, qmax)
    err_learned = reconstruction_error(f, xs, learned * scale, target, channel_dim)
    if err_learned > err_nearest:  # too few iterations to beat nearest on this layer: keep nearest
        return nearest.long(), err_nearest, err_nearest
    return learned.long(), err_nearest, err_learned


class Rounder:
    """AdaRound for the quantize pass: `round(node, w, qp, qmax)` gives the integer weights of one layer, learned
    on the calibration data with the graph as quantized so far (its input) and the float graph `reference`
    (its target). Layers are rounded in the order the pass folds them (topological), so each layer's input
    already carries the rounding of the layers before it."""

    def __init__(self, q, graph: Graph, reference: Graph, ctx: PassContext, cache: dict | None = None):
        self.iters = q.adaround_iters
        self.graph, self.reference, self.ctx = graph, reference, ctx
        self.batches = calibration_batches(ctx)
        self.errors: dict[str, tuple[float, float]] = {}
        # layer -> (weight, scale, values, errors): a pass that quantizes the same graph again (the speed guard's
        # candidate with some layers float, the accuracy fallback) reuses a layer's learned rounding
        self.cache = {} if cache is None else cache

    def _values(self, graph: Graph, name: str) -> torch.Tensor:
        out: list[torch.Tensor] = []
        collect(graph, self.batches, [name], lambda _, v: out.append(v.detach()), quiet=True)
        return torch.cat(out)

    def round(self, n: Node, w: torch.Tensor, qp: QParams, qmax: int) -> torch.Tensor:
        hit = self.cache.get(n.name)
        if hit is not None and hit[0].shape == w.shape and torch.equal(hit[0], w) \
                and hit[1].shape == qp.scale.shape and torch.equal(hit[1], qp.scale):
            self.errors[n.name] = hit[3]
            return hit[2]
        ref = self.reference.node(n.name)
        x_q = self._values(self.graph, n.inputs[0].name)
        x_f = self._values(self.reference, ref.inputs[0].name)
        bias = self.reference.params[ref.inputs[2].name] if len(ref.inputs) > 2 and ref.inputs[2] is not None \
            and not isinstance(ref.inputs[2], Node) else None
        acts = []
        t = ref
        while len(t.users) == 1 and next(iter(t.users)).op in CLIPPING_ACTS:  # relu/relu6 after the layer
            t = next(iter(t.users))
            acts.append((get_op(t.op).impl, dict(t.attrs)))

        def act(y: torch.Tensor) -> torch.Tensor:
            for fn, attrs in acts:
                y = fn(y, **attrs)
            return y
        attrs = dict(ref.attrs)
        f = layer_fn(n.op, attrs, bias, act if acts else None)
        with torch.no_grad():
            target = torch.cat([f(x_f[i:i + 64], w) for i in range(0, len(x_f), 64)])
        ones = torch.ones(w.shape, dtype=torch.int8)
        scale = get_op("dequantize").impl(ones, qp.scale, torch.zeros_like(qp.scale), axis=qp.axis,
                                          block_size=qp.block_size)
        weighted = trait(n.op, "weighted")
        channel_dim = weighted.channel_dim if weighted is not None else 1
        values, e_near, e_ada = adaround(f, w, scale, -qmax, qmax, x_q, target, iters=self.iters,
                                         channel_dim=channel_dim, seed=self.ctx.seed)
        self.errors[n.name] = (e_near, e_ada)
        line = (f"adaround %{n.name}: output error {e_near:.4g} (nearest) -> {e_ada:.4g} "
                f"({self.iters} steps, {len(x_q)} samples)")
        if self.ctx.quiet or sys.stderr.isatty():  # a terminal has the progress bar
            self.ctx.logger.debug(line)
        else:
            self.ctx.logger.info(line)
        self.cache[n.name] = (w.detach().clone(), qp.scale.clone(), values.to(torch.int8), (e_near, e_ada))
        return values.to(torch.int8)

    def stats(self) -> dict:
        """Per layer: output reconstruction error (squared error summed over channels, mean over samples and
        positions, on the calibration data) with nearest rounding and with the learned one."""
        return {"iters": self.iters, "layers": {k: {"nearest": round(a, 6), "adaround": round(b, 6)}
                                                for k, (a, b) in self.errors.items()}}


__all__ = ["Rounder", "adaround", "layer_fn", "rectified_sigmoid", "reconstruction_error"]
