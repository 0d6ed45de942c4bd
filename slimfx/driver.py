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
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from slimfx import ir
from slimfx.data import GENERATED_SAMPLES, Data, Split, generated_batches
from slimfx.ir.errors import DataError, ExportError, GateError, RecipeError, SlimfxError
from slimfx.ir.metrics import Comparison, sqnr_ceiling_db
from slimfx.output import OutputDir
from slimfx.passes import Pass, PassContext, PassManager
from slimfx.recipe import Recipe, load_recipe

log = logging.getLogger("slimfx")

FORMAT_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
DEFAULT_RECIPE = "default"
# Fresh sessions of one file land up to 10-15% apart here; only a clearer slowdown is worth a warning.
SLOWER_WARN_RATIO = 1.2
LATENCY_ROUNDS = 3


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
    headline: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# --- the entry point ---------------------------------------------------------------------------------------

def compile(model: nn.Module, example_inputs: Any = None, recipe: str | Path | Recipe = DEFAULT_RECIPE, *,  # noqa: A001
            data: Data | None = None, example_kwargs: dict[str, Any] | None = None,
            calibration_data: Iterable | None = None, train_data: Iterable | None = None,
            test_data: Any = None, eval_fn: Callable[[nn.Module], float] | None = None,
            out_dir: str | Path | None = None, formats: Sequence[str] | str | None = None, force: bool = False,
            keep_rejected: bool = False, check_numerics: bool = True, name: str | None = None,
            quiet: bool = False, seed: int = 0, bench_seconds: float = 0.8) -> CompileResult:
    """Compile `model` with a recipe: capture, run its passes, export, check and report.

    recipe: a built-in name (`slimfx passes`/README list them; default "default"), a TOML path, or a `Recipe`.
    data: a `slimfx.Data` (train / validation / test / calibration parts). The older keywords
        calibration_data, train_data and test_data (`(inputs, labels)`) fill the same parts.
    eval_fn: module -> accuracy in [0, 1] on YOUR VALIDATION data (it picks best epochs; never test data).
    formats: what to export ("onnx", "torchscript"); default: the recipe's [export] formats.
    out_dir: written all at once, only when every step and the recipe's [validate] gate pass; an existing
        non-empty directory is replaced only with force=True. keep_rejected: on a failed gate, write the
        outputs to `OUT.rejected/` instead of nothing.
    bench_seconds: timed budget per ONNX file and batch size (0: no latency measurement).
    Raises SlimfxError subclasses for anything the user can fix (GateError when the gate fails).
    """
    t_start = time.perf_counter()
    job = _resolve(model, example_inputs, recipe, data=data, example_kwargs=example_kwargs,
                   calibration_data=calibration_data, train_data=train_data, test_data=test_data,
                   eval_fn=eval_fn, out_dir=out_dir, formats=formats, force=force, keep_rejected=keep_rejected,
                   check_numerics=check_numerics, name=name, quiet=quiet, seed=seed, bench_seconds=bench_seconds)
    with contextlib.ExitStack() as stack:
        if job.output is not None:
            stack.enter_context(job.output)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="slimfx-")))
        progress = stack.enter_context(_progress(job))
        graph = _capture(job)
        baseline = _side_numbers(graph, _onnx_for_numbers(job, graph, tmp / "original.onnx", "original"))
        graph, records, stages = _run_passes(job, graph)
        staging = job.output.stage if job.output is not None else tmp / "out"
        staging.mkdir(exist_ok=True)
        exports, export_details = _export(job, graph, staging)
        compressed_onnx = exports.get("onnx") or _onnx_for_numbers(job, graph, tmp / "compiled.onnx", "compiled")
        compressed = _side_numbers(graph, compressed_onnx)
        module = ir.lower(graph).eval()
        evaluation = _evaluate(job, module, exports.get("onnx"))
        _measure(job, baseline, compressed, progress)
        report = _report(job, baseline, compressed, evaluation, records, stages, exports, export_details, t_start)
        failures = _gate(job, evaluation)
        report["gate"] = {"passed": not failures, "failures": failures}
        final_exports, out_path = _write(job, report, staging, exports, failures)
    return CompileResult(graph, module, final_exports, report, out_path, report["stages"])


# --- resolve: every check on the user's input, before any work ----------------------------------------------

def _resolve(model: Any, example_inputs: Any, recipe: Any, *, data: Data | None, example_kwargs: Any,
             calibration_data: Any, train_data: Any, test_data: Any, eval_fn: Any, out_dir: Any, formats: Any,
             force: bool, keep_rejected: bool, check_numerics: bool, name: str | None, quiet: bool, seed: Any,
             bench_seconds: Any) -> _Job:
    if not isinstance(model, nn.Module):
        raise SlimfxError(f"compile() takes a torch.nn.Module, got {type(model).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise SlimfxError(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}")
    if isinstance(bench_seconds, bool) or not isinstance(bench_seconds, (int, float)) \
            or not math.isfinite(bench_seconds) or bench_seconds < 0:
        raise SlimfxError(f"bench_seconds must be a finite number >= 0 (0: no latency), got {bench_seconds!r}")
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    fmts = _formats(formats, rec)
    pipeline = rec.build_passes()  # RecipeError for unknown passes/options
    example, run_model, capture_args = _inputs(model, example_inputs, example_kwargs)
    data = _merge_data(data, calibration_data, train_data, test_data)
    job_headline: list[str] = []
    calibration = data.calibration_batches()
    if calibration is None and any(p.needs_calibration for p in pipeline):
        calibration = [example]
        job_headline.append("static quantization calibrated on the example inputs only (no calibration or "
                            "train data): activation ranges may be off; give data (--data / data=)")
    train, validation, test = data.split("train"), data.split("validation"), data.split("test")
    val_eval = _checked_eval_fn(eval_fn) if eval_fn is not None else (
        _split_accuracy_fn(validation) if validation is not None else None)
    ctx = PassContext(example_inputs=example, calibration_data=calibration, train_data=train, eval_fn=val_eval,
                      teacher=model, seed=seed, quiet=quiet)
    rec.check_context(pipeline, ctx)  # a step that needs data that was not given: RecipeError
    gate_split, gate_name = (validation, "validation") if validation is not None else \
        (test, "test") if test is not None else (None, "generated")
    if gate_split is None:
        job_headline.append(f"no validation data: agreement and SQNR come from {GENERATED_SAMPLES} generated inputs "
                            "shaped like the example, not from real data; give data (--data / data=) for numbers "
                            "that mean something")
    acc_split, acc_name = (test, "test") if test is not None else (validation, "validation") \
        if validation is not None else (None, None)
    output = None
    if out_dir is not None:
        need = 3 * sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        output = OutputDir.claim(out_dir, force=force, need_bytes=need, flag="out_dir")
    return _Job(model=model, run_model=run_model, example=example, capture_args=capture_args, recipe=rec,
                pipeline=pipeline, formats=fmts, data=data, ctx=ctx, gate_split=gate_split, gate_split_name=gate_name,
                accuracy_split=acc_split, accuracy_split_name=acc_name, output=output, keep_rejected=keep_rejected,
                name=name or type(model).__name__, quiet=quiet, bench_seconds=float(bench_seconds),
                check_numerics=check_numerics, headline=job_headline)


def _formats(formats: Any, rec: Recipe) -> tuple[str, ...]:
    if formats is None:
        return rec.export.formats
    fmts = (formats,) if isinstance(formats, str) else tuple(formats)
    unknown = [f for f in fmts if f not in FORMAT_FILES]
    if unknown or not fmts:
        raise SlimfxError(f"unknown export format {unknown[0] if unknown else '(none)'!r}; choose from "
                          f"{', '.join(FORMAT_FILES)}")
    return tuple(dict.fromkeys(fmts))


def _as_tuple(x: Any) -> tuple:
    if isinstance(x, tuple):
        return x
    if isinstance(x, list):
        return tuple(x)
    return (x,)


def _inputs(model: nn.Module, example_inputs: Any, example_kwargs: dict[str, Any] | None
            ) -> tuple[tuple, Callable[..., Any], tuple[tuple, dict[str, Any] | None]]:
    """The example as one positional tuple, a function running the model on such tuples, and what capture
    takes. Keyword inputs become graph inputs named after forward's parameters, in forward's order."""
    example = _as_tuple(example_inputs) if example_inputs is not None else ()
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


def _split_accuracy_fn(split: Split) -> Callable[[nn.Module], float]:
    """Accuracy of a module on a labelled split (the validation split picks best epochs)."""
    def run(module: nn.Module) -> float:
        was = module.training
        module.eval()
        try:
            hits = n = 0
            with torch.no_grad():
                for inputs, target in split:
                    if target is None:
                        raise DataError(f"data.{split.name} has no targets, so it cannot score accuracy")
                    hits, n = hits + _hits(module(*inputs), target), n + len(target)
            return hits / max(n, 1)
        finally:
            module.train(was)
    return run


def _hits(output: Any, target: torch.Tensor) -> int:
    from slimfx.ir.metrics import named_leaves

    logits = next((v for _, v in named_leaves(output) if isinstance(v, torch.Tensor)), None)
    if logits is None or logits.dim() < 1 or logits.shape[:-1] != target.shape:
        raise DataError(f"targets of shape {list(target.shape)} do not match the model's first output "
                        f"{list(logits.shape) if logits is not None else None}: accuracy needs class-index "
                        "targets, one per row of logits")
    return int((logits.argmax(-1) == target).sum())


# --- capture and passes ----------------------------------------------------------------------------------------

def _capture(job: _Job) -> ir.Graph:
    args, kwargs = job.capture_args
    graph = ir.capture(job.model, args, example_kwargs=kwargs, for_inference=True) if kwargs else \
        ir.capture(job.model, args, for_inference=True)
    for i, p in enumerate(job.pipeline):
        check = getattr(p, "check_graph", None)
        problem = check(graph) if check is not None else None
        if problem:
            raise RecipeError(f"recipe {job.recipe.name!r}: passes[{i}] (name = {p.name!r}): {problem}")
    return graph


class _StageRecorder:
    """Pass-manager instrumentation: params, MACs and accuracy after every pass that changed the graph."""

    def __init__(self, job: _Job):
        self.job, self.rows = job, [{"stage": "original"}]

    def after_pass(self, index: int, p: Pass, graph: ir.Graph, record: Any) -> None:
        if not record.changed or p.is_analysis:
            return
        module = ir.lower(graph).eval()
        acc = _accuracy(module, self.job.accuracy_split) if self.job.accuracy_split is not None else None
        self.rows.append({"stage": f"{index}. {p.name}", "params": ir.count_params(graph),
                          "macs": ir.count_macs(graph), "size_bytes": None, "latency_b32_ms": None, "accuracy": acc})


def _run_passes(job: _Job, graph: ir.Graph) -> tuple[ir.Graph, list[Any], list[dict[str, Any]]]:
    """The graph after the pipeline (a pass may return a new one), the pass records, the stage rows."""
    recorder = _StageRecorder(job)
    pm = PassManager(job.pipeline, verify_each=True, check_numerics=1e-4 if job.check_numerics else None,
                     instrumentations=[recorder])
    run = pm.run(graph, job.ctx)
    return run.graph, list(run), recorder.rows


def _accuracy(fn: Callable[..., Any], split: Iterable) -> float | None:
    hits = n = 0
    with torch.no_grad():
        for inputs, target in split:
            if target is None:
                return None
            hits, n = hits + _hits(fn(*inputs), target), n + len(target)
    return hits / n if n else None


# --- export ------------------------------------------------------------------------------------------------------

def _export(job: _Job, graph: ir.Graph, staging: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    from slimfx.exporters import export_onnx, export_torchscript

    exports: dict[str, Path] = {}
    details: dict[str, Any] = {}
    tolerances = {k: v for k in ("atol", "rtol") if (v := getattr(job.recipe.validate, k)) is not None}
    for fmt in job.formats:
        target = staging / FORMAT_FILES[fmt]
        if fmt == "onnx":
            res = export_onnx(graph, target, inputs=job.example, opset=job.recipe.export.opset, **tolerances)
        else:
            res = export_torchscript(graph, target, inputs=job.example)
        exports[fmt] = target
        details[fmt] = res.to_dict()
    return exports, details


def _onnx_for_numbers(job: _Job, graph: ir.Graph, path: Path, what: str) -> Path | None:
    """An ONNX export of the graph as it is now, for its size and latency. When ONNX was not asked for and
    the graph cannot be written as ONNX, those numbers are left out (warned)."""
    from slimfx.exporters import export_onnx

    try:
        return export_onnx(graph, path, inputs=job.example).path
    except ExportError as e:
        if "onnx" in job.formats:
            raise
        job.warnings.append(f"no ONNX size or latency for the {what} model: {e}".split("\n")[0])
        return None


def _side_numbers(graph: ir.Graph, onnx_path: Path | None) -> dict[str, Any]:
    return {"params": ir.count_params(graph), "macs": ir.count_macs(graph),
            "size_bytes": onnx_path.stat().st_size if onnx_path is not None else None,
            "latency_ms": None, "accuracy": None, "_onnx": onnx_path}


# --- evaluate: the original against what was written, on held-out data -------------------------------------------

def _onnx_runner(path: Path) -> Callable[..., list[torch.Tensor]]:
    from slimfx.exporters import ort_session
    from slimfx.exporters.bench import ort_feed

    sess = ort_session(path, threads=1)

    def run(*xs: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(np.asarray(o)) for o in sess.run(None, ort_feed(sess, xs))]
    return run


def _evaluate(job: _Job, module: nn.Module, onnx_path: Path | None) -> dict[str, Any]:
    """Agreement, SQNR and differences of the deployed model (the ONNX file when there is one) against the
    original on the gate split; accuracies of both on the gate split and on the accuracy split."""
    deployed = _onnx_runner(onnx_path) if onnx_path is not None else module
    deployed_name = "model.onnx (onnxruntime)" if onnx_path is not None else "the compiled module"
    job.model.eval()
    gate_split = job.gate_split if job.gate_split is not None else generated_batches(job.example, seed=job.ctx.seed)
    comparison, gate_acc = _compare_on(job.run_model, deployed, gate_split, job.gate_split_name)
    out: dict[str, Any] = {"comparison": comparison, "deployed": deployed_name, "gate_accuracy": gate_acc}
    if job.accuracy_split is not None and job.accuracy_split_name != job.gate_split_name:
        _, out["accuracy"] = _compare_on(job.run_model, deployed, job.accuracy_split, job.accuracy_split_name)
    else:
        out["accuracy"] = gate_acc
    return out


def _compare_on(original: Callable[..., Any], deployed: Callable[..., Any], split: Iterable, name: str
                ) -> tuple[Comparison, tuple[float, float] | None]:
    comparison = Comparison()
    hits_o = hits_d = n = 0
    labelled = True
    with torch.no_grad():
        for inputs, target in split:
            ref, got = original(*inputs), deployed(*inputs)
            comparison.update(ref, got)
            if target is None:
                labelled = False
                continue
            hits_o += _hits(ref, target)
            hits_d += _hits(got, target)
            n += len(target)
    return comparison, ((hits_o / n, hits_d / n) if labelled and n else None)


# --- measure -----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _progress(job: _Job):
    from tqdm.auto import tqdm

    bar = tqdm(desc="benchmarking", unit="run", leave=False, disable=job.quiet or not sys.stderr.isatty())
    try:
        yield bar
    finally:
        bar.close()


def _measure(job: _Job, baseline: dict[str, Any], compressed: dict[str, Any], progress: Any) -> None:
    """onnxruntime latency of the original and compiled files, side by side (see `_latencies`)."""
    timed = {k: side["_onnx"] for k, side in (("baseline", baseline), ("compressed", compressed))
             if side["_onnx"] is not None}
    if not timed or job.bench_seconds <= 0:
        return
    result = _latencies(timed, job.example, job.bench_seconds, progress)
    baseline["latency_ms"], compressed["latency_ms"] = result.get("baseline"), result.get("compressed")
    job.warnings.extend(_slower_warnings(baseline["latency_ms"], compressed["latency_ms"]))


def _latencies(paths: dict[str, Path], example: tuple, budget_s: float, progress: Any) -> dict[str, dict[str, float]]:
    """onnxruntime latency on one thread at batch 1 and 32 of each file, measured side by side: the best of
    LATENCY_ROUNDS rounds of fresh sessions (one session alone can be more than 10% off; see
    `exporters.interleaved_latency`). `budget_s` is the timed budget per file and batch."""
    from slimfx.exporters import best_median_ms, interleaved_latency, with_batch

    result: dict[str, dict[str, float]] = {k: {} for k in paths}
    for key, batch in (("b1", 1), ("b32", 32)):
        runs = interleaved_latency(paths, with_batch(example, batch), rounds=LATENCY_ROUNDS,
                                   budget_s=budget_s / LATENCY_ROUNDS)
        for k, stats in runs.items():
            result[k][key] = round(best_median_ms(stats), 4)
        progress.update(1)
    return result


def _slower_warnings(baseline: dict[str, float] | None, compressed: dict[str, float] | None) -> list[str]:
    """A warning per batch size at which the compiled model runs clearly slower than the original."""
    out = []
    for key, (b, c) in ((k, ((baseline or {}).get(k), (compressed or {}).get(k))) for k in ("b1", "b32")):
        if b and c and c > SLOWER_WARN_RATIO * b:
            out.append(f"the compiled model is slower than the original at batch {key[1:]} ({c / b:.2f}x on "
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
                 "accuracy_split": job.accuracy_split_name if acc is not None else None},
        "baseline": _public(baseline), "compressed": _public(compressed), "validation": validation,
        "passes": [r.to_dict() for r in records],
        "exports": {fmt: {**export_details[fmt], "path": FORMAT_FILES[fmt]} for fmt in exports},
        "stages": stages, "warnings": job.warnings, "seconds": round(time.perf_counter() - t_start, 3),
    }


def _public(side: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in side.items() if not k.startswith("_")}


def _stage_numbers(m: dict[str, Any]) -> dict[str, Any]:
    return {"params": m["params"], "macs": m["macs"], "size_bytes": m["size_bytes"],
            "latency_b32_ms": m["latency_ms"]["b32"] if m.get("latency_ms") else None, "accuracy": m["accuracy"]}


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
            failures.append(f"min_top1_agreement: no output is shaped like class scores, so agreement cannot be "
                            f"checked {where}; use min_sqnr_db in the recipe's [validate] instead")
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


def _gate_error(job: _Job, report: dict[str, Any], failures: list[str], kept: Path | None) -> GateError:
    advice = ("give training and validation data (--data / data=) so recovery steps run, use a gentler recipe, "
              "or relax the recipe's [validate] thresholds")
    where = f"; the rejected files are in {kept}" if kept else ("; nothing was written" if job.output else "")
    lines = "\n".join(f"  - {f}" for f in failures)
    notes = "".join(f"\n  note: {h}" for h in report["headline"])
    return GateError(f"recipe {job.recipe.name!r}: the compiled model failed its [validate] gate{where}:\n{lines}"
                     f"{notes}\n  {advice}")


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
