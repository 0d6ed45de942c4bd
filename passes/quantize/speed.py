"""The quantize pass's speed guard: int8 only where onnxruntime's integer kernels beat the float ones.

An integer kernel is not always faster: a first conv over 3 input channels, some depthwise convs and
small linears at batch 1 run slower as QLinearConv/QGemm than in float. The guard times every quantized
layer alone, between the integer tensors around it in the int8 model: as the integer kernel the
exporter's QDQ form fuses into, and as dequantize -> float layer -> quantize (what keeping it float costs
while its neighbours stay int8), at each target batch size, on the runtime `ctx.measure_ms` times on
(slimfx.compile: onnxruntime, 1 thread). A layer whose integer kernel is slower (geometric mean of the
ratios over the batch sizes above `SLOWER`) is kept float and the pass quantizes again without it. Then the
whole int8 model is timed against the float one; when it is still slower, the float model is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from slimfx.ir import Graph, Node, Param
from slimfx.passes.quantize.qdq import WEIGHT_OPS, clipped, through_noops

Measure = Callable[[Graph, list[tuple], float], list[float]]


def quantized_layers(graph: Graph) -> list[Node]:
    """The conv/linear nodes of a quantized graph whose weight is an integer param (dequantized)."""
    return [n for n in graph if n.op in WEIGHT_OPS and len(n.inputs) > 1 and isinstance(n.inputs[1], Node)
            and n.inputs[1].op == "dequantize"]


def _ancestors(value: Any, into: dict[str, Node]) -> None:
    """Nodes computing a weight/bias operand (dequantize of params and the like), inputs first."""
    if not isinstance(value, Node) or value.name in into:
        return
    for a in value.inputs:
        _ancestors(a, into)
    into[value.name] = value


def layer_graph(src: Graph, layer: Node, float_layer: Node | None = None) -> Graph:
    """`layer` of the quantized graph `src` alone, between the integer tensors around it: from the integer
    tensor it reads (or the float graph input, with its quantize) to the integer tensor it writes (the
    quantize after it and its ReLU), as onnxruntime runs it inside the int8 model. With `float_layer` (the
    same layer in the float graph), the layer computes with its float weights between the same integer
    tensors (dequantize, float layer, quantize): what keeping it float costs while its neighbours stay int8."""
    x = through_noops(layer.inputs[0])
    members: dict[str, Node] = {}
    entry = x
    if isinstance(x, Node) and x.op == "dequantize" and isinstance(x.inputs[0], Node):
        q = x.inputs[0]
        if q.op == "quantize" and isinstance(q.inputs[0], Node) and q.inputs[0].op == "input":
            entry = q.inputs[0]  # the model's input: the int8 layer pays for its quantize, a float one reads it
            if float_layer is None:
                members[q.name] = q
        else:
            entry = q
        if entry is q or float_layer is None:
            members[x.name] = x
    if float_layer is None:
        for a in layer.inputs[1:]:
            _ancestors(a, members)
    members[layer.name] = layer
    out = clipped(layer)
    chain = []
    walk = out
    while walk is not layer:
        chain.append(walk)
        walk = walk.inputs[0]
    for n in reversed(chain):
        members[n.name] = n
    q = next((u for u in out.users if u.op == "quantize"), None)
    if q is not None:
        members[q.name] = q
        out = q
    g = Graph()
    inp = g.create_node("input", (), {}, name="x", meta=entry.meta)
    env: dict[str, Any] = {entry.name: inp}
    owner = float_layer.graph if float_layer is not None else src

    def remap(v: Any, params: Graph = src) -> Any:
        if isinstance(v, Node):
            return env[v.name]
        if isinstance(v, Param):
            if v.name not in g.params:
                g.add_param(v.name, params.params[v.name], buffer=True, unique=False)
            return v
        if isinstance(v, (list, tuple)):
            return type(v)(remap(e, params) for e in v)
        return v

    for n in members.values():
        if n is layer:  # reads x past identity / dropout (they vanish on export); a float layer its float params
            first = env.get(x.name, inp) if isinstance(x, Node) else remap(layer.inputs[0])
            rest = float_layer.inputs[1:] if float_layer is not None else layer.inputs[1:]
            ins = (first, *(remap(a, owner) for a in rest))
        else:
            ins = tuple(remap(a) for a in n.inputs)
        env[n.name] = g.create_node(n.op, ins, {k: remap(v) for k, v in n.attrs.items()}, name=n.name, meta=n.meta)
    g.set_outputs(env[out.name])
    return g


def batch_inputs(graph: Graph, batches: list[int]) -> list[tuple]:
    """Inputs for `graph` at each batch size, shaped like its input metas (integers in their full range)."""
    out = []
    for b in batches:
        xs = []
        for n in graph.inputs:
            shape = (b, *n.meta.shape[1:])
            dt = n.meta.dtype
            if dt.is_floating_point:
                xs.append(torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dt))
            elif dt == torch.uint8:
                xs.append(torch.randint(0, 256, shape, dtype=dt))
            elif dt == torch.int8:
                xs.append(torch.randint(-128, 128, shape, dtype=dt))
            else:  # ids: zeros are valid for any table
                xs.append(torch.zeros(shape, dtype=dt))
        out.append(tuple(xs))
    return out


#: int8 must be this much slower than float before a layer is kept float: the dequantize/quantize a float
#: layer between integer ones needs are not in the layer's own time, and sub-0.05 ms kernels time noisily
SLOWER = 1.1
#: the model with slower layers kept float must be this much faster than the all-int8 one to be chosen
CLEARLY_FASTER = 0.95


def slower_layers(measure: Measure, quant_graph: Graph, float_graph: Graph, batches: list[int],
                  budget_s: float, rounds: int = 3) -> tuple[dict[str, str], dict[str, float]]:
    """Layers whose integer kernel is slower than their float one: {name: why}, and every layer's ratio
    (int8 / float time, geometric mean over `batches`). Each variant's time is the best of `rounds` timings,
    taken in turns (interference only adds time)."""
    layers = [n for n in quantized_layers(quant_graph) if float_graph.has_node(n.name)]
    if not layers:
        return {}, {}
    per = budget_s / (2 * rounds * len(layers))
    slower: dict[str, str] = {}
    ratios: dict[str, float] = {}
    for n in layers:
        gi, gf = layer_graph(quant_graph, n), layer_graph(quant_graph, n, float_graph.node(n.name))
        t = model_times(measure, {"int8": gi, "float": gf}, batches, per * 2 * rounds, rounds)
        ti, tf = t["int8"], t["float"]
        ratios[n.name] = r = math.exp(sum(math.log(a / b) for a, b in zip(ti, tf)) / len(batches))
        if r > SLOWER:
            times = "; ".join(f"batch {b}: {a:.3f} vs {c:.3f} ms" for b, a, c in zip(batches, ti, tf))
            slower[n.name] = f"int8 kernel {r:.2f}x the float one ({times})"
    return slower, ratios


def model_times(measure: Measure, graphs: dict[str, Graph], batches: list[int], budget_s: float,
                rounds: int = 2) -> dict[str, list[float]]:
    """Milliseconds of each graph at each batch size: best of `rounds` rounds that time every graph in turn
    (graphs share their inputs: they must read the same ones)."""
    first = next(iter(graphs.values()))
    xs = batch_inputs(first, batches)
    per = budget_s / (len(graphs) * rounds)
    best = {k: [math.inf] * len(batches) for k in graphs}
    for _ in range(rounds):
        for k, g in graphs.items():
            best[k] = [min(a, b) for a, b in zip(best[k], measure(g, xs, per))]
    return best
