"""The quantize pass's speed guard: int8 only where onnxruntime's integer kernels beat the float ones.

An integer kernel is not always faster: a first conv over 3 input channels, some depthwise convs and
small linears at batch 1 run slower as QLinearConv/QGemm than in float. The guard times every quantized
layer alone, between the integer tensors around it in the int8 model: as the integer kernel the
exporter's QDQ form fuses into, and as dequantize -> float layer -> quantize (what keeping it float costs
while its neighbours stay int8), at each target batch size, on the runtime `ctx.measure_ms` times on
(slimfx.compile: onnxruntime, 1 thread). A layer whose integer kernel is slower (geometric mean of the
ratios over the batch sizes above `SLOWER`) is kept float and the pass quantizes again without it. The first
layers, up to the first whose integer kernel is faster alone, are a second candidate kept float together (a
float prefix): they read the float input, so keeping them float costs one quantize where the prefix ends, not a
dequantize/quantize pair per layer as each was timed alone. Then the whole models are timed side by side; an
alternative to all-int8 is kept only when it is clearly faster, and when int8 is still slower than float, the
float model is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from slimfx.ir import Graph, Node, Param
from slimfx.passes.quantize.qdq import WEIGHT_OPS, clipped, through_noops

# A speed guard's note when nothing can be timed (quantize, quantize-weights); users read it in the report's
# headline, on either interface.
UNTIMED = ("skipped: no runtime to time on, as latency is not measured (--no-bench on the command line, "
           "bench_seconds=0 in slimfx.compile; PassContext.measure_ms for a pass run by itself)")

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


def layer_graph(src: Graph, layer: Node, float_layer: Node | None = None, *, bare: bool = False) -> Graph:
    """`layer` of the quantized graph `src` alone, between the integer tensors around it: from the integer
    tensor it reads (or the float graph input, with its quantize) to the integer tensor it writes (the
    quantize after it and its ReLU), as onnxruntime runs it inside the int8 model. With `float_layer` (the
    same layer in the float graph), the layer computes with its float weights between the same integer
    tensors (dequantize, float layer, quantize): what keeping it float costs while its neighbours stay int8.
    `bare` (with `float_layer`): the float layer from a float tensor to a float tensor (its ReLU included), what
    it costs inside a float prefix, where its neighbours are float too."""
    x = through_noops(layer.inputs[0])
    members: dict[str, Node] = {}
    entry = x
    if bare:
        assert float_layer is not None
    elif isinstance(x, Node) and x.op == "dequantize" and isinstance(x.inputs[0], Node):
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
    q = None if bare else next((u for u in out.users if u.op == "quantize"), None)
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


# --- timing and the decision rule ------------------------------------------------------------------------

#: the least relative difference that counts as a speed difference, however steady the timings look: two
#: onnxruntime sessions of one file land a few percent apart, so a smaller gap is a tie
MARGIN = 0.05
#: rounds of the per-layer timings (they only nominate layers: the whole-model timings decide)
LAYER_ROUNDS = 3
#: the guard's defaults (quantize's speed_guard_batches / _seconds / _rounds; quantize-weights uses them as they are)
BATCHES, BUDGET_S, ROUNDS = (1, 32), 2.0, 5
#: the decision rule, stated once (docs/quantization.md and the report quote it)
RULE = ("each variant's time is its best over interleaved rounds (a busy neighbour or an unlucky session only "
        "adds time), and its noise how far its second-best round is above its best; a variant is faster or "
        "slower than another only when the ratio of their times (geometric mean over the batch sizes) is beyond "
        f"1 by more than their two noises added, and at least {MARGIN:.0%}: anything closer is a tie, and a tie "
        "keeps int8. Slower at any one batch size by more than twice that size's noise (and 10%) also rules "
        "int8 out")


@dataclass(frozen=True)
class Verdict:
    """How one variant's time compares with another's, over interleaved rounds (see RULE)."""

    ratio: float  # geometric mean over batch sizes of best time a / best time b
    spread: float  # the noise the rule allowed (at least MARGIN)
    per_batch: tuple[float, ...]  # best-time ratio at each batch size
    batch_spread: tuple[float, ...]  # the noise at each batch size
    verdict: Literal["faster", "slower", "tie"]
    slower_at: tuple[int, ...]  # batch sizes at which a is clearly slower (beyond twice that size's noise)

    def to_dict(self, batches: list[int]) -> dict[str, Any]:
        return {"ratio": round(self.ratio, 3), "spread": round(self.spread, 3), "verdict": self.verdict,
                **{f"b{b}": round(r, 3) for b, r in zip(batches, self.per_batch)},
                "batch_spread": {f"b{b}": round(s, 3) for b, s in zip(batches, self.batch_spread)},
                "slower_at": list(self.slower_at)}


def _best(col: list[float]) -> tuple[float, float]:
    """(best time, its noise: how far the second best is above it, relatively)."""
    s = sorted(col)
    return s[0], (s[1] / s[0] - 1) if len(s) > 1 and s[0] > 0 else 0.0


def decide(times_a: list[list[float]], times_b: list[list[float]], batches: list[int],
           margin: float = MARGIN) -> Verdict:
    """The verdict on variant a against b by RULE; `times_x[r][i]`: round r, batch size `batches[i]`."""
    per_batch, batch_spread, slower_at = [], [], []
    for i, b in enumerate(batches):
        (ta, na), (tb, nb) = _best([row[i] for row in times_a]), _best([row[i] for row in times_b])
        r, noise = ta / tb, max(margin, na + nb)
        per_batch.append(r)
        batch_spread.append(noise)
        if r > 1 + max(2 * noise, 2 * margin):
            slower_at.append(b)
    ratio = math.exp(sum(math.log(r) for r in per_batch) / len(per_batch))
    noise = max(margin, sum(batch_spread) / len(batch_spread))
    verdict = "slower" if ratio > 1 + noise else "faster" if ratio < 1 - noise else "tie"
    return Verdict(ratio, noise, tuple(per_batch), tuple(batch_spread), verdict, tuple(slower_at))  # type: ignore[arg-type]


def compare(times: dict[str, list[list[float]]], a: str, b: str, batches: list[int],
            margin: float = MARGIN) -> Verdict:
    """The verdict on `a` against `b`, both timed in the same interleaved rounds."""
    return decide(times[a], times[b], batches, margin)


def interleaved_times(measure: Measure, graphs: dict[str, Graph], batches: list[int], budget_s: float,
                      rounds: int) -> dict[str, list[list[float]]]:
    """Milliseconds of each graph at each batch size, per round: every round times every graph once, in an
    order that rotates from round to round (graphs reading the same input types read the same inputs)."""
    inputs: dict[tuple, list[tuple]] = {}
    xs = {}
    for k, g in graphs.items():
        key = tuple((n.meta.shape[1:], n.meta.dtype) for n in g.inputs)
        if key not in inputs:  # drawn once per input signature, not once per graph
            inputs[key] = batch_inputs(g, batches)
        xs[k] = inputs[key]
    per = budget_s / (len(graphs) * rounds)
    names = list(graphs)
    out: dict[str, list[list[float]]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            out[k].append([float(t) for t in measure(graphs[k], xs[k], per)])
    return out


def slower_layers(measure: Measure, quant_graph: Graph, float_graph: Graph, batches: list[int],
                  budget_s: float, rounds: int = LAYER_ROUNDS, margin: float = MARGIN
                  ) -> tuple[dict[str, str], dict[str, Verdict]]:
    """Layers whose integer kernel is clearly slower than their float one (RULE): {name: why}, and every
    layer's verdict (int8 time / float time)."""
    layers = [n for n in quantized_layers(quant_graph) if float_graph.has_node(n.name)]
    if not layers:
        return {}, {}
    per = budget_s / len(layers)
    slower: dict[str, str] = {}
    verdicts: dict[str, Verdict] = {}
    for n in layers:
        gi, gf = layer_graph(quant_graph, n), layer_graph(quant_graph, n, float_graph.node(n.name))
        t = interleaved_times(measure, {"int8": gi, "float": gf}, batches, per, rounds)
        verdicts[n.name] = v = compare(t, "int8", "float", batches, margin)
        if v.verdict == "slower":
            ti = [min(row[i] for row in t["int8"]) for i in range(len(batches))]
            tf = [min(row[i] for row in t["float"]) for i in range(len(batches))]
            times = "; ".join(f"batch {b}: {a:.3f} vs {c:.3f} ms" for b, a, c in zip(batches, ti, tf))
            slower[n.name] = f"int8 kernel {v.ratio:.2f}x the float one, noise ±{v.spread:.2f} ({times})"
    return slower, verdicts


# --- the guard ----------------------------------------------------------------------------------------------

INT8, FEWER, PREFIX, FLOAT, ORIGINAL = ("int8", "int8, slower layers float", "int8, float prefix", "float",
                                       "original")
Requantize = Callable[[Graph, list[str]], Any]  # (float graph copy, layers kept float) -> PassResult

#: the most leading layers a float prefix may hold (each length is a whole-model candidate)
PREFIX_LIMIT = 4


def float_prefix(measure: Measure, quant_graph: Graph, float_graph: Graph, batches: list[int], budget_s: float,
                 rounds: int = LAYER_ROUNDS, margin: float = MARGIN) -> tuple[list[str], dict[str, Verdict]]:
    """The first quantized layers, in graph order (at most PREFIX_LIMIT), up to the first whose integer kernel
    alone is faster than the bare float layer (float in, float out: inside a float prefix a layer pays no
    dequantize/quantize, the prefix one quantize where it ends), and each one's verdict (int8 / bare float)."""
    every = [n for n in quantized_layers(quant_graph) if float_graph.has_node(n.name)]
    out: list[str] = []
    verdicts: dict[str, Verdict] = {}
    for n in every[:PREFIX_LIMIT]:  # the per-layer budget of slower_layers: at most PREFIX_LIMIT layers' worth
        gi = layer_graph(quant_graph, n)
        gb = layer_graph(quant_graph, n, float_graph.node(n.name), bare=True)
        t = interleaved_times(measure, {"int8": gi, "float": gb}, batches, budget_s / len(every), rounds)
        v = verdicts[n.name] = compare(t, "int8", "float", batches, margin)
        if v.ratio < 1.0:
            break
        out.append(n.name)
    return out, verdicts


def prefix_variant(k: int) -> str:
    """The name of the candidate that keeps the first `k` quantized layers float."""
    return f"{PREFIX} of {k}"


def measure_and_choose(measure: Measure, graph: Graph, float_graph: Graph, requantize: Requantize,
                       batches: list[int], budget_s: float, rounds: int, margin: float = MARGIN,
                       per_layer: bool = True, original: Graph | None = None
                       ) -> tuple[str, dict[str, tuple[Graph, Any]], dict[str, Any]]:
    """Time the quantized `graph`'s layers (when `per_layer`: static int8, whose layers sit between integer
    tensors), then the whole models side by side; returns the chosen variant (INT8, FEWER or FLOAT), the int8
    candidates {variant: (graph, result or None)} and the report section."""
    slower, layer_v = slower_layers(measure, graph, float_graph, batches, budget_s, margin=margin) \
        if per_layer else ({}, {})
    prefix, prefix_v = float_prefix(measure, graph, float_graph, batches, budget_s, margin=margin) \
        if per_layer else ([], {})
    why = {n: f"float prefix: int8 kernel alone {v.ratio:.2f}x the bare float layer, noise ±{v.spread:.2f}"
           for n, v in prefix_v.items()}
    kept_if = {FEWER: slower, **{prefix_variant(k): {n: why[n] for n in prefix[:k]} for k in range(1, len(prefix) + 1)}}
    candidates: dict[str, tuple[Graph, Any]] = {INT8: (graph, None)}
    for variant, layers in kept_if.items():
        if not layers or (variant != FEWER and set(layers) == set(slower)):
            continue
        alt = float_graph.copy()
        res = requantize(alt, list(layers))
        if quantized_layers(alt):
            candidates[variant] = (alt, res)
    timed = {**{k: g for k, (g, _) in candidates.items()}, FLOAT: float_graph}
    if original is not None:
        timed[ORIGINAL] = original
    times = interleaved_times(measure, timed, batches, budget_s, rounds)
    vs = {k: compare(times, k, FLOAT, batches, margin) for k in candidates}
    # the bar an int8 model must clear: the float graph quantize started from, or the original model
    bar = {k: compare(times, k, ORIGINAL, batches, margin) for k in candidates} if original is not None else vs
    fit = [k for k in candidates if bar[k].verdict != "slower" and not bar[k].slower_at]
    # keeping layers float is for speed: a variant that does so and is still slower than the float graph
    # itself loses to it (against the original, such a variant can clear the bar the float graph clears faster)
    alternatives = [k for k in fit if k != INT8 and vs[k].verdict != "slower"]
    chosen = INT8 if INT8 in fit else (min(alternatives, key=lambda k: vs[k].ratio) if alternatives else FLOAT)
    between: dict[str, Verdict] = {}
    if INT8 in fit:  # layers kept float cost file size and exactness: only for a clear gain over all-int8
        between = {k: compare(times, k, INT8, batches, margin) for k in alternatives}
        faster = [k for k, v in between.items() if v.verdict == "faster"]
        if faster:
            chosen = min(faster, key=lambda k: between[k].ratio)
    kept = kept_if.get(chosen, {})
    section: dict[str, Any] = {
        "mode": "measure", "batches": batches, "rounds": rounds, "rule": RULE,
        "layer_ratio": {k: round(v.ratio, 3) for k, v in layer_v.items()},
        "layer_spread": {k: round(v.spread, 3) for k, v in layer_v.items()},
        "slower_layers": slower, "float_prefix": prefix,
        "prefix_ratio": {k: round(v.ratio, 3) for k, v in prefix_v.items()},
        "model_ratio": {k: {f"b{b}": round(r, 3) for b, r in zip(batches, v.per_batch)} for k, v in vs.items()}
        | {FLOAT: {f"b{b}": 1.0 for b in batches}},
        "model_verdict": {k: v.to_dict(batches) for k, v in vs.items()},
        **({"against": "original", "original_verdict": {k: v.to_dict(batches) for k, v in bar.items()}}
           if original is not None else {"against": "input"}),
        "model_ms": {k: [[round(t, 4) for t in row] for row in v] for k, v in times.items()},
        "chosen": chosen, "kept_float": kept,
        "decisions": {"model": "float" if chosen == FLOAT else "int8", "kept_float": list(kept),
                      "batches": batches},
    }
    if FEWER in between:
        section["fewer_vs_int8"] = between[FEWER].to_dict(batches)
    prefixes = {k: v.to_dict(batches) for k, v in between.items() if k.startswith(PREFIX)}
    if prefixes:
        section["prefix_vs_int8"] = prefixes
    if chosen == INT8 and len(candidates) > 1:
        tried = "; ".join(f"{k}: {_x(vs[k])}" for k in candidates if k != INT8)
        section["note"] = (f"{len(slower)} layer(s) timed slower in int8 alone ({len(prefix)} in the float prefix), "
                           f"but the models with layers float were not clearly faster ({tried} vs {_x(vs[INT8])} "
                           "of fp32): all kept int8")
    return chosen, candidates, section


def _x(v: Verdict) -> str:
    return ", ".join(f"{r:.2f}x" for r in v.per_batch)


#: how far above float a storage scheme's integer kernels may be at one batch size and still count as not
#: slower: below the smallest gap this machine's interleaved best times resolve (about 1-2%), so a model within
#: it is a tie with float, not a loss
STORAGE_TIE = 0.02
STORAGE_RULE = (f"{RULE}. A storage scheme (fixed-point, sign) keeps its stored weights whichever form is chosen, "
                "so its integer kernels (all layers, or all but a float prefix of the first 1-"
                f"{PREFIX_LIMIT}) are kept only when they are not slower than float at any batch size by more "
                f"than {STORAGE_TIE:.0%} (nor slower overall by the rule above); of those the fastest (geometric "
                "mean of the ratios) is chosen, and when none qualifies the weights are computed in float "
                "(weight-only)")


def storage_choice(verdicts: dict[str, Verdict], fallback: str = "weight-only") -> str:
    """The storage guard's pick among its integer candidates (`verdicts`: each one's time against the float
    graph, speed.compare), by STORAGE_RULE: the fastest one that is at most STORAGE_TIE above float at every
    batch size and not slower overall; `fallback` (the same weights computed in float) when none is."""
    fit = {k: v for k, v in verdicts.items()
           if v.verdict != "slower" and all(r <= 1 + STORAGE_TIE for r in v.per_batch)}
    return min(fit, key=lambda k: fit[k].ratio) if fit else fallback


def load_decisions(path: str) -> dict[str, Any]:
    """Recorded speed-guard decisions: a report.json of an earlier compile (the first quantize step's
    `speed_guard.decisions`) or a JSON file holding that object ({"model": "int8" | "float", "kept_float":
    [layer names]}). PassError naming the file and what to do."""
    import json
    from pathlib import Path

    from slimfx.ir.errors import PassError

    fix = ("give the report.json of a compile whose quantize step measured (speed_guard = \"measure\"), or a "
           "JSON file {\"model\": \"int8\" or \"float\", \"kept_float\": [layer names]}")
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise PassError(f"pass 'quantize': option 'speed_guard': no decisions file {path} (relative to the "
                        f"working directory {Path.cwd()}); {fix}, or use speed_guard = \"measure\"") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PassError(f"pass 'quantize': option 'speed_guard': the decisions file {path} is not readable JSON "
                        f"({e}); {fix}") from None
    if isinstance(data, dict) and "passes" in data:
        found = [st["speed_guard"]["decisions"] for r in data["passes"] if isinstance(r, dict)
                 for st in [r.get("stats") or {}] if isinstance(st.get("speed_guard"), dict)
                 and isinstance(st["speed_guard"].get("decisions"), dict)]
        if not found:
            raise PassError(f"pass 'quantize': option 'speed_guard': the report {path} holds no speed-guard "
                            f"decisions (its quantize step did not measure); {fix}")
        data = found[0]
    if not isinstance(data, dict) or data.get("model") not in ("int8", "float") \
            or not isinstance(data.get("kept_float", []), list) \
            or not all(isinstance(n, str) for n in data.get("kept_float", [])):
        raise PassError(f"pass 'quantize': option 'speed_guard': {path} is not a decisions file; {fix}")
    return {"model": data["model"], "kept_float": list(data.get("kept_float", []))}
