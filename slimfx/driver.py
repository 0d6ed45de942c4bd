"""slimfx.compile(): resolve -> capture -> passes -> export -> evaluate -> measure -> gate -> write.

The driver is the only place that knows the order of things: passes never call exporters and exporters
never run passes. Each stage is one function below; `compile` calls them in order. Every check that can
fail on the user's input runs in `_resolve`, before any work; the gate runs before anything is written.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from slimfx import ir
from slimfx.data import (
    GENERATED_MACS_BUDGET,
    GENERATED_SAMPLES,
    Data,
    accuracy,
    check_finite,
    check_like_example,
    correct,
    generated_batches,
    generated_sample_count,
)
from slimfx.exporters._common import as_tuple
from slimfx.ir.errors import DataError, ExportError, GateError, RecipeError, SlimfxError
from slimfx.ir.metrics import Comparison, sqnr_ceiling_db
from slimfx.output import OutputDir
from slimfx.passes import Pass, PassContext, PassManager
from slimfx.recipe import Recipe, load_recipe

log = logging.getLogger("slimfx")

FORMAT_FILES = {"onnx": "model.onnx", "torchscript": "model.pt", "pt2": "model.pt2", "slimfx": "model.slimfx"}
DEFAULT_RECIPE = "default"
# Fresh sessions of one file land up to 10-15% apart here; only a clearer slowdown is worth a warning, and
# only when the fastest tenth of the calls (which a busy machine disturbs least) shows it too.
SLOWER_WARN_RATIO = 1.2
DEFAULT_BENCH_SECONDS = 3.0


@dataclass
class CompileResult:
    """What compile() produced: the final IR, a runnable module, the exported files and the report."""

    graph: ir.Graph
    module: fx.GraphModule
    exports: dict[str, Path]
    report: dict[str, Any]
    out_dir: Path | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Job:
    """Everything `_resolve` checked and settled before any work."""

    model: nn.Module
    run_model: Callable[..., Any]
    example: tuple
    capture_args: tuple[tuple, dict[str, Any] | None]
    recipe: Recipe
    pipeline: list[Pass]
    formats: tuple[str, ...]
    data: Data
    ctx: PassContext
    gate_split: Iterable | None  # None: inputs generated like the example (made after capture checked them)
    gate_split_name: str
    accuracy_split: Iterable | None
    accuracy_split_name: str | None
    output: OutputDir | None
    keep_rejected: bool
    name: str
    quiet: bool
    bench_seconds: float
    check_numerics: bool
    print_ir: bool = False
    dynamic_batch: bool = True  # False: files fixed at the example's batch size, data run in chunks of it
    dynamic_dims: Any = None  # what the user asked for (ir.symdims); None: the defaults
    graph: ir.Graph | None = None  # resume: the saved graph to continue from (no capture)
    headline: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    class_dims: dict[str, Any] = field(default_factory=dict)  # where outputs hold classes (top-1), from the IR


# --- the entry point ---------------------------------------------------------------------------------------

def compile(model: nn.Module | ir.Graph | str | Path, example_inputs: Any = None, recipe: str | Path | Recipe = DEFAULT_RECIPE, *,  # noqa: A001
            data: Data | None = None, example_kwargs: dict[str, Any] | None = None,
            calibration_data: Iterable | None = None, train_data: Iterable | None = None,
            test_data: Any = None, eval_fn: Callable[[nn.Module], float] | None = None,
            out_dir: str | Path | None = None, formats: Sequence[str] | str | None = None, force: bool = False,
            keep_rejected: bool = False, check_numerics: bool = True, name: str | None = None,
            quiet: bool = False, seed: int = 0, bench_seconds: float = DEFAULT_BENCH_SECONDS,
            print_ir: bool = False, dynamic_batch: bool = True, dynamic_dims: Any = None) -> CompileResult:
    """Compile `model` with a recipe: capture, run its passes, export, check and report.

    model: an nn.Module, or (resume) an ir.Graph / the path of a `.slimfx` file saved by an earlier compile
        (`slimfx.save`): the recipe continues from that IR, which is also the reference the gate compares
        with; example inputs default to ones made from its stored input metas.

    recipe: a built-in name (`slimfx passes`/README list them; default "default"), a TOML path, or a `Recipe`.
    data: a `slimfx.Data` (train / validation / test / calibration parts). The older keywords
        calibration_data, train_data and test_data (`(inputs, labels)`) fill the same parts.
    eval_fn: module -> accuracy in [0, 1] on YOUR VALIDATION data (it picks best epochs; never test data).
    formats: what to export ("onnx", "torchscript", "pt2", "slimfx"); default: the recipe's [export] formats.
    out_dir: written all at once, only when every step and the recipe's [validate] gate pass; an existing
        non-empty directory is replaced only with force=True. keep_rejected: on a failed gate, write the
        outputs to `OUT.rejected/` instead of nothing.
    bench_seconds: the one time budget of the latency report, all files and batch sizes together (0: no
        latency measurement).
    print_ir: print the IR after every pass that changed it (stdout).
    dynamic_batch: False for a model that runs at its example's batch size only (a literal batch size in a
        view): the files take that batch size, and calibration, the gate and the latency report run the
        data in chunks of it (CLI: --fixed-batch).
    dynamic_dims: which input dims the exported files keep dynamic, each under a name (ONNX dim_param,
        torch.export Dim). None (default): the batch, and the sequence of token inputs (integer [batch, seq],
        kept when the model runs at other lengths); names "batch,seq" / ("batch", "height", "width") put where
        they conventionally sit; per input like torch.onnx.export's dynamic_axes:
        {"input_ids": {0: "batch", 1: "seq"}}; "none": all fixed (CLI: --dynamic-dims). See docs/exporters.md.
    Raises SlimfxError subclasses for anything the user can fix (GateError when the gate fails).
    """
    t_start = time.perf_counter()
    job = _resolve(model, example_inputs, recipe, data=data, example_kwargs=example_kwargs,
                   calibration_data=calibration_data, train_data=train_data, test_data=test_data,
                   eval_fn=eval_fn, out_dir=out_dir, formats=formats, force=force, keep_rejected=keep_rejected,
                   check_numerics=check_numerics, name=name, quiet=quiet, seed=seed, bench_seconds=bench_seconds,
                   dynamic_batch=dynamic_batch, dynamic_dims=dynamic_dims)
    job.print_ir = bool(print_ir)
    with contextlib.ExitStack() as stack:
        stack.callback(job.model.train, job.model.training)  # the user's module is left in the mode it came in
        if job.output is not None:
            stack.enter_context(job.output)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="slimfx-")))
        progress = stack.enter_context(_progress(job))
        timer = _StageTimer()
        with timer("capture"):
            graph = _capture(job)
            if "slimfx" in job.formats:  # what a model file cannot hold is refused before any pass runs
                from slimfx.ir.serialize import check_saveable

                check_saveable(graph)
            baseline = _side_numbers(job, graph, _onnx_for_numbers(job, graph, tmp / "original.onnx", "original"))
        with timer("passes"):
            graph, records, stages = _run_passes(job, graph)
        with timer("export"):
            staging = job.output.stage if job.output is not None else tmp / "out"
            staging.mkdir(exist_ok=True)
            exports, export_details = _export(job, graph, staging)
            compressed_onnx = exports.get("onnx") or _onnx_for_numbers(job, graph, tmp / "compiled.onnx", "compiled")
            compressed = _side_numbers(job, graph, compressed_onnx)
        with timer("evaluate"):
            module = ir.lower(graph).eval()
            evaluation = _evaluate(job, module, exports.get("onnx"),
                                   macs_per_sample=baseline["macs"])
            failures = _gate(job, evaluation)
        _describe_exports(graph, exports, export_details)
        with timer("latency"):
            if failures:
                job.warnings.append("latency not measured: the compiled model failed its gate")
            else:
                _measure(job, baseline, compressed, exports, export_details, progress)
        report = _report(job, baseline, compressed, evaluation, records, stages, exports, export_details, t_start)
        report["timings"] = timer.seconds
        report["gate"] = {"passed": not failures, "failures": failures}
        final_exports, out_path = _write(job, report, staging, exports, failures)
    return CompileResult(graph, module, final_exports, report, out_path, report["stages"])


class _StageTimer:
    """Wall seconds of each named stage of a compile (report.json "timings")."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)


# fewer calibration inputs than this get a headline note: one batch's ranges are a guess at the data's
CALIBRATION_FEW = 32


# --- resolve: every check on the user's input, before any work ----------------------------------------------

def _resolve(model: Any, example_inputs: Any, recipe: Any, *, data: Data | None, example_kwargs: Any,
             calibration_data: Any, train_data: Any, test_data: Any, eval_fn: Any, out_dir: Any, formats: Any,
             force: bool, keep_rejected: bool, check_numerics: bool, name: str | None, quiet: bool, seed: Any,
             bench_seconds: Any, dynamic_batch: Any = True, dynamic_dims: Any = None) -> _Job:
    model, saved, example_inputs = _resume(model, example_inputs, example_kwargs)
    if not isinstance(model, nn.Module):
        raise SlimfxError(f"compile() takes a torch.nn.Module, an ir.Graph or a .slimfx file, got "
                          f"{type(model).__name__}")
    from slimfx.ir.capture import materialize_lazy, unwrap

    model = unwrap(model)  # torch.compile / DataParallel wrappers: the gate and the capture read the model itself
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise SlimfxError(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}")
    if isinstance(bench_seconds, bool) or not isinstance(bench_seconds, (int, float)) \
            or not math.isfinite(bench_seconds) or bench_seconds < 0:
        raise SlimfxError(f"bench_seconds must be a finite number >= 0 (0: no latency), got {bench_seconds!r}")
    for key, flag in (("dynamic_batch", dynamic_batch), ("force", force), ("keep_rejected", keep_rejected),
                      ("check_numerics", check_numerics), ("quiet", quiet)):
        if not isinstance(flag, bool):
            raise SlimfxError(f"{key} must be True or False, got {flag!r}")
    if eval_fn is not None and not callable(eval_fn):
        raise SlimfxError(f"eval_fn must be a function module -> accuracy in [0, 1], got {type(eval_fn).__name__}")
    if name is not None and not isinstance(name, str):
        raise SlimfxError(f"name must be a string (the report's model name), got {type(name).__name__}")
    dynamic_dims = check_dynamic_dims(dynamic_dims, dynamic_batch)
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    fmts = _formats(formats, rec)
    pipeline = rec.build_passes()  # RecipeError for unknown passes/options
    example, run_model, capture_args = _inputs(model, example_inputs, example_kwargs)
    check_finite(tuple(t for t in example if isinstance(t, torch.Tensor)), "the example inputs")
    materialize_lazy(model, *capture_args)  # before anything counts its parameters
    if data is None and calibration_data is None and train_data is None and test_data is None:
        data = rec.load_data()  # the recipe's own `data` key, when the call gives none
    data = _merge_data(data, calibration_data, train_data, test_data)
    rows = None if dynamic_batch else _batch_rows(example)
    calibration, job_headline = _calibration(data, example, rows, pipeline)
    train, validation, test = (_chunked(data.split(k), rows) for k in ("train", "validation", "test"))
    # accuracy on validation picks best epochs only when validation has labels; without them training steps keep
    # their lowest-loss epoch (accuracy() would give None, which no step can choose by)
    labelled = validation is not None and next(iter(validation))[1] is not None
    val_eval = _checked_eval_fn(eval_fn) if eval_fn is not None else (
        (lambda module: accuracy(module, validation)) if labelled else None)
    from slimfx.exporters import graph_latency_ms

    # passes that tune for speed (quantize's speed guard) time on onnxruntime, unless latency is off
    ctx = PassContext(example_inputs=example, calibration_data=calibration, train_data=train, eval_fn=val_eval,
                      teacher=model, seed=seed, quiet=quiet,
                      measure_ms=graph_latency_ms if bench_seconds > 0 else None)
    rec.check_context(pipeline, ctx)  # a step that needs data that was not given: RecipeError
    _check_first_batches(model, run_model, example, {"calibration": calibration if data.calibration is not None
                                                     else None, "train": train, "validation": validation,
                                                     "test": test})
    gate_split, gate_name = (validation, "validation") if validation is not None else \
        (test, "test") if test is not None else (None, "generated")
    acc_split, acc_name = (test, "test") if test is not None else (validation, "validation") \
        if validation is not None else (None, None)
    output = None
    if out_dir is not None:
        need = 3 * sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        output = OutputDir.claim(out_dir, force=force, need_bytes=need, flag="out_dir")
    return _Job(model=model, run_model=run_model, example=example, capture_args=capture_args, recipe=rec,
                pipeline=pipeline, formats=fmts, data=data, ctx=ctx, gate_split=gate_split, gate_split_name=gate_name,
                accuracy_split=acc_split, accuracy_split_name=acc_name, output=output, keep_rejected=keep_rejected,
                name=name or _default_name(model, saved), quiet=quiet, bench_seconds=float(bench_seconds),
                check_numerics=check_numerics, graph=saved, headline=job_headline, dynamic_batch=dynamic_batch,
                dynamic_dims=dynamic_dims)


def _check_first_batches(model: nn.Module, run_model: Callable[..., Any], example: tuple,
                         parts: dict[str, Any]) -> None:
    """Before any work, the first batch of every part the user gave: inputs like the example (number, dtype,
    rank), the model runs on them, and targets are class indices of its first output (DataError otherwise)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for name, part in parts.items():
                first = next(iter(part), None) if part is not None else None
                if first is None:
                    continue
                inputs, target = first if name != "calibration" else (first, None)
                check_like_example(f"data.{name}, batch 0", inputs, example)
                out = _run_original(run_model, inputs, name)
                if target is not None:
                    correct(out, target, f"data.{name}, batch 0: ")
    finally:
        model.train(was)


def check_dynamic_dims(value: Any, dynamic_batch: bool = True) -> Any:
    """`dynamic_dims` as users write it, checked for what can be checked without the model (its form, its
    names, a fixed batch that contradicts it); the string form is parsed. DynamicDimsError otherwise."""
    from slimfx.ir.symdims import DynamicDimsError, parse_dynamic_dims

    if value is None:
        return None
    if isinstance(value, str):
        value = parse_dynamic_dims(value)
    if isinstance(value, dict):
        named = {s for per in value.values() for s in (per.values() if isinstance(per, dict) else
                                                         ["batch"] if isinstance(per, (list, tuple)) and 0 in per
                                                         else [])}
    elif isinstance(value, (list, tuple)):
        named = set(value)
    else:
        raise DynamicDimsError(f"dynamic_dims must be None, names (\"batch,seq\" or a tuple of names) or "
                               f"{{input: {{dim: name}}}}, got {type(value).__name__} {value!r}")
    if not dynamic_batch and "batch" in named:
        raise DynamicDimsError("a fixed batch (`--fixed-batch` on the command line, dynamic_batch=False in Python) "
                               "and dynamic dims that name 'batch' contradict each other; give one of them")
    return value


def apply_dynamic_dims(graph: ir.Graph, value: Any, example: tuple) -> None:
    """Set the symbolic dims of a graph that is already captured (a saved one) from `value` (as
    slimfx.compile's dynamic_dims), and name every node's."""
    from slimfx.ir.symdims import propagate_symbols, resolve_dynamic_dims, set_graph_dims

    plan = resolve_dynamic_dims(value, [n.name for n in graph.inputs], list(example))
    set_graph_dims(graph, [plan.dims[n.name] for n in graph.inputs])
    propagate_symbols(graph, example)


def _batch_rows(example: tuple) -> int:
    x = example[0] if example else None
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else 1


def _macs_per_input(job: _Job, graph: ir.Graph) -> int:
    """The report's MACs: per input (one row of the batch), as the latency beside them is at batch 1; the
    graph's shapes are the example's, whose batch size is the user's choice."""
    return ir.count_macs(graph) // max(_batch_rows(job.example), 1)


class _Chunks:
    """A data split (or a list of calibration input tuples) as batches of exactly `rows` rows, for a model
    fixed at its example's batch size; rows that do not fill a last chunk are left out."""

    def __init__(self, source: Any, rows: int):
        self.source, self.rows = source, rows
        self.name = getattr(source, "name", "calibration")

    def __iter__(self):
        for item in self.source:
            pair = isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], tuple)
            inputs, target = item if pair else (item, None)
            n = len(inputs[0]) if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else 0
            for i in range(0, n - self.rows + 1, self.rows):
                xs = tuple(t[i:i + self.rows] if isinstance(t, torch.Tensor) and t.dim() else t for t in inputs)
                yield (xs, target[i:i + self.rows] if target is not None else None) if pair else xs


def _chunked(source: Any, rows: int | None) -> Any:
    if source is None or rows is None:
        return source
    return list(_Chunks(source, rows)) if isinstance(source, list) else _Chunks(source, rows)


def _resume(model: Any, example_inputs: Any, example_kwargs: Any) -> tuple[Any, ir.Graph | None, Any]:
    """(reference module, saved graph or None, example inputs) for a model given as an ir.Graph or a .slimfx
    path: the graph's lowering is the reference (and teacher); inputs default to ones made from its metas."""
    from slimfx.persist import SUFFIX, load
    from slimfx.persist import example_inputs as from_metas

    if isinstance(model, (str, Path)):
        if not str(model).endswith(SUFFIX):
            raise SlimfxError(f"compile() takes a model path only for saved models ({SUFFIX} files); got "
                              f"{str(model)!r}: load other models in Python and pass the nn.Module")
        from slimfx.output import note_input

        model, path = load(model), model
        note_input(path, "saved model")  # the run's input: out_dir never replaces it
    if not isinstance(model, ir.Graph):
        return model, None, example_inputs
    if example_kwargs:
        raise SlimfxError("example_kwargs cannot be given with a saved graph: its inputs are positional, in the "
                          f"order {', '.join(n.name for n in model.inputs)}")
    module = ir.lower(model, copy_params=True).eval()
    return module, model, from_metas(model) if example_inputs is None else example_inputs


def _default_name(model: nn.Module, saved: ir.Graph | None) -> str:
    if saved is not None:
        return str((saved.metadata.get("model") or {}).get("name") or saved.name)
    return type(model).__name__


def _formats(formats: Any, rec: Recipe) -> tuple[str, ...]:
    if formats is None:
        return rec.export.formats
    fmts = (formats,) if isinstance(formats, str) else tuple(formats)
    if not fmts:
        raise SlimfxError(f"formats is empty; give at least one of {', '.join(FORMAT_FILES)} (or None: the recipe's)")
    unknown = [f for f in fmts if f not in FORMAT_FILES]
    if unknown:
        raise SlimfxError(f"unknown export format {unknown[0]!r}; choose from {', '.join(FORMAT_FILES)}")
    return tuple(dict.fromkeys(fmts))


def _inputs(model: nn.Module, example_inputs: Any, example_kwargs: dict[str, Any] | None
            ) -> tuple[tuple, Callable[..., Any], tuple[tuple, dict[str, Any] | None]]:
    """The example as one positional tuple, a function running the model on such tuples, and what capture
    takes. Keyword inputs become graph inputs named after forward's parameters, in forward's order."""
    example = as_tuple(example_inputs) if example_inputs is not None else ()
    if not example_kwargs:
        return example, model, (example, None)
    names = list(inspect.signature(model.forward).parameters)[len(example):]
    unknown = [k for k in example_kwargs if k not in names]
    if unknown:
        raise SlimfxError(f"example_kwargs names {unknown[0]!r}, which {type(model).__name__}.forward "
                          f"does not take; its parameters: {', '.join(names)}")
    kw_names = [n for n in names if n in example_kwargs]
    n_pos = len(example)

    def run_model(*xs: Any) -> Any:
        return model(*xs[:n_pos], **dict(zip(kw_names, xs[n_pos:])))
    full = example + tuple(example_kwargs[n] for n in kw_names)
    return full, run_model, (example, {n: example_kwargs[n] for n in kw_names})


def _calibration(data: Data, example: tuple, rows: int | None, pipeline: list[Pass]) -> tuple[Any, list[str]]:
    """The calibration batches (the example when the data has none and a pass calibrates), and the headline
    notes on the data: calibration on few inputs, held-out rows that are also train rows."""
    notes = []
    calibration = _chunked(data.calibration_batches(len(example)), rows)
    if calibration is None and any(p.needs_calibration for p in pipeline):
        calibration = [example]
        notes.append("static quantization calibrated on the example inputs only (no calibration or "
                     "train data): activation ranges may be off; give data (--data / data=)")
    elif calibration is not None and any(p.needs_calibration for p in pipeline):
        n_calib = _rows(calibration)
        if n_calib < CALIBRATION_FEW:
            notes.append(f"static quantization calibrated on {n_calib} input{'s' if n_calib != 1 else ''} only "
                         f"(data.{'calibration' if data.calibration is not None else 'train'}): activation "
                         f"ranges from so few may be off; give at least {CALIBRATION_FEW} (calibration, or "
                         f"train, which calibration_samples = {data.calibration_samples} are drawn from)")
    for held, shared in data.shared_rows().items():
        notes.append(f"{shared:.1%} of the {held} rows are also rows of train: the numbers measured on {held} "
                     f"are partly on data the model trains or calibrates on; keep them out of train")
    return calibration, notes


def _merge_data(data: Data | None, calibration: Any, train: Any, test: Any) -> Data:
    legacy = {"calibration": calibration, "train": train, "test": test}
    given = {k: v for k, v in legacy.items() if v is not None}
    if data is None:
        return Data(**given)
    if not isinstance(data, Data):
        raise DataError(f"data must be a slimfx.Data, got {type(data).__name__}")
    if given:
        raise DataError(f"give data either as data=slimfx.Data(...) or as {', '.join(f'{k}_data' for k in given)}, "
                        "not both")
    return data


def _checked_eval_fn(eval_fn: Callable[[nn.Module], Any]) -> Callable[[nn.Module], float]:
    def run(module: nn.Module) -> float:
        value = eval_fn(module)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0 <= value <= 1:
            raise DataError(f"eval_fn returned {value!r}; it must return the accuracy as a number in [0, 1]")
        return float(value)
    return run


# --- capture and passes ----------------------------------------------------------------------------------------

def _capture(job: _Job) -> ir.Graph:
    args, kwargs = job.capture_args
    if job.graph is not None:
        graph = job.graph.copy()  # resume: the saved IR, left as it was for the caller
        if job.dynamic_dims is not None:
            apply_dynamic_dims(graph, job.dynamic_dims, job.example)
    else:
        graph = ir.capture(job.model, args, example_kwargs=kwargs, for_inference=True,
                           dynamic_dims=job.dynamic_dims)
        graph.metadata["model"] = {"name": job.name}
    if not job.dynamic_batch:  # the graph says what its files keep dynamic (a saved .slimfx too)
        from slimfx.ir.symdims import graph_dims, set_graph_dims

        set_graph_dims(graph, [{d: s for d, s in per.items() if s != "batch"} for per in graph_dims(graph)])
    for i, p in enumerate(job.pipeline):
        check = getattr(p, "check_graph", None)
        problem = check(graph) if check is not None else None
        if problem:
            raise RecipeError(f"recipe {job.recipe.name!r}: passes[{i}] (name = {p.name!r}): {problem}")
    _refuse_masks_in_onnx(job, graph)
    _check_fixed_dims(job, graph)
    job.class_dims = ir.analysis.output_class_dims(graph)  # where the outputs hold classes, for the gate's top-1
    return graph


def _check_fixed_dims(job: _Job, graph: ir.Graph) -> None:
    """DataError when the first batch of a data part differs from the example in a dim the exported files keep
    fixed (an image smaller than the example's, with only the batch dynamic): the torch model may run on it, but
    the gate and the accuracy run the written ONNX file, which onnxruntime refuses at that size (after every pass
    had run). Names the part, the input, the dims and the `--dynamic-dims` value that keeps them dynamic."""
    from slimfx.ir.symdims import WHERE, _conventional_dim, graph_dims

    dims, names = graph_dims(graph), [n.name for n in graph.inputs]
    if len(names) != len(job.example):
        return  # keyword inputs: the data's tuples are not the graph's inputs one for one
    parts = {"calibration": job.ctx.calibration_data if job.data.calibration is not None else None,
             "train": job.ctx.train_data, job.gate_split_name: job.gate_split,
             job.accuracy_split_name: job.accuracy_split}
    for part, source in parts.items():
        first = next(iter(source), None) if source is not None else None
        if first is None:
            continue
        inputs = first if part == "calibration" else first[0]
        for k, (got, want) in enumerate(zip(inputs, job.example)):
            if not (isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)) or got.dim() != want.dim():
                continue
            bad = [d for d in range(want.dim()) if d not in dims[k] and got.shape[d] != want.shape[d]]
            if not bad:
                continue
            wanted = [{**dims[i], **({d: _conventional_name(x, d, names[i], _conventional_dim) for d in bad}
                                     if i == k else {})} for i, x in enumerate(job.example)]
            spec = ";".join(f"{n}=" + ",".join(f"{d}:{s}" for d, s in sorted(w.items()))
                            for n, w in zip(names, wanted) if w)
            fixed = "[" + ", ".join(dims[k].get(d, str(n)) for d, n in enumerate(want.shape)) + "]"
            raise DataError(f"data.{part}, batch 0: input {k} ({names[k]}) is {list(got.shape)}, but the exported "
                            f"files take {names[k]} as {fixed}: dim{'s' if len(bad) > 1 else ''} "
                            f"{', '.join(map(str, bad))} {'are' if len(bad) > 1 else 'is'} fixed at the example's "
                            f"size, so onnxruntime cannot run them on this data. Give data at the example's size, "
                            f"or keep those dims dynamic {WHERE}: --dynamic-dims '{spec}'")


def _conventional_name(x: torch.Tensor, d: int, input_name: str, conventional: Callable[[str, Any], Any]) -> str:
    """The name a dynamic dim gets in a suggested `--dynamic-dims`: seq, height or width where that name sits
    (ir.symdims), else `<input>_dim<d>`."""
    return next((s for s in ("seq", "height", "width") if conventional(s, x) == d), f"{input_name}_dim{d}")


def _refuse_masks_in_onnx(job: _Job, graph: ir.Graph) -> None:
    """ONNX files hold no `mask` nodes (docs/pruning.md): a pipeline that would leave prune-weights' masks in
    the graph it exports as ONNX is refused before any work, naming the step that fixes it."""
    if "onnx" not in job.formats:
        return
    left = "the resumed graph's masks" if any(n.op == "mask" for n in graph) else None
    for i, p in enumerate(job.pipeline):
        if p.name == "prune-weights":
            left = f"passes[{i}] (name = 'prune-weights')"
        elif p.name == "materialize-masks":
            left = None
    if left is not None:
        raise RecipeError(
            f"recipe {job.recipe.name!r}: {left} leaves pruning masks as `mask` nodes, which an ONNX file does not "
            "hold; add a materialize-masks step after it ([[passes]] name = \"materialize-masks\", as the sparse50 "
            "recipe does), or leave onnx out of the formats (--format torchscript)")


class _StageRecorder:
    """Pass-manager instrumentation: params, MACs and accuracy after every pass that changed the graph."""

    def __init__(self, job: _Job):
        self.job, self.rows = job, [{"stage": "original"}]

    def after_pass(self, index: int, p: Pass, graph: ir.Graph, record: Any) -> None:
        if not record.changed or p.is_analysis:
            return
        module = ir.lower(graph).eval()
        acc = accuracy(module, self.job.accuracy_split) if self.job.accuracy_split is not None else None
        self.rows.append({"stage": f"{index}. {p.name}", "params": ir.count_params(graph),
                          "macs": _macs_per_input(self.job, graph), "size_bytes": None, "latency_b1_ms": None, "latency_b32_ms": None,
                          "accuracy": acc})


def _run_passes(job: _Job, graph: ir.Graph) -> tuple[ir.Graph, list[Any], list[dict[str, Any]]]:
    """The graph after the pipeline (a pass may return a new one), the pass records, the stage rows."""
    recorder = _StageRecorder(job)
    pm = PassManager(job.pipeline, verify_each=True, check_numerics=1e-4 if job.check_numerics else None,
                     print_ir=job.print_ir, instrumentations=[recorder])
    run = pm.run(graph, job.ctx)
    from slimfx.persist import history_entry

    records, graph = list(run), run.graph
    # what a saved .slimfx file records of how the graph was made (a resumed graph's history goes on)
    graph.metadata["history"] = [*graph.metadata.get("history", []),
                                 history_entry(job.recipe, [r.to_dict() for r in records])]
    return graph, records, recorder.rows


# --- export ------------------------------------------------------------------------------------------------------

def _export(job: _Job, graph: ir.Graph, staging: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    from slimfx.exporters import export_onnx, export_pt2, export_slimfx, export_torchscript

    exports: dict[str, Path] = {}
    details: dict[str, Any] = {}
    tolerances = {k: v for k in ("atol", "rtol") if (v := getattr(job.recipe.validate, k)) is not None}
    for fmt in job.formats:
        target = staging / FORMAT_FILES[fmt]
        if fmt == "onnx":
            res = export_onnx(graph, target, inputs=job.example, opset=job.recipe.export.opset,
                              dynamic_batch=job.dynamic_batch, **tolerances)
        elif fmt == "pt2":
            res = export_pt2(graph, target, inputs=job.example, dynamic_batch=job.dynamic_batch)
        elif fmt == "slimfx":
            res = export_slimfx(graph, target, inputs=job.example)
        else:
            res = export_torchscript(graph, target, inputs=job.example, dynamic_batch=job.dynamic_batch)
        exports[fmt] = target
        details[fmt] = res.to_dict()
    return exports, details


def _onnx_for_numbers(job: _Job, graph: ir.Graph, path: Path, what: str) -> Path | None:
    """An ONNX export of the graph as it is now, for its size and latency. When ONNX was not asked for and
    the graph cannot be written as ONNX, those numbers are left out (warned)."""
    from slimfx.exporters import export_onnx

    try:  # numbers only: not validated (the written model.onnx is, and the gate compares it with the model)
        return export_onnx(graph, path, inputs=job.example, validate=False, dynamic_batch=job.dynamic_batch).path
    except ExportError as e:
        if "onnx" in job.formats:
            raise
        job.warnings.append(f"no ONNX size or latency for the {what} model: {e}".split("\n")[0])
        return None


def _side_numbers(job: _Job, graph: ir.Graph, onnx_path: Path | None) -> dict[str, Any]:
    return {"params": ir.count_params(graph), "macs": _macs_per_input(job, graph),
            "size_bytes": onnx_path.stat().st_size if onnx_path is not None else None,
            "latency_ms": None, "accuracy": None, "_onnx": onnx_path}


# --- evaluate: the original against what was written, on held-out data -------------------------------------------

EVAL_THREADS = max(os.cpu_count() or 1, 1)  # checking numbers is not timing: it may use every core


def _onnx_runner(path: Path) -> Callable[..., list[torch.Tensor]]:
    from slimfx.exporters import ort_session
    from slimfx.exporters.bench import ort_feed

    sess = ort_session(path, threads=EVAL_THREADS)

    def run(*xs: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(np.asarray(o)) for o in sess.run(None, ort_feed(sess, xs))]
    return run


def _evaluate(job: _Job, module: nn.Module, onnx_path: Path | None, macs_per_sample: int | None = None
              ) -> dict[str, Any]:
    """Agreement, SQNR and differences of the deployed model (the ONNX file when there is one) against the
    original on the gate split; accuracies of both on the gate split and on the accuracy split. Without data,
    the gate split is inputs generated like the example (`generated_sample_count` of them: fewer for a heavy
    model, so the check's cost is bounded; the report says how many)."""
    deployed = _onnx_runner(onnx_path) if onnx_path is not None else module
    deployed_name = "model.onnx (onnxruntime)" if onnx_path is not None else "the compiled module"
    job.model.eval()
    gate_split = job.gate_split
    if gate_split is None:
        samples = generated_sample_count(macs_per_sample)
        gate_split = _chunked(generated_batches(job.example, samples=samples, seed=job.ctx.seed),
                              None if job.dynamic_batch else _batch_rows(job.example))  # fixed batch: its chunks
        fewer = (f" ({GENERATED_SAMPLES} for a model under {GENERATED_MACS_BUDGET / GENERATED_SAMPLES / 1e9:g} "
                 f"GMACs per input; this one has {macs_per_sample / 1e9:.2g})") if samples < GENERATED_SAMPLES else ""
        job.headline.append(f"no validation data: agreement and SQNR come from {samples} generated inputs{fewer} "
                            "shaped like the example, not from real data; give data (--data / data=) for numbers "
                            "that mean something")
    threads = torch.get_num_threads()
    torch.set_num_threads(EVAL_THREADS)
    try:
        comparison, gate_acc = _compare_on(job, deployed, gate_split, job.gate_split_name)
        out: dict[str, Any] = {"comparison": comparison, "deployed": deployed_name, "gate_accuracy": gate_acc}
        if job.accuracy_split is not None and job.accuracy_split_name != job.gate_split_name:
            _, out["accuracy"] = _compare_on(job, deployed, job.accuracy_split, job.accuracy_split_name)
        else:
            out["accuracy"] = gate_acc
    finally:
        torch.set_num_threads(threads)
    return out


def _compare_on(job: _Job, deployed: Callable[..., Any], split: Iterable, name: str
                ) -> tuple[Comparison, tuple[float, float] | None]:
    original = job.run_model
    comparison = Comparison(class_dims=job.class_dims)
    hits_o = hits_d = n = 0
    labelled = True
    with torch.no_grad():
        for inputs, target in split:
            ref, got = _run_original(original, inputs, name), deployed(*inputs)
            comparison.update(ref, got)
            if target is None:
                labelled = False
                continue
            hits_o += correct(ref, target, f"data.{name}: ")
            hits_d += correct(got, target, f"data.{name}: ")
            n += target.numel()  # labelled positions: rows, tokens or pixels
    return comparison, ((hits_o / n, hits_d / n) if labelled and n else None)


def _run_original(original: Callable[..., Any], inputs: tuple, name: str) -> Any:
    try:
        return original(*inputs)
    except Exception as e:  # noqa: BLE001 - the user's model fails on the user's (or generated) data
        rows = inputs[0].shape[0] if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else "?"
        ids = [t for t in inputs if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.numel()]
        if isinstance(e, IndexError) and ids:  # an embedding looked up past its table
            hint = (f"integer inputs (token ids) of that batch run from {min(int(t.min()) for t in ids)} to "
                    f"{max(int(t.max()) for t in ids)}: check that they are below the vocabulary size of the "
                    "model's embeddings")
        else:
            hint = ("if the model runs at its example's batch size only (a literal batch size in a view or reshape), "
                    "compile with a fixed batch size: `--fixed-batch` on the command line, dynamic_batch=False in "
                    "slimfx.compile; otherwise check that the data has the shapes and dtypes forward expects")
        raise SlimfxError(
            f"the original model fails on a batch of {rows} from the {name} data ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}), so the compiled one cannot be checked against it; "
            f"{hint}.") from None


# --- measure -----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _progress(job: _Job):
    from tqdm.auto import tqdm

    bar = tqdm(desc="benchmarking", unit="run", leave=False, disable=job.quiet or not sys.stderr.isatty())
    try:
        yield bar
    finally:
        bar.close()


def _measure(job: _Job, baseline: dict[str, Any], compressed: dict[str, Any], exports: dict[str, Path],
             details: dict[str, Any], progress: Any) -> None:
    """Latency at batch 1 and 32 on one thread of the original and compiled ONNX files (onnxruntime) and of the
    exported torch files (torch), all measured side by side within one budget of `bench_seconds` (see
    `exporters.latency_side_by_side`); each number comes with its spread."""
    from slimfx.exporters import latency_side_by_side, unmeasured_inputs, with_batch
    from slimfx.exporters.pt2 import load_pt2

    if job.bench_seconds <= 0:
        job.warnings.append("latency not measured (bench_seconds = 0 / --no-bench)")
        return
    timed: dict[str, Any] = {k: side["_onnx"] for k, side in (("original", baseline), ("compiled", compressed))
                             if side["_onnx"] is not None}
    for fmt in ("torchscript", "pt2"):
        if fmt in exports:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    timed[fmt] = load_pt2(exports[fmt]) if fmt == "pt2" else \
                        torch.jit.load(str(exports[fmt]), map_location="cpu").eval()
            except Exception as e:  # noqa: BLE001 - a torch file that does not load back has no latency
                job.warnings.append(f"no latency for {FORMAT_FILES[fmt]}: {type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:200] if str(e) else ''}")
    sizes = (1, 32) if job.dynamic_batch else (_batch_rows(job.example),)
    batches = {f"b{b}": with_batch(job.example, b) for b in sizes}
    try:
        results = latency_side_by_side(timed, batches, total_budget_s=job.bench_seconds,
                                       progress=lambda: progress.update(1))
    except Exception as e:  # noqa: BLE001 - e.g. a file exported at a fixed batch size
        job.warnings.append(f"latency not measured: a file does not run at batch 1 and 32 "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")
        return
    for b in unmeasured_inputs(results, batches):
        job.warnings.append(f"latency at batch {b[1:]} not measured: one run of each file at that size takes longer "
                            f"than the {job.bench_seconds:g} s latency budget allows; give --bench-seconds (API: "
                            "bench_seconds=) a larger budget to measure it")
    for side, key in ((baseline, "original"), (compressed, "compiled")):
        if key in results:
            side["latency_ms"] = {b: (round(results[key][b].median_ms, 4) if b in results[key] else None)
                                  for b in batches}
            side["latency_spread"] = {b: v.to_dict() for b, v in results[key].items()}
    for fmt in exports:
        key = "compiled" if fmt == "onnx" else fmt
        if key in results:
            details[fmt]["latency_ms"] = {b: (round(results[key][b].median_ms, 4) if b in results[key] else None)
                                          for b in batches}
            details[fmt]["runtime"] = "onnxruntime, 1 thread" if fmt == "onnx" else "torch, 1 thread"
    if "original" in results and "compiled" in results:
        job.warnings.extend(_slower_warnings(results["original"], results["compiled"]))


WEIGHT_LABELS = {"float": "float", "int8": "int8 (dequantized in the graph)",
                 "fake-quant": "fake-quant (float tensors)"}


def _describe_exports(graph: ir.Graph, exports: dict[str, Path], details: dict[str, Any]) -> None:
    """What each exported file holds: `weights` (float, int8 tensors dequantized in the graph, or fake-quant);
    `latency_ms` is filled in by `_measure` (none for .slimfx, which is not a runtime format)."""
    from slimfx.exporters.pt2 import weight_storage

    storage = weight_storage(graph)
    for fmt in exports:
        d = details[fmt]
        d["weights"] = d.get("details", {}).get("weights") or storage
        d["latency_ms"], d["runtime"] = None, None


def _slower_warnings(baseline: dict[str, Any], compressed: dict[str, Any]) -> list[str]:
    """A warning per batch size at which the compiled model runs clearly slower than the original: its median
    and its 10th percentile (`LatencySummary`s per batch key) both more than SLOWER_WARN_RATIO of the
    original's. Interference only adds time, so a slowdown the fastest calls do not share is the machine's."""
    out = []
    for key in ("b1", "b32"):
        b, c = baseline.get(key), compressed.get(key)
        if b is None or c is None or not (b.median_ms > 0 and b.p10_ms > 0):
            continue
        if c.median_ms > SLOWER_WARN_RATIO * b.median_ms and c.p10_ms > SLOWER_WARN_RATIO * b.p10_ms:
            ratio = c.median_ms / b.median_ms
            out.append(f"the compiled model is slower than the original at batch {key[1:]} ({ratio:.2f}x on "
                       "onnxruntime, 1 thread): at this size the recipe's kernels do not pay off; if that is your "
                       "deployment batch, try another recipe or keep the original")
    return out


# --- report, gate, write ------------------------------------------------------------------------------------------

def _pass_notes(records: list[Any]) -> list[str]:
    """Headline lines from the passes: skipped steps (`skipped`, or a value 'skipped: ...') and `notes`."""
    out = []
    for r in records:
        st = r.stats
        if st.get("skipped") is True:
            out.append(f"{r.name} skipped: {st.get('reason', 'no data')}")
        for k, v in st.items():
            if isinstance(v, str) and v.startswith("skipped"):
                out.append(f"{r.name} {k} {v}")
        out.extend(f"{r.name}: {note}" for note in st.get("notes", ()))
    return out


def _report(job: _Job, baseline: dict[str, Any], compressed: dict[str, Any], evaluation: dict[str, Any],
            records: list[Any], stages: list[dict[str, Any]], exports: dict[str, Path],
            export_details: dict[str, Any], t_start: float) -> dict[str, Any]:
    acc = evaluation["accuracy"]
    baseline["accuracy"], compressed["accuracy"] = (acc if acc is not None else (None, None))
    notes = _pass_notes(records)
    headline = job.headline + notes
    if acc is None and any(" skipped" in n for n in notes):
        headline.append("accuracy unknown: no labelled data")
    comparison: Comparison = evaluation["comparison"]
    validation = {**comparison.to_dict(), "split": job.gate_split_name, "compared": evaluation["deployed"]}
    if evaluation["gate_accuracy"] is not None:
        validation["accuracy_original"], validation["accuracy_compiled"] = evaluation["gate_accuracy"]
    stages[0] = {"stage": "original", **_stage_numbers(baseline)}
    stages.append({"stage": "compiled", **_stage_numbers(compressed)})
    return {
        "model": job.name, "recipe": job.recipe.name, "headline": headline,
        "data": {"given": job.data.given(), "gate_split": job.gate_split_name,
                 "accuracy_split": job.accuracy_split_name if acc is not None else None,
                 "calibration_samples": _calibration_rows(job)},
        "baseline": _public(baseline), "compressed": _public(compressed), "validation": validation,
        "passes": [r.to_dict() for r in records],
        # the accuracy-budget tuner's evaluations and decision ([tune]; passes/quantize/tune.py), when it ran
        "tune": next((r.stats["tune"] for r in records if isinstance(r.stats.get("tune"), dict)), None),
        "exports": {fmt: {**export_details[fmt], "path": FORMAT_FILES[fmt]} for fmt in exports},
        "stages": stages, "warnings": job.warnings, "seconds": round(time.perf_counter() - t_start, 3),
    }


def _calibration_rows(job: _Job) -> int | None:
    """The rows static quantization calibrated on, when a pass of the recipe calibrates."""
    if job.ctx.calibration_data is None or not any(p.needs_calibration for p in job.pipeline):
        return None
    return _rows(job.ctx.calibration_data)


def _rows(batches: Iterable[tuple]) -> int:
    """Rows in a list of input tuples (a batch whose first input has no batch dim counts as one)."""
    return sum(len(b[0]) if b and isinstance(b[0], torch.Tensor) and b[0].dim() else 1 for b in batches)


def _public(side: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in side.items() if not k.startswith("_")}


def _stage_numbers(m: dict[str, Any]) -> dict[str, Any]:
    latency = m.get("latency_ms") or {}
    return {"params": m["params"], "macs": m["macs"], "size_bytes": m["size_bytes"],
            "latency_b1_ms": latency.get("b1"), "latency_b32_ms": latency.get("b32"), "accuracy": m["accuracy"]}


def _output_shapes(comparison: Comparison) -> str:
    return ", ".join(f"{s.name} [{', '.join(['batch', *map(str, s.shape[1:])])}]" if s.shape else s.name
                     for s in comparison.outputs.values())


def _sqnr_gate_advice(recipe: Recipe) -> str:
    """How to give `recipe` an SQNR gate instead of top-1 agreement, from the command line and from Python."""
    from importlib import resources

    builtin = recipe.source is not None and recipe.source.parent == Path(str(resources.files("slimfx") / "recipes"))
    if recipe.source is None:  # built in Python
        return "give the Recipe validate={'min_sqnr_db': 25} (say) instead of min_top1_agreement"
    if not builtin:  # a file of the user's, even one named like a built-in
        return f"in {recipe.source}'s [validate], replace min_top1_agreement with min_sqnr_db (e.g. 25)"
    return (f"`slimfx recipes {recipe.name} > my.toml`, replace min_top1_agreement with min_sqnr_db (e.g. 25) in "
            f"its [validate], and compile with --recipe my.toml (API: a slimfx.Recipe with validate="
            f"{{'min_sqnr_db': 25}})")


def _gate(job: _Job, evaluation: dict[str, Any]) -> list[str]:
    """The recipe's [validate] checks on the gate split; each failure names the check, the numbers and the
    split. Outputs with NaN/Inf (or of the wrong shape) fail whatever the thresholds."""
    cfg, split = job.recipe.validate, job.gate_split_name
    comparison: Comparison = evaluation["comparison"]
    where = f"on the {split} data ({comparison.samples} samples)"
    problem = comparison.trustworthy
    if problem:
        return [f"the compiled model's outputs cannot be trusted {where}: {problem}"]
    failures = []
    top1 = comparison.top1_agreement
    if cfg.min_top1_agreement is not None:
        if top1 is None:
            failures.append(f"min_top1_agreement: no output holds class scores (shapes {_output_shapes(comparison)}), "
                            f"so agreement cannot be checked {where}; judge such outputs by SQNR: "
                            f"{_sqnr_gate_advice(job.recipe)}")
        elif top1 < cfg.min_top1_agreement:
            failures.append(f"min_top1_agreement: the compiled model agrees with the original on {top1:.2%} of "
                            f"top-1 predictions {where}; the recipe requires {cfg.min_top1_agreement:.2%}")
    dtype = next((t.dtype for t in job.model.parameters() if t.is_floating_point()), torch.float32)
    need_sqnr = min(cfg.min_sqnr_db, sqnr_ceiling_db(dtype)) if cfg.min_sqnr_db is not None else None
    if need_sqnr is not None and comparison.sqnr_db < need_sqnr:
        capped = f" ({cfg.min_sqnr_db:g} capped at what {dtype} allows)" if need_sqnr < cfg.min_sqnr_db else ""
        failures.append(f"min_sqnr_db: output SQNR {comparison.sqnr_db:.1f} dB ({comparison.worst_output}) {where}; "
                        f"the recipe requires {need_sqnr:g} dB{capped}")
    if cfg.max_accuracy_drop is not None:
        acc = evaluation["gate_accuracy"]
        if acc is None:
            failures.append(f"max_accuracy_drop: needs labelled validation data to measure accuracy and there is "
                            f"none ({split} data); give data with targets (--data / data=)")
        elif acc[0] - acc[1] > cfg.max_accuracy_drop + 1e-12:
            failures.append(f"max_accuracy_drop: accuracy fell from {acc[0]:.2%} to {acc[1]:.2%} {where}; the "
                            f"recipe allows a drop of {cfg.max_accuracy_drop:.2%}")
    return failures


def _training_epochs(pipeline: list[Pass]) -> list[str]:
    """The pipeline's options that train on the train data, with their values: "quantize's `qat_epochs` (now 8)"."""
    return [f"{p.name}'s `{f.name}` (now {getattr(p, f.name)})" for p in pipeline
            for f in p.options() if f.name.endswith("epochs") and getattr(p, f.name)]


# what lowers each compressing pass's damage, in its own option names
_COMPRESS_LESS = {"prune-channels": "prune-channels `sparsity` or `target_macs`", "prune-weights": "prune-weights `sparsity`",
                  "quantize": "quantize's `skip` for sensitive layers"}


def _gate_advice(pipeline: list[Pass], kept: bool) -> str:
    """What is left to try when recovery ran on the user's data and the gate still failed: only the knobs the
    recipe has (its training options with their values; a recipe that trains nothing is told which step to add:
    quantization-aware training for a quantizing one, whose integer weights a finetune step after it cannot train)."""
    knobs = _training_epochs(pipeline)
    passes = [p.name for p in pipeline]
    first = (f"give the recovery steps more epochs ({', '.join(knobs)})" if knobs else
             "set quantize's `qat_epochs` (quantization-aware training on the train data)" if "quantize" in passes
             else None if "quantize-weights" in passes  # packed codes: nothing after it trains them
             else "add a finetune step after the compression (name = \"finetune\", epochs)")
    less = [v for k, v in _COMPRESS_LESS.items() if k in passes]
    advice = (f"{first + ', ' if first else ''}compress less{' (' + ', '.join(less) + ')' if less else ''}, "
              "or relax the recipe's [validate] thresholds")
    return advice + ("" if kept else "; --keep-rejected (keep_rejected=True) writes the rejected files to inspect")


def _gate_error(job: _Job, report: dict[str, Any], failures: list[str], kept: Path | None) -> GateError:
    if job.data.train is not None and job.gate_split_name == "validation":  # recovery ran; more data is no answer
        advice = _gate_advice(job.pipeline, kept=job.keep_rejected)
    else:
        advice = ("give training and validation data (--data / data=) so recovery steps run, use a gentler recipe, "
                  "or relax the recipe's [validate] thresholds")
    where = f"; the rejected files are in {kept}" if kept else ("; nothing was written" if job.output else "")
    lines = "\n".join(f"  - {f}" for f in failures)
    notes = "".join(f"\n  note: {h}" for h in report["headline"])
    err = GateError(f"recipe {job.recipe.name!r}: the compiled model failed its [validate] gate{where}:\n{lines}"
                    f"{notes}\n  {advice}")
    err.report = report  # the numbers of the rejected model, for callers that want them
    return err


def _write(job: _Job, report: dict[str, Any], staging: Path, exports: dict[str, Path], failures: list[str]
           ) -> tuple[dict[str, Path], Path | None]:
    if job.output is None:
        if failures:
            raise _gate_error(job, report, failures, None)
        return {}, None
    (staging / "report.json").write_text(json.dumps(strict_json(report), indent=2, allow_nan=False) + "\n")
    from slimfx.report import write_markdown

    write_markdown(report, staging / "report.md", staging / "report.png")
    if failures:
        kept = job.output.reject(job.keep_rejected)
        raise _gate_error(job, report, failures, kept)
    out = job.output.commit()
    return {fmt: out / FORMAT_FILES[fmt] for fmt in exports}, out


def strict_json(o: Any) -> Any:
    """`o` with only what strict JSON holds: non-finite floats become null, numpy/torch values plain
    Python, paths strings."""
    if isinstance(o, dict):
        return {str(k): strict_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [strict_json(v) for v in o]
    if isinstance(o, (np.generic, torch.Tensor)):
        return strict_json(o.tolist() if getattr(o, "ndim", 0) else o.item())
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if o is None or isinstance(o, (str, int, bool)):
        return o
    return str(o)


__all__ = ["compile", "CompileResult", "DEFAULT_RECIPE", "strict_json"]
