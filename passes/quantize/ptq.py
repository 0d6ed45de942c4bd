"""The `quantize` pass: calibrate, optionally fine-tune with fake quantization, fold into QDQ.

Schemes:
  int8-static   int8 weights (per output channel, symmetric), calibrated 8-bit activations, int32 bias
  int8-dynamic  int8 weights; activations quantized at run time from their own range (uint8)
  fixed-point   Qm.n: weights and activations with power-of-two scales 2^-n and zero point 0
  sign          weights alpha * sign(w) (alpha = mean|w| per output channel), stored as int8 ±1;
                first and last layer kept 8-bit; activations as int8-static

Recurrent layers (lstm, gru) keep float weights under every scheme: ONNX has no integer LSTM/GRU (only
onnxruntime's contrib DynamicQuantizeLSTM, which other runtimes lack). The layers around them are quantized;
the pass names the recurrent ones it kept float in its stats (`kept_float`) and the report's headline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from slimfx.ir import Graph, Node, Param, TensorMeta
from slimfx.ir.errors import PassError
from slimfx.passes.base import Pass, PassContext, PassResult, option, register_pass
from slimfx.passes.distill.trainer import OPTIMIZER_HELP, Optimizer
from slimfx.passes.quantize import ops as _ops  # noqa: F401  (registers fake_quantize)
from slimfx.passes.quantize import speed
from slimfx.passes.quantize.adaround import Rounder
from slimfx.passes.quantize.calibrate import calibration_batches, collect, progress
from slimfx.passes.quantize.equalize import correct_biases
from slimfx.passes.quantize.observers import (
    DTYPES,
    SCALE_FLOOR,
    Calibration,
    QParams,
    make_observer,
    pow2_qparams,
    qparams_from_range,
)
from slimfx.passes.quantize.qdq import (
    ACT_OPS,
    OUTPUT_QUANT_OPS,
    WEIGHT_OPS,
    Plan,
    align_input_channels,
    blocked_qparams,
    check_skip,
    clipped,
    collapse_requantize,
    expand_for_integer_kernels,
    fit_bias,
    fold_bias,
    fold_weight,
    insert_qdq,
    layer_weight,
    lookup_head_codes,
    make_plan,
    quantize_embedding,
    quantize_tensor,
    tables_to_store,
    through_noops,
    tied_heads,
    weight_axis,
)

#: the quantization schemes (module docstring): the type of quantize's and quant-sensitivity's `scheme`
Scheme = Literal["int8-static", "int8-dynamic", "fixed-point", "sign"]
#: schemes whose point is the stored weight format: the speed guard never trades their weights back to float
STORAGE_SCHEMES = ("fixed-point", "sign")
#: the speed guard's name for a storage scheme's weights computed in float
WEIGHT_ONLY = "weight-only"
Range = tuple[torch.Tensor, torch.Tensor]



# float_first keeps the first layer float only below this fan-in (digits_cnn's first conv: 9).
FLOAT_FIRST_MAX_FAN_IN = 32

# ops with weights that stay float (module docstring): op -> why
KEPT_FLOAT = {"lstm": "ONNX has no integer LSTM", "gru": "ONNX has no integer GRU"}


def kept_float(graph: Graph) -> dict[str, str]:
    """The layers with weights that quantize leaves float, and why."""
    return {n.name: KEPT_FLOAT[n.op] for n in graph if n.op in KEPT_FLOAT and n.params()}


def _tune_notes(stats: dict) -> list[str]:
    """The headline note of an accuracy-budget tuning (tune.py), kept when the speed guard replaces the result."""
    return [n for n in stats.get("notes", []) if isinstance(stats.get("tune"), dict) and n.startswith("tuned to ")]


def _short_first_layer(graph: Graph) -> list[str]:
    """The first conv/linear, when its reduction (input channels/groups x kernel) is short: it reads the raw
    input, so an integer kernel does not pay for the quantize around it, and it is the most sensitive layer.
    A long first reduction (an MLP's 64-wide input) stays int8."""
    first = next((n for n in graph if n.op in WEIGHT_OPS), None)
    w = first.inputs[1] if first is not None else None
    if isinstance(w, Param) and layer_weight(first, graph.params[w.name])[0].numel() < FLOAT_FIRST_MAX_FAN_IN:
        return [first.name]
    return []


def _stored_weight_bytes(graph: Graph, embeds: list) -> int:
    """Bytes of the quantized weights as files store them (4-bit weights packed two to a byte)."""
    stored = {p.name for n in graph if n.op == "dequantize" or n in embeds for p in n.params()}
    int4 = {n.inputs[0].name for n in graph if n.op == "dequantize" and (n.attrs.get("bits") or 8) <= 4
            and isinstance(n.inputs[0], Param)}
    return sum((graph.params[k].numel() + 1) // 2 if k in int4 else
               graph.params[k].numel() * graph.params[k].element_size() for k in stored)


def _notes(raised: dict[str, list], degenerate: dict[str, str], floats: dict[str, str]) -> list[str]:
    """The headline notes of a quantize run."""
    notes = []
    if raised:
        notes.append(f"kept the int32 bias of {', '.join(raised)} exact by raising the weight scale of "
                     f"{sum(len(v) for v in raised.values())} output channel(s) (an all-zero weight row, "
                     "or an input that was constantly 0 in calibration)")
    if degenerate:
        notes.append(f"{len(degenerate)} activation(s) had a degenerate calibrated range ("
                     + "; ".join(f"{k}: {v}" for k, v in list(degenerate.items())[:3])
                     + (", ..." if len(degenerate) > 3 else "") + "): check the calibration data")
    if floats:
        notes.append(f"kept {len(floats)} recurrent layer(s) float ({', '.join(floats)}): "
                     f"{'; '.join(sorted(set(floats.values())))}, so their weights stay fp32")
    return notes


QDQ_OPS = ("quantize", "dequantize", "dynamic_quantize")


def already_quantized(graph: Graph) -> str | None:
    """What says `graph` was quantized already (a resumed .slimfx file saved after a quantizing recipe), or None.
    Quantize reads float weights and float activations; run on its own output it would re-quantize dequantized
    weights (or fail in the speed guard), so it is refused with the way out."""
    qdq = [n.name for n in graph if n.op in QDQ_OPS]
    if not qdq:
        return None
    return (f"the model is already quantized ({len(qdq)} quantize/dequantize nodes, e.g. %{qdq[0]}), and quantize "
            "starts from a float model: resume from a file saved before quantizing (e.g. the output of the prune50 "
            "recipe with --format slimfx / formats=[\"slimfx\"]), compile the original model with this recipe, or use "
            "a recipe without a quantize step")


@register_pass("quantize")
@dataclass
class Quantize(Pass):
    """Quantize weights and activations and fold the result into quantize/dequantize nodes (QDQ)."""

    preserves_outputs = False

    scheme: Scheme = option("int8-static", help=(
        "int8-static: int8 weights, calibrated 8-bit activations, int32 biases; int8-dynamic: int8 weights, "
        "activations quantized at run time (no calibration); fixed-point: Qm.n power-of-two scales, zero "
        "point 0; sign: weights alpha * sign(w) per output channel"))
    per_channel: bool = option(True, help="one weight scale per output channel (true) or per tensor (false)")
    per_channel_min_gain_db: float = option(0.0, ge=0, help=(
        "dB of weight SQNR a layer's per-channel scales must gain over one per-tensor scale to be kept (each "
        "channel costs 4 bytes in the file); 0 always keeps them (6 dB is one bit)"))
    activation_dtype: Literal["uint8", "int8"] = option("uint8", help="integer type of quantized activations")
    activation_symmetric: bool = option(False, help="activation zero point 0 (symmetric range) instead of "
                                                    "fitted to the calibrated range")
    calibration: Calibration = option("minmax", help=(
        "how activation ranges are set from calibration data: minmax; moving-average (of batch min/max); "
        "percentile (clip at `percentile`); entropy (KL divergence, TensorRT style); mse (least squared "
        "error)"))
    percentile: float = option(99.999, gt=50, le=100, help="calibration = percentile: the percentile of "
                                                           "|activation| kept in range (typical: 99.9-99.999)")
    skip: list[str] = option([], help=(
        "layers kept float: node names, module paths (fnmatch globs, e.g. 'layer1.*') or op names"))
    bits: int = option(8, ge=2, le=8, help=(
        "weight bits; int8 schemes: below 8 the first and last conv/linear stay 8-bit (keep_first_last), and "
        "2-4 bits are stored as ONNX INT4 (two weights a byte; export with opset 21), 5-7 bits as int8; "
        "fixed-point: activation bits too"))
    weight_block_size: int = option(0, ge=0, le=4096, help=(
        "int8 schemes: weights per scale along a conv/linear's input channels (blocked quantization, ONNX "
        "opset 21; a power of two such as 16, 32, 64); 0: one scale per output channel. Layers with fewer "
        "input channels per group than a block keep one scale per output channel; blocked layers keep a float "
        "bias"))
    rounding: Literal["nearest", "adaround"] = option("nearest", help=(
        "int8 schemes: how weights are rounded to integers; nearest; adaround: learned rounding (Nagel et "
        "al. 2020), layer by layer on the calibration data, each layer's output matched to the float model's "
        "(adaround_iters steps a layer: about a minute on CPU for a small CNN at 500)"))
    adaround_iters: int = option(500, ge=1, le=100000, help=(
        "rounding = adaround: optimisation steps per layer (batches of 32 calibration samples); more is "
        "slower and usually a little better (the paper used 10000; 200-1000 is typical here)"))
    frac_bits: int | None = option(None, ge=-16, le=31, help=(
        "fixed-point: fraction bits n of every Qm.n scale 2^-n; unset: per tensor, the most that cover its range"))
    keep_first_last: bool = option(True, help=(
        "sign, and int8 schemes with bits < 8: keep the first and last weight layers 8-bit (the most "
        "sensitive ones, and a small part of the weights)"))
    align_channels: bool = option(True, help=(
        "pad a quantized conv's model input with zero channels (and its int8 weights with zero input channels) "
        "to a multiple of 4, e.g. a 3-channel image stem to 4: onnxruntime's symmetric int8 conv kernel on x86 "
        "takes only such convs, the others run im2col + GEMM at about twice the float conv's time; the output "
        "is unchanged"))
    float_first: bool = option(False, help=(
        "keep the first conv/linear float when its fan-in is below 32 (e.g. a 1- or 3-channel image input), "
        "where an integer kernel costs more than it saves"))
    qat_epochs: int = option(0, ge=0, help="epochs of quantization-aware fine-tuning (straight-through "
                                           "estimator) on the train data after calibration; 0 is off")
    qat_lr: float = option(1e-3, gt=0, help="QAT learning rate at the start, decayed by a cosine schedule "
                                            "(typical: 1e-4 to 1e-3)")
    qat_optimizer: Optimizer = option("adam", help="the optimizer of QAT; " + OPTIMIZER_HELP)
    qat_required: bool = option(False, help=(
        "false: without train data QAT is skipped and the stats say so; true: that is an error"))
    max_accuracy_drop: float | None = option(None, ge=0, le=1, help=(
        "fraction of accuracy on the validation data (0.003 = 0.3 points) the quantized model may lose: the tuner "
        "keeps float the layers that cost most accuracy per unit of `tune_target` until it holds, in at most "
        "`tune_evaluations` evaluations (a recipe's [tune] table sets it); needs an eval function; unset: off"))
    min_sqnr_db: float | None = option(None, ge=-100, le=200, help=(
        "tuning budget on the output: SQNR against the float model on the calibration data, in dB (e.g. 30); "
        "layers are kept float until it holds, like max_accuracy_drop (both may be given); unset: off"))
    tune_target: Literal["latency", "size"] = option("latency", help=(
        "what the tuner optimises within its budget: latency (layers with few MACs kept float first; the "
        "configurations within budget are timed side by side when a runtime is there) or size (layers with few "
        "weights kept float first; the smallest configuration within budget wins)"))
    tune_evaluations: int = option(5, ge=2, le=50, help=(
        "the most full evaluations (eval function calls, the float baseline included; SQNR measurements for an "
        "SQNR-only budget) the tuner makes"))
    embeddings: bool = option(True, help="int8 schemes: store embedding tables as int8 (one symmetric scale "
                                         "per table)")
    bias_correction: bool = option(False, help=(
        "after quantizing, correct each quantized layer's bias by its mean output shift from the float graph "
        "on the calibration data (Nagel et al. 2019); what the `bias-correction` step turns on"))
    prerequisites: bool = option(True, help=(
        "run fold-batchnorm first when the graph still has batch norms it can fold (left unfolded they stay "
        "float between integer kernels: about 2x slower than fp32); the report notes it; false: quantize as is"))
    speed_guard: bool | str = option(True, help=(
        "int8 schemes: \"measure\" (or true): time every quantized conv/linear (int8-static; int8-dynamic is "
        "timed as a whole model only) as onnxruntime's integer kernel "
        "and as the float one (1 thread, `speed_guard_batches`), then the whole models side by side in "
        "`speed_guard_rounds` interleaved rounds; keep float what int8 makes clearly slower (beyond the measured "
        "noise, at least 5%), the whole model when int8 is still clearly slower at any batch size; the report "
        "lists what was kept float, why, and the decisions. \"off\" (or false): no guard. A path to a JSON file "
        "(the report.json of an earlier compile, or its `speed_guard.decisions`): replay those decisions without "
        "timing, for reproducible builds. Measuring needs a runtime (slimfx.compile with latency measurement on; "
        "skipped, and said so, otherwise)"))
    speed_guard_against: Literal["input", "original"] = option("input", help=(
        "what an int8 model must not be slower than: the float graph quantize starts from (input), or the "
        "original model (original: after pruning, a smaller int8 model may keep its int8 weights while it beats "
        "the original, even if the pruned float model would be faster; needs ctx.teacher, which "
        "slimfx.compile sets); the fallback is the float graph quantize starts from either way"))
    speed_guard_rounds: int = option(speed.ROUNDS, ge=3, le=50, help=(
        "interleaved rounds of the speed guard's whole-model timings (int8, int8 with slower layers float, "
        "float in turns, fresh sessions each round); more rounds make the decision steadier on a busy machine"))
    speed_guard_batches: list[int] = option(list(speed.BATCHES), help=(
        "the batch sizes the speed guard times (int8 must win on the geometric mean of the time ratios); "
        "your deployment batch sizes"))
    speed_guard_seconds: float = option(speed.BUDGET_S, gt=0, help=(
        "time budget of the speed guard's per-layer measurements, in seconds (the whole-model check takes "
        "about as long again)"))
    reduce_range: bool = option(True, help=(
        "conv/linear weights in [-64, 64] (7 bits): exact on every CPU, where x86 CPUs without VNNI (AVX2) "
        "saturate full-range int8 weights; false: 8 bits, only for VNNI or ARM deployment"))

    #: passes whose work quantize needs; run first (with a note) when the graph shows they were not
    PREREQUISITES: ClassVar[tuple[str, ...]] = ("fold-batchnorm",)

    def validate(self) -> None:
        from slimfx.ir.metrics import accuracy_drop_problem

        problem = accuracy_drop_problem(self.max_accuracy_drop) if self.max_accuracy_drop is not None else None
        if problem:
            raise PassError(f"pass 'quantize': option 'max_accuracy_drop' {problem}")
        int8 = self.scheme in ("int8-static", "int8-dynamic")
        if self.weight_block_size and (not int8 or self.weight_block_size & (self.weight_block_size - 1)
                                       or self.weight_block_size < 2):
            raise PassError(f"pass 'quantize': option 'weight_block_size' = {self.weight_block_size} "
                            + ("needs scheme int8-static or int8-dynamic" if not int8 else "is not a power of two")
                            + "; use 0 (one scale per output channel) or 16, 32, 64 with an int8 scheme")
        if self.weight_block_size and not self.per_channel:
            raise PassError("pass 'quantize': weight_block_size > 0 gives blocks of each output channel, but "
                            "per_channel = false asks for one scale per tensor; set one of them, not both")
        if self.rounding == "adaround" and not int8:
            raise PassError(f"pass 'quantize': rounding = 'adaround' learns the rounding of int8-scheme weights; "
                            f"scheme {self.scheme!r} has its own weight format: use scheme int8-static (bits = 4 "
                            "for W4A8) or rounding = 'nearest'")
        if isinstance(self.speed_guard, str) and self.guard_mode == "replay":
            from slimfx.passes.quantize.speed import load_decisions

            if not self.speed_guard.strip():
                raise PassError("pass 'quantize': option 'speed_guard' is empty; give \"measure\", \"off\" or the "
                                "path of a decisions file (an earlier compile's report.json)")
            load_decisions(self.speed_guard)  # PassError naming the file now, before any work
        if not self.speed_guard_batches or any(b < 1 for b in self.speed_guard_batches):
            raise PassError(f"pass 'quantize': option 'speed_guard_batches' must list batch sizes >= 1, got "
                            f"{self.speed_guard_batches}; e.g. [1, 32], or set speed_guard = false")

    @property
    def guard_mode(self) -> Literal["measure", "off", "replay"]:
        """What `speed_guard` asks for: measure, off, or replay the decisions in a file."""
        v = self.speed_guard
        if v is True or v == "measure":
            return "measure"
        if v is False or v == "off":
            return "off"
        return "replay"

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.scheme != "int8-dynamic" or self.bias_correction or self.rounding == "adaround"

    def check_context(self, ctx: PassContext) -> str | None:
        from slimfx.passes.finetune import check_train_data, data_problem

        problem = data_problem(ctx.calibration_data, "calibration data")
        if self.scheme != "int8-dynamic" and problem:
            return (f"quantize (scheme {self.scheme}) needs calibration data to set activation ranges, but "
                    f"{problem}: give an iterable of input tuples (a few hundred samples), or use scheme "
                    "'int8-dynamic'")
        if self.bias_correction and problem:
            return f"quantize with bias_correction needs calibration data, but {problem}: give an iterable of input tuples"
        if self.rounding == "adaround" and problem:
            return (f"quantize with rounding = 'adaround' learns the rounding on calibration data, but {problem}: "
                    "give an iterable of input tuples, or use rounding = 'nearest'")
        if self.qat_epochs > 0:
            missing = check_train_data(ctx, step=self._qat_step(),
                                       required=self.qat_required, required_option="qat_required",
                                       off="set qat_epochs = 0")
            if missing:
                return missing
        if self.max_accuracy_drop is not None and ctx.eval_fn is None:
            return "quantize with max_accuracy_drop needs an eval function (module -> accuracy)"
        return None

    def check_graph(self, graph: Graph) -> str | None:
        done = already_quantized(graph)
        if done:
            return done
        other = sorted({str(t.dtype).replace("torch.", "") for t in graph.params.values()
                        if t.is_floating_point() and t.dtype != torch.float32})
        if other:
            return (f"quantize starts from a float32 model and this one is {', '.join(other)}: convert it with "
                    ".float() in your model factory (float16 models compile with recipes that do not quantize, "
                    "such as cleanup, prune50 and sparse50)")
        if self.guard_mode == "replay" and self.scheme in ("int8-static", "int8-dynamic"):
            from slimfx.passes.quantize.speed import load_decisions

            missing = [n for n in load_decisions(str(self.speed_guard))["kept_float"] if not graph.has_node(n)]
            if missing:
                return (f"speed_guard: the decisions file {self.speed_guard} keeps float {', '.join(missing[:3])}, "
                        "which this model does not have (recorded for another model or recipe?); re-measure with "
                        "speed_guard = \"measure\"")
        return check_skip(graph, self.skip)

    # -- driver ---------------------------------------------------------------------------------------
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        done = already_quantized(graph)
        if done:  # the driver refuses it before any work (check_graph); a pass run by itself, here
            raise PassError(f"pass 'quantize': {done}")
        self._rounding_cache = None  # AdaRound's per-layer results live for one run (see apply)
        notes = self._run_prerequisites(graph, ctx) if self.prerequisites else []
        # the guard weighs onnxruntime's integer kernels against float: the int8 schemes layer by layer and
        # as a whole; int8-dynamic as a whole model only (its layers quantize their input at run time, so they
        # have no integer tensors around them to be timed between); the storage schemes (fixed-point, sign) as
        # a whole against the same stored weights computed in float (their weights are never traded back)
        storage = self.scheme in STORAGE_SCHEMES
        guard = self.guard_mode != "off" and (self.scheme in ("int8-static", "int8-dynamic") or storage)
        timed = ctx.measure_ms is not None or self.guard_mode == "replay"
        float_graph = graph.copy() if guard and timed else None
        result = self._quantize(graph, ctx)
        if guard:
            result = (self._storage_guard if storage else self._speed_guard)(graph, float_graph, result, ctx)
        if self.align_channels and result.changed:
            # after the guard: it weighs the layers as they are; padding only speeds up the conv it pads
            aligned = align_input_channels(result.graph_after(graph))
            if aligned:
                result.stats["aligned_channels"] = aligned
        result.stats["notes"] = notes + result.stats.get("notes", [])
        result.changed = result.changed or bool(notes)
        return result

    def _quantize(self, graph: Graph, ctx: PassContext) -> PassResult:
        if self.max_accuracy_drop is not None or self.min_sqnr_db is not None:
            from slimfx.passes.quantize.tune import tune

            return tune(self, graph, ctx)
        return self.apply(graph, ctx)

    def _run_prerequisites(self, graph: Graph, ctx: PassContext) -> list[str]:
        """Run each of PREREQUISITES that still has work on the graph (the pipeline did not run it before
        quantize); a note for each that changed something."""
        from slimfx.passes.base import create_pass

        notes = []
        for name in self.PREREQUISITES:
            res = create_pass(name).run(graph, ctx)
            if res.graph is not None:  # pragma: no cover - the prerequisites edit in place
                raise PassError(f"quantize: prerequisite {name} returned a new graph; run it before quantize")
            if res.changed:
                done = ", ".join(f"{k} {v}" for k, v in res.stats.items() if isinstance(v, int) and v)
                notes.append(f"ran {name} first ({done}): the recipe quantizes without it, which leaves float ops "
                             f"between integer kernels (about 2x slower than fp32); put {name} before quantize "
                             "(or set prerequisites = false to quantize as is)")
        return notes

    def _speed_guard(self, graph: Graph, float_graph: Graph | None, result: PassResult,
                     ctx: PassContext) -> PassResult:
        """Keep float the layers whose integer kernel is clearly slower, or the whole model when int8 still loses
        (measured side by side, passes/quantize/speed.py), or replay recorded decisions."""
        if float_graph is None or not result.changed:
            if float_graph is None:
                result.stats["speed_guard"] = speed.UNTIMED
            return result
        batches = list(dict.fromkeys(self.speed_guard_batches))
        before = list(result.stats.get("fallback_layers", []))

        def requantize(g: Graph, skip: list[str]) -> PassResult:
            return self._requantize_with(g, ctx, result, skip + [n for n in before if n not in skip])

        if self.guard_mode == "replay":
            decisions = speed.load_decisions(str(self.speed_guard))
            why = f"recorded in {self.speed_guard}"
            chosen = speed.FLOAT if decisions["model"] == "float" else speed.FEWER if decisions["kept_float"] \
                else speed.INT8
            candidates = {speed.INT8: (graph, None)}
            if chosen == speed.FEWER:
                fewer = float_graph.copy()
                candidates[chosen] = (fewer, requantize(fewer, decisions["kept_float"]))
            section = {"mode": f"replay {self.speed_guard}", "chosen": chosen, "decisions": decisions,
                       "kept_float": {n: why for n in decisions["kept_float"]} if chosen == speed.FEWER else {}}
            at = f"({why}, not timed)"
        else:
            chosen, candidates, section = speed.measure_and_choose(
                ctx.measure_ms, graph, float_graph, requantize, batches, self.speed_guard_seconds,
                self.speed_guard_rounds, per_layer=self.scheme == "int8-static",
                original=self._original_graph(ctx) if self.speed_guard_against == "original" else None)
            at = f"at batch {'/'.join(map(str, batches))} on onnxruntime (1 thread)"
        if chosen == speed.FLOAT:
            section["kept_model_float"] = True
            if "model_verdict" in section:
                v = section["model_verdict"]
                tried = "; ".join(f"{k}: " + ", ".join(f"{v[k][f'b{b}']:.2f}x" for b in batches)
                                  + f" (noise ±{v[k]['spread']:.2f})" for k in v)
                note = f"speed guard kept the whole model float: int8 ran clearly slower than fp32 {at} ({tried})"
            else:
                note = f"speed guard kept the whole model float {at}"
            tuned = {k: result.stats[k] for k in ("tune", "float_accuracy") if k in result.stats}
            tune_notes = _tune_notes(result.stats)
            if "tune" in tuned:  # what the tuner chose is not what is written: say so where its choice is listed
                tuned["tune"] = {**tuned["tune"], "shipped": "the whole model float: the speed guard found the tuned "
                                                             "model slower than fp32 (this step's speed_guard)"}
            return PassResult(True, {"speed_guard": section, "notes": tune_notes + [note], "quantized_ops": 0,
                                     "skipped": result.stats.get("skipped", []), **tuned}, graph=float_graph)
        out_graph, res = candidates[chosen]
        if res is not None:
            result = res
        notes = []
        if chosen == speed.FEWER or chosen.startswith(speed.PREFIX):
            kept = section["kept_float"]
            why = ("where onnxruntime's int8 kernel is slower than float" if chosen == speed.FEWER else
                   "as a float prefix (the first layers, whose int8 kernels are not faster; the model with them "
                   "float was clearly faster)")
            notes.append(f"speed guard kept {len(kept)} layer(s) float {why} {at}: "
                         + "; ".join(f"{k}: {v}" for k, v in list(kept.items())[:4]) + ("; ..." if len(kept) > 4 else ""))
            if isinstance(result.stats.get("tune"), dict):
                result.stats["tune"] = {**result.stats["tune"], "shipped": (
                    f"the tuner's float layers and {len(kept)} more the speed guard kept float "
                    f"({', '.join(kept)}): this step's speed_guard")}
        result.stats["speed_guard"] = section
        result.stats["notes"] = notes + result.stats.get("notes", [])
        return result if out_graph is graph else PassResult(result.changed, result.stats, graph=out_graph)

    def _storage_guard(self, graph: Graph, float_graph: Graph | None, result: PassResult,
                       ctx: PassContext) -> PassResult:
        """A storage scheme (fixed-point, sign) keeps its weights whatever the timings say; what it may trade is
        where they are computed. The int8 model (onnxruntime's integer kernels) is timed side by side with the
        same stored weights computed in float (`qdq.weight_only`: no activation quantization; the exporter
        writes those weights in a form onnxruntime folds at load), with float prefixes (the first 1 to
        speed.PREFIX_LIMIT layers computed in float, the rest int8) and with the float graph quantize started
        from; `storage_choice` picks the fastest of them that is not slower than float at any batch size."""
        from slimfx.passes.quantize.qdq import weight_only

        if float_graph is None or not result.changed:
            if float_graph is None:
                result.stats["speed_guard"] = speed.UNTIMED
            return result
        wo = graph.copy()
        removed = weight_only(wo)
        layers = [n.name for n in speed.quantized_layers(graph)]

        def prefix(k: int) -> Graph:
            g = graph.copy()
            weight_only(g, through=layers[k - 1])
            return g

        batches = list(dict.fromkeys(self.speed_guard_batches))
        prefixes: dict[str, Graph] = {}  # the float-prefix candidates built (timed), by variant name
        if self.guard_mode == "replay":
            decisions = speed.load_decisions(str(self.speed_guard))
            kept = [n for n in layers if n in decisions["kept_float"]]
            k = layers.index(kept[-1]) + 1 if kept else 0
            chosen = WEIGHT_ONLY if decisions["model"] == "float" else speed.prefix_variant(k) if k else speed.INT8
            section: dict = {"mode": f"replay {self.speed_guard}", "decisions": decisions}
            at = f"(recorded in {self.speed_guard}, not timed)"
        else:
            lengths = {speed.prefix_variant(k): k for k in range(1, min(speed.PREFIX_LIMIT, len(layers) - 1) + 1)}
            prefixes = {v: prefix(k) for v, k in lengths.items()}
            times = speed.interleaved_times(ctx.measure_ms, {speed.INT8: graph, **prefixes, WEIGHT_ONLY: wo,
                                                             speed.FLOAT: float_graph},
                                            batches, self.speed_guard_seconds, self.speed_guard_rounds)
            vs = {k: speed.compare(times, k, speed.FLOAT, batches) for k in (speed.INT8, *prefixes, WEIGHT_ONLY)}
            chosen = speed.storage_choice({k: v for k, v in vs.items() if k != WEIGHT_ONLY}, WEIGHT_ONLY)
            k = lengths.get(chosen, 0)
            section = {"mode": "measure", "batches": batches, "rounds": self.speed_guard_rounds, "rule": speed.STORAGE_RULE,
                       "against": "input",
                       "model_ratio": {k: {f"b{b}": round(r, 3) for b, r in zip(batches, v.per_batch)}
                                       for k, v in vs.items()},
                       "model_verdict": {k: v.to_dict(batches) for k, v in vs.items()},
                       "model_ms": {k: [[round(t, 4) for t in row] for row in v] for k, v in times.items()}}
            at = ("at batch " + "/".join(map(str, batches)) + " on onnxruntime (1 thread): int8 "
                  + ", ".join(f"{r:.2f}x" for r in vs[speed.INT8].per_batch)
                  + f" of fp32 (noise ±{vs[speed.INT8].spread:.2f})"
                  + (f", {chosen} " + ", ".join(f"{r:.2f}x" for r in vs[chosen].per_batch) if k else "")
                  + ", weight-only " + ", ".join(f"{r:.2f}x" for r in vs[WEIGHT_ONLY].per_batch))
        kept_float = {n: f"{self.scheme} weights computed in float (a float prefix)" for n in layers[:k]}
        section.update({"storage": f"{WEIGHT_ONLY}: the same {self.scheme} weights, dequantized when onnxruntime "
                                   f"loads the file, activations float ({removed} activation quantizations fewer)",
                        "chosen": chosen, "kept_float": kept_float,
                        "decisions": {"model": "float" if chosen == WEIGHT_ONLY else "int8",
                                      "kept_float": list(kept_float), "batches": batches}})
        result.stats["speed_guard"] = section
        if chosen == speed.INT8:
            return result
        if k:
            result.stats["notes"] = [f"speed guard computes the first {k} layer(s) ({', '.join(layers[:k])}) in float "
                                     f"with their {self.scheme} weights (a float prefix; the file stores the same "
                                     f"weights): faster than all-int8 and not slower than fp32 {at}"
                                     ] + result.stats.get("notes", [])
            return PassResult(result.changed, result.stats, graph=prefixes[chosen] if chosen in prefixes else prefix(k))
        result.stats["weight_only"] = True
        result.stats["notes"] = [f"speed guard kept the {self.scheme} weights but computes them in float "
                                 f"(weight-only; the file stores the same weights): onnxruntime's int8 kernels ran "
                                 f"slower than fp32 {at}"] + result.stats.get("notes", [])
        return PassResult(result.changed, result.stats, graph=wo)

    def _original_graph(self, ctx: PassContext) -> Graph | None:
        """The original model (ctx.teacher) as a graph to time, or None (then the guard compares with its
        input, and its stats say so)."""
        from slimfx.ir import capture

        t = ctx.teacher
        if isinstance(t, Graph):
            return t
        if isinstance(t, torch.nn.Module):
            try:
                return capture(t, ctx.example_inputs, for_inference=True)
            except Exception as e:  # noqa: BLE001 - a model the driver captured with keyword inputs, say
                ctx.logger.warning("quantize: speed_guard_against = 'original': the original model could not be "
                                   "captured again (%s); comparing with quantize's input instead", e)
        return None

    def _requantize_with(self, graph: Graph, ctx: PassContext, before: PassResult, skip: list[str]) -> PassResult:
        """Quantize again keeping `skip` float, the accuracy fallback's layers included."""
        res = self.apply(graph, ctx, extra_skip=skip)
        res.stats["notes"] = _tune_notes(before.stats) + res.stats.get("notes", [])
        for k in ("fallback_layers", "accuracy_drop", "trials", "tune", "float_accuracy", "accuracy",
                  "within_budget"):
            if k in before.stats:
                res.stats[k] = before.stats[k]
        return res

    def apply(self, graph: Graph, ctx: PassContext, *, only: set[str] | None = None,
              ranges: dict[str, Range] | None = None, extra_skip: list[str] | None = None) -> PassResult:
        """Quantize `graph` in place (only the ops named in `only`, when given; not those in `extra_skip`)."""
        # the float graph, for bias correction and AdaRound's targets
        reference = graph.copy() if self.bias_correction or self.rounding == "adaround" else None
        dynamic = self.scheme == "int8-dynamic"
        skip = list(self.skip) + list(extra_skip or [])
        if self.float_first:
            skip += _short_first_layer(graph)
        if not dynamic:
            expand_for_integer_kernels(graph)
        plan = make_plan(graph, skip=skip, only=only, weight_only=dynamic)
        embeds = tables_to_store(graph, plan, skip=skip, only=only) \
            if self.embeddings and self.scheme in ("int8-static", "int8-dynamic") else []
        floats = kept_float(graph)
        if not plan.weight_ops and not plan.act_ops and not embeds:
            return PassResult(False, {"quantized_ops": 0, "skipped": plan.skipped, "kept_float": floats,
                                      "notes": _notes({}, {}, floats)})
        degenerate: dict[str, str] = {}
        if not dynamic and ranges is None:
            ranges = self.calibrate(graph, plan, ctx)
        if not dynamic:
            plan = self._keep_nonfinite_float(graph, plan, ranges, skip, only, degenerate)
        qat = self._train_fake_quant(graph, plan, ranges, ctx) if self.qat_epochs > 0 else None
        alias = graph.param_aliases()  # a tied table and its head: one tensor before, whatever its names
        before = sum(graph.params[k].numel() * graph.params[k].element_size()
                     for k in {alias[p.name] for n in plan.weight_ops + embeds for p in n.params()})
        heads = tied_heads(graph, embeds)
        act_qp = {} if dynamic else self.activation_qparams(plan, ranges or {})
        for name, qp in act_qp.items():
            lo, hi = ranges[name] if name in (ranges or {}) else (None, None)  # type: ignore[index]
            if lo is not None and float(lo) == float(hi) == 0.0:
                degenerate[name] = f"all zero on the calibration data: scale {float(qp.scale):.3g}, stays 0"
        for name, qp in act_qp.items():
            t = graph.node(name)
            insert_qdq(graph, t, qp, users=[u for u in t.users if u.op not in ("quantize",)])
        n_dyn = self._insert_dynamic(graph, plan) if dynamic else 0
        lowbit = self.lowbit_ops(plan)
        if self.rounding == "adaround" and getattr(self, "_rounding_cache", None) is None:
            self._rounding_cache: dict = {}  # learned roundings, reused when this pass quantizes again
        rounder = Rounder(self, graph, reference, ctx, self._rounding_cache) if self.rounding == "adaround" else None
        layers = plan.weight_ops if rounder is None else progress(
            plan.weight_ops, desc=f"adaround ({self.adaround_iters} steps a layer)", quiet=ctx.quiet,
            total=len(plan.weight_ops))
        raised = {n.name: self._fold(graph, n, lowbit.get(n.name), rounder) for n in layers}
        for n in embeds:
            if n.name in heads and lookup_head_codes(graph, n, heads[n.name]) is not None:
                continue  # the head's codes serve as the table
            w = graph.params[n.inputs[1].name]
            qmax = 2 ** (self.bits - 1) - 1  # a table lookup multiplies nothing: the full range is safe
            quantize_embedding(graph, n, qparams_from_range(w.min(), w.max(), torch.int8, symmetric=True,
                                                            qmin=-qmax, qmax=qmax))
        collapsed = collapse_requantize(graph)
        graph.remove_unused_params()
        corrected = correct_biases(graph, reference, ctx) if reference is not None and self.bias_correction else None
        after = _stored_weight_bytes(graph, embeds)
        raised_layers = {k: v for k, v in raised.items() if v}
        return PassResult(True, {
            "notes": _notes(raised_layers, degenerate, floats),  # for the report's headline
            "scheme": self.scheme, "quantized_ops": len(plan.weight_ops) + len(plan.act_ops),
            "embeddings": len(embeds), "activation_qdq": len(act_qp), "dynamic_activations": n_dyn, "collapsed": collapsed,
            "skipped": plan.skipped, "weight_bytes": {"before": before, "after": after},
            "lowbit": {k: v for k, v in lowbit.items() if v is not None},
            # layers whose int32 bias would have saturated (an all-zero weight row, an input that was
            # constantly 0): the weight scale of these output channels was raised to keep the bias exact
            "bias_scale_raised": raised_layers,
            # activations whose calibrated range is exactly [0, 0] or holds NaN/Inf (see calibrate)
            "degenerate_ranges": degenerate,
            "kept_float": floats,  # layers with weights left float (KEPT_FLOAT), and why
            **({"qat": qat} if qat is not None else {}),
            **({"adaround": rounder.stats()} if rounder is not None else {}),
            **({"bias_correction": corrected} if corrected is not None else {})})

    def _qat_step(self) -> str:
        return f"pass 'quantize' (qat_epochs = {self.qat_epochs})"

    def _qat_skipped(self, ctx: PassContext) -> str | None:
        """None when QAT trains; 'skipped: no train data' when there is none and qat_required is false
        (the rule finetune and distill follow); a PassError when it is required or the data is empty."""
        from slimfx.passes.finetune import train_or_skip

        reason = train_or_skip(ctx, step=self._qat_step(),
                               required=self.qat_required, required_option="qat_required",
                               off="set qat_epochs = 0")
        return None if reason is None else f"skipped: {reason}"

    def _keep_nonfinite_float(self, graph: Graph, plan: Plan, ranges: dict[str, Range] | None, skip: list[str],
                              only: set[str] | None, degenerate: dict[str, str]) -> Plan:
        """Keep float every op that reads an activation holding NaN or Inf on the calibration data (its range
        has no scale); re-plans without them. The ranges of the tensors still planned stay valid: a plan
        with more ops skipped quantizes a subset of the tensors."""
        def finite(src: str) -> bool:
            lo, hi = ranges[src]  # type: ignore[index]
            return bool(torch.isfinite(lo).all() and torch.isfinite(hi).all())

        extra: list[str] = []
        while True:
            bad = {name for name, src in plan.tensors.items() if not finite(src)}
            if not bad:
                return plan
            # the quantized ops that read a bad tensor, or write it (a conv's output is quantized after it)
            owners = {t: [n for n in graph if n.name not in extra and (
                (n.op in WEIGHT_OPS or n.op in ACT_OPS or n.op in OUTPUT_QUANT_OPS)
                and any(isinstance(a, Node) and through_noops(a).name == t for a in n.inputs)
                or n in plan.weight_ops and clipped(n).name == t)] for t in bad}
            if not any(owners.values()):  # pragma: no cover - every planned tensor has an owner in the plan
                raise PassError(f"quantize: activation %{sorted(bad)[0]} holds NaN or Inf on the calibration data")
            for t in sorted(bad):
                degenerate[t] = f"NaN or Inf on the calibration data: kept float {', '.join(n.name for n in owners[t])}"
            extra += list(dict.fromkeys(n.name for ns in owners.values() for n in ns))
            plan = make_plan(graph, skip=skip + extra, only=only)

    # -- calibration -----------------------------------------------------------------------------------
    def calibrate(self, graph: Graph, plan: Plan, ctx: PassContext) -> dict[str, Range]:
        """Observed (lo, hi) of every activation the plan quantizes; (nan, nan) for one that held NaN or
        Inf on some batch (`apply` keeps the ops reading it float)."""
        batches = calibration_batches(ctx)
        names = plan.sources
        dtype = DTYPES[self.activation_dtype]
        observers = {n: make_observer(self.calibration, dtype=dtype, symmetric=self.activation_symmetric,
                                      percentile=self.percentile) for n in names}
        nonfinite: set[str] = set()

        def sink(name: str, v: torch.Tensor) -> None:
            if name in nonfinite or not bool(torch.isfinite(v).all()):
                nonfinite.add(name)
            else:
                observers[name].update(v)

        collect(graph, batches, names, sink, quiet=ctx.quiet)
        nan = torch.tensor(float("nan"))
        return {n: (nan, nan) if n in nonfinite else o.range() for n, o in observers.items()}

    def activation_qparams(self, plan: Plan, ranges: dict[str, Range]) -> dict[str, QParams]:
        out: dict[str, QParams] = {}
        cache: dict[str, QParams] = {}
        for name, src in plan.tensors.items():
            if src not in cache:
                if src not in ranges:
                    raise PassError(f"quantize: no calibrated range for %{src}")
                lo, hi = ranges[src]
                if self.scheme == "fixed-point":
                    cache[src], _ = pow2_qparams(lo, hi, self.bits, self.frac_bits, unsigned=bool(lo >= 0))
                else:
                    cache[src] = qparams_from_range(lo, hi, DTYPES[self.activation_dtype],
                                                    symmetric=self.activation_symmetric)
            out[name] = cache[src]
        return out

    # -- weights ---------------------------------------------------------------------------------------
    def lowbit_ops(self, plan: Plan) -> dict[str, str | None]:
        """Which weight ops use the scheme's own weight format ('sign', 'fixed-point') vs plain int8."""
        kinds: dict[str, str | None] = {}
        for i, n in enumerate(plan.weight_ops):
            edge = i in (0, len(plan.weight_ops) - 1)
            if self.scheme == "sign":
                kinds[n.name] = None if (edge and self.keep_first_last) else "sign"
            elif self.scheme == "fixed-point":
                kinds[n.name] = "fixed-point"
            elif self.bits < 8:  # int8 schemes with fewer weight bits
                kinds[n.name] = None if (edge and self.keep_first_last) else "low-bit"
            else:
                kinds[n.name] = None
        return kinds

    def weight_qmax(self, kind: str | None) -> int:
        """Weights are stored in the symmetric integer range [-qmax, qmax]."""
        if kind == "sign":
            return 1
        if kind == "fixed-point":  # power-of-two scales: 7 bits under reduce_range
            return 2 ** (self.weight_bits(kind) - 1) - 1
        qmax = 2 ** (self.bits - 1) - 1 if kind == "low-bit" else 127
        return min(qmax, 64) if self.reduce_range else qmax

    def weight_bits(self, kind: str | None) -> int:
        return min(self.bits, 7) if self.reduce_range and kind == "fixed-point" else self.bits

    def weight_qparams(self, w: torch.Tensor, kind: str | None, axis: int | None = 0
                       ) -> tuple[QParams, torch.Tensor | None]:
        """Params (and, for sign, the integer values) for one weight tensor whose output channels lie along
        `axis` (None: no single axis holds them, so one scale for the tensor)."""
        flat = w.movedim(axis, 0).reshape(w.shape[axis], -1) if axis is not None else w.reshape(1, -1)
        if kind == "sign":
            alpha = flat.abs().mean(dim=1).clamp(min=SCALE_FLOOR)
            values = torch.where(w >= 0, 1, -1).to(torch.int8)
            if axis is None:
                return QParams(alpha.float().reshape(()), torch.zeros((), dtype=torch.int8), torch.int8, None), values
            return QParams(alpha.float(), torch.zeros(w.shape[axis], dtype=torch.int8), torch.int8, axis), values
        if kind == "fixed-point":
            qp, _ = pow2_qparams(w.min(), w.max(), self.weight_bits(kind), self.frac_bits)
            return qp, None
        qmax = self.weight_qmax(kind)
        per_tensor = qparams_from_range(w.min(), w.max(), torch.int8, symmetric=True, qmin=-qmax, qmax=qmax)
        if not self.per_channel or axis is None:
            return per_tensor, None
        if self.weight_block_size and axis == 0 and w.dim() >= 2 and w.shape[1] >= self.weight_block_size:
            return blocked_qparams(w, self.weight_block_size, qmax), None
        per_channel = qparams_from_range(flat.min(dim=1).values, flat.max(dim=1).values, torch.int8,
                                         symmetric=True, axis=axis, qmin=-qmax, qmax=qmax)
        if self.per_channel_min_gain_db > 0:
            from slimfx.ir.metrics import tensor_sqnr_db as sqnr_db

            def weight_sqnr(qp: QParams) -> float:
                shape = [1] * w.dim()
                if qp.axis is not None:
                    shape[qp.axis] = -1
                scale = qp.scale.reshape(shape) if qp.axis is not None else qp.scale
                return sqnr_db(w.double(), (quantize_tensor(w, qp).clamp(-qmax, qmax).double() * scale))

            if weight_sqnr(per_channel) - weight_sqnr(per_tensor) < self.per_channel_min_gain_db:
                return per_tensor, None
        return per_channel, None

    def _train_fake_quant(self, graph: Graph, plan: Plan, ranges: dict[str, Range] | None, ctx: PassContext) -> str:
        """QAT (or why it was skipped), for stats["qat"]. The activation ranges stay the ones the network trains
        through: calibrating again on the trained weights moved the clipping it had learned to rely on, and the
        model shipped was not the one trained (docs/quantization.md, QAT)."""
        from slimfx.passes.quantize.qat import finetune_fake_quant

        skipped = self._qat_skipped(ctx)
        if skipped is not None:
            return skipped
        losses = finetune_fake_quant(self, graph, plan, ranges or {}, ctx)
        return f"{len(losses)} epochs, loss {losses[0]:.4g} -> {losses[-1]:.4g}"

    def _fold(self, graph: Graph, n: Node, kind: str | None, rounder: Rounder | None = None) -> list[int]:
        """Fold the weight (and the bias, as int32) of `n`, rounded by `rounder` when given (else to nearest);
        returns the output channels whose weight scale was raised to keep the int32 bias exact (see
        `fit_bias`). A blocked weight keeps a float bias (no one weight scale per output channel)."""
        w = graph.params[n.inputs[1].name]
        qp, values = self.weight_qparams(w, kind, weight_axis(n))
        qmax = self.weight_qmax(kind)
        x = through_noops(n.inputs[0])
        s_x = graph.params[x.inputs[1].name] \
            if isinstance(x, Node) and x.op == "dequantize" and self.scheme != "int8-dynamic" else None
        raised: list[int] = []
        if qp.block_size:
            s_x = None
        if s_x is not None and s_x.dim() == 0 and len(n.inputs) > 2 and isinstance(n.inputs[2], Param):
            try:
                qp, raised = fit_bias(qp, s_x, graph.params[n.inputs[2].name], layer_weight(n, w)[0].numel(),
                                      pow2=kind == "fixed-point")
            except PassError as e:
                raise PassError(f"quantize: %{n.name}: {e}; keep the layer float with skip = [{n.name!r}]") from e
        if rounder is not None and values is None:
            values = rounder.round(n, w, qp, qmax)
        w_dq = fold_weight(graph, n, 1, qp, qmin=-qmax, qmax=qmax, values=values,
                           bits=self.bits if kind == "low-bit" else None)
        if s_x is not None and s_x.dim() == 0:
            fold_bias(graph, n, s_x, qp.scale, qp.axis, factors=(x.inputs[1], w_dq.inputs[1]))
        return raised

    # -- dynamic activations ---------------------------------------------------------------------------
    def _insert_dynamic(self, graph: Graph, plan: Plan) -> int:
        """x -> dynamic_quantize -> dequantize before every quantized linear/matmul (conv stays float input:
        onnxruntime has no fast dynamic conv kernel)."""
        done: dict[str, Node] = {}
        for n in plan.weight_ops:
            x = n.inputs[0]
            if n.op != "linear" or not isinstance(x, Node):
                continue
            if x.name not in done:
                shape = x.meta.shape
                tup = graph.create_node("dynamic_quantize", (x,), {}, name=f"{x.name}_dynq", before=n,
                                        meta=(TensorMeta(shape, torch.uint8), TensorMeta((), torch.float32),
                                              TensorMeta((), torch.uint8)))
                parts = [graph.create_node("getitem", (tup,), {"index": i}, name=f"{x.name}_dynq_{k}", before=n,
                                           meta=tup.meta[i]) for i, k in enumerate(("q", "scale", "zp"))]
                done[x.name] = graph.create_node("dequantize", tuple(parts), {"axis": None}, name=f"{x.name}_dyndq",
                                                 before=n, meta=TensorMeta(shape, torch.float32))
            n.replace_input(x, done[x.name])
        return len(done)

