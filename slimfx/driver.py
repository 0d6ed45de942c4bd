"""slimfx.compile(): capture -> recipe passes -> validated exports -> an honest report.

The driver is the only place that knows the order of things: passes never call exporters and
exporters never run passes.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import shutil
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
from slimfx.ir.errors import ExportError, RecipeError, SlimfxError, ValidationError
from slimfx.passes import PassContext
from slimfx.recipe import Recipe, load_recipe

log = logging.getLogger("slimfx")

FORMAT_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}


@dataclass
class CompileResult:
    """What compile() produced: the final IR, a runnable module, the exported files and the report."""

    graph: ir.Graph
    module: fx.GraphModule
    exports: dict[str, Path]
    report: dict[str, Any]
    out_dir: Path | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)


# --- metrics -------------------------------------------------------------------------------------------

def _flat_outputs(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flat_outputs(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat_outputs(v)]
    return []


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float | None]:
    """max_abs_diff, top1_agreement (2-D logits only) and SQNR in dB of `candidate` against `reference`."""
    ref = reference.detach().double()
    cand = candidate.detach().double().reshape(ref.shape)
    noise = float(((ref - cand) ** 2).sum())
    signal = float((ref ** 2).sum())
    sqnr = math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)
    top1 = None
    if ref.dim() == 2 and ref.shape[1] > 1:
        top1 = float((ref.argmax(1) == cand.argmax(1)).double().mean())
    return {"max_abs_diff": float((ref - cand).abs().max()) if ref.numel() else 0.0,
            "top1_agreement": top1, "sqnr_db": sqnr if math.isfinite(sqnr) else 999.0}


def _run_batched(fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], batch: int = 256) -> torch.Tensor:
    outs = []
    n = inputs[0].shape[0]
    with torch.no_grad():
        for i in range(0, n, batch):
            outs.append(_flat_outputs(fn(*(t[i:i + batch] for t in inputs)))[0])
    return torch.cat(outs)


def _onnx_runner(path: Path) -> Callable[..., torch.Tensor]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def run(*xs: torch.Tensor) -> torch.Tensor:
        out = sess.run(None, {n: x.numpy() for n, x in zip(names, xs)})
        return torch.from_numpy(np.asarray(out[0]))
    return run


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).double().mean())


LATENCY_ROUNDS = 3


def _latencies(paths: dict[str, Path], example: tuple, budget_s: float, progress: Any) -> dict[str, dict[str, float]]:
    """onnxruntime latency on one thread at batch 1 and 32 of each file, measured side by side: the best of
    LATENCY_ROUNDS rounds of fresh sessions (one session alone can be more than 10% off; see
    `exporters.interleaved_latency`). `budget_s` is the timed budget per file and batch; `progress` a tqdm bar."""
    from slimfx.exporters import best_median_ms, interleaved_latency, with_batch

    result: dict[str, dict[str, float]] = {k: {} for k in paths}
    for key, batch in (("b1", 1), ("b32", 32)):
        runs = interleaved_latency(paths, with_batch(example, batch), rounds=LATENCY_ROUNDS,
                                   budget_s=budget_s / LATENCY_ROUNDS)
        for k, stats in runs.items():
            result[k][key] = round(best_median_ms(stats), 4)
        progress.update(1)
    return result


# Fresh sessions of one file land up to 10-15% apart here; only a clearer slowdown is worth a warning.
SLOWER_WARN_RATIO = 1.2


def _slower_warnings(baseline: dict[str, float] | None, compressed: dict[str, float] | None) -> list[str]:
    """A warning per batch size at which the compiled model runs clearly slower than the original."""
    out = []
    for key, (b, c) in ((k, ((baseline or {}).get(k), (compressed or {}).get(k))) for k in ("b1", "b32")):
        if b and c and c > SLOWER_WARN_RATIO * b:
            out.append(f"the compiled model is slower than the original at batch {key[1:]} ({c / b:.2f}x on "
                       "onnxruntime, 1 thread): at this size the recipe's kernels do not pay off; if that is your "
                       "deployment batch, try another recipe or keep the original")
    return out


# --- the main entry point --------------------------------------------------------------------------------

def _as_tuple(x: Any) -> tuple:
    if isinstance(x, tuple):
        return x
    if isinstance(x, list):
        return tuple(x)
    return (x,)


def compile(model: nn.Module, example_inputs: Any, recipe: str | Path | Recipe = "int8", *,  # noqa: A001
            example_kwargs: dict[str, Any] | None = None, calibration_data: Iterable | None = None,
            train_data: Iterable | None = None, eval_fn: Callable[[nn.Module], float] | None = None,
            out_dir: str | Path | None = None, formats: Sequence[str] = ("onnx",),
            check_numerics: bool = True, test_data: tuple[Any, torch.Tensor] | None = None,
            name: str | None = None, quiet: bool = False, seed: int = 0,
            bench_seconds: float = 0.8) -> CompileResult:
    """Compile `model` with a recipe: capture, run its passes, export and validate, and report.

    recipe: a built-in name (`slimfx passes`/README list them), a TOML path, or a `Recipe`.
    calibration_data: iterable of input tuples for static quantization (default: the example
        inputs, which the report flags as weak). train_data: iterable of `(inputs_tuple, target)`
        batches for fine-tuning / distillation steps. eval_fn: module -> accuracy in [0, 1].
    test_data: `(inputs_tuple, labels)` used for accuracy (when no eval_fn) and for the
        validation numbers; without it, validation uses the example inputs.
    formats: what to export into `out_dir` ("onnx", "torchscript"). Nothing is written unless
        every step succeeds.
    bench_seconds: timed budget per ONNX file and batch size, split over rounds of fresh sessions that
        alternate between the original and the compiled model (more is steadier).
    """
    t_start = time.perf_counter()
    example = _as_tuple(example_inputs) if example_inputs is not None else ()
    run_model: Callable[..., Any] = model
    if example_kwargs:
        # Keyword inputs become graph inputs named after forward's parameters, in forward's order;
        # everything after capture (passes, exports, latency) takes them positionally in that order.
        names = [p for p in inspect.signature(model.forward).parameters][len(example):]
        unknown_kw = [k for k in example_kwargs if k not in names]
        if unknown_kw:
            raise SlimfxError(f"example_kwargs names {unknown_kw[0]!r}, which {type(model).__name__}.forward "
                              f"does not take; its parameters: {', '.join(names)}")
        kw_names = [n for n in names if n in example_kwargs]
        n_pos = len(example)
        example = example + tuple(example_kwargs[n] for n in kw_names)

        def run_model(*xs: Any) -> Any:
            return model(*xs[:n_pos], **dict(zip(kw_names, xs[n_pos:])))
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMAT_FILES]
    if unknown:
        raise SlimfxError(f"unknown export format {unknown[0]!r}; choose from {', '.join(FORMAT_FILES)}")
    pipeline = rec.build_passes()  # raises RecipeError for unknown passes/options before any work
    warnings: list[str] = []
    if calibration_data is None and any(p.needs_calibration for p in pipeline):
        calibration_data = [example]
        warnings.append("static quantization calibrated on the example inputs only; pass calibration_data "
                        "(a few hundred representative samples) for trustworthy activation ranges")
    ctx = PassContext(example_inputs=example, calibration_data=calibration_data, train_data=train_data,
                      eval_fn=eval_fn, teacher=model, seed=seed, quiet=quiet)
    rec.check_context(pipeline, ctx)  # a step that needs data that was not given
    for w in warnings:
        log.warning("warning: %s", w)

    graph = ir.capture(model, example) if not example_kwargs else ir.capture(
        model, example[:n_pos], example_kwargs=dict(zip(kw_names, example[n_pos:])))
    model_name = name or type(model).__name__

    if test_data is not None:
        val_inputs, val_labels = _as_tuple(test_data[0]), test_data[1]
    else:
        val_inputs, val_labels = example, None
    with torch.no_grad():
        reference = _run_batched(run_model, val_inputs)

    def accuracy_of(fn: Callable[..., Any], module: nn.Module | None) -> float | None:
        if eval_fn is not None and module is not None:
            return float(eval_fn(module))
        if val_labels is not None:
            return _accuracy(_run_batched(fn, val_inputs), val_labels)
        return None

    from tqdm.auto import tqdm

    progress = tqdm(desc="benchmarking", unit="run", leave=False, disable=quiet or not sys.stderr.isatty())
    with tempfile.TemporaryDirectory(prefix="slimfx-") as tmp, contextlib.closing(progress):
        tmp_path = Path(tmp)
        from slimfx.exporters import export_onnx

        def onnx_file(path: Path, what: str) -> Path | None:
            """An ONNX export of the graph as it is now, for its size and latency. When ONNX was not asked
            for and the graph cannot be written as ONNX, those numbers are left out (warned)."""
            try:
                return export_onnx(graph, path, inputs=example).path
            except ExportError as e:
                if "onnx" in formats:
                    raise
                warnings.append(f"no ONNX size or latency for the {what} model: {e}".split("\n")[0])
                return None

        baseline_onnx = onnx_file(tmp_path / "baseline.onnx", "original")
        baseline = {"params": ir.count_params(graph), "macs": ir.count_macs(graph),
                    "size_bytes": baseline_onnx.stat().st_size if baseline_onnx else None,
                    "latency_ms": None, "accuracy": accuracy_of(run_model, model)}
        stages = [{"stage": "original"}]  # filled in once both latencies are measured side by side

        records = []
        from slimfx.passes import PassManager

        for i, p in enumerate(pipeline):
            pm = PassManager([p], verify_each=True,
                             check_numerics=1e-4 if check_numerics and p.preserves_outputs else None)
            records.extend(pm.run(graph, ctx))
            if records[-1].changed and not p.is_analysis:
                stages.append(_measure_stage(f"{i + 1}. {p.name}", graph, example, tmp_path, i, accuracy_of,
                                             bench_seconds, progress))

        module = ir.lower(graph).eval()
        staging = tmp_path / "out"
        staging.mkdir()
        exports: dict[str, Path] = {}
        export_details: dict[str, Any] = {}
        validate_cfg = rec.validate
        for fmt in formats:
            target = staging / FORMAT_FILES[fmt]
            if fmt == "onnx":
                res = export_onnx(graph, target, inputs=example, opset=rec.export.opset, **_export_tolerances(rec))
            else:
                from slimfx.exporters import export_torchscript

                res = export_torchscript(graph, target, inputs=example)
            exports[fmt] = target
            export_details[fmt] = res.to_dict()

        deployed = _onnx_runner(exports["onnx"]) if "onnx" in exports else module
        compressed_onnx = exports.get("onnx") or onnx_file(tmp_path / "compressed.onnx", "compiled")
        timed = {k: p for k, p in (("baseline", baseline_onnx), ("compressed", compressed_onnx)) if p is not None}
        latency = _latencies(timed, example, bench_seconds, progress) if timed else {}
        baseline["latency_ms"] = latency.get("baseline")
        stages[0] = {"stage": "original", **_stage_numbers(baseline)}
        warnings.extend(_slower_warnings(latency.get("baseline"), latency.get("compressed")))
        candidate = _run_batched(deployed, val_inputs)
        validation = compare(reference, candidate)
        compressed = {
            "params": ir.count_params(graph), "macs": ir.count_macs(graph),
            "size_bytes": compressed_onnx.stat().st_size if compressed_onnx else None,
            "latency_ms": latency.get("compressed"),
            "accuracy": (float(eval_fn(module)) if eval_fn is not None else
                         (_accuracy(candidate, val_labels) if val_labels is not None else None)),
        }
        stages.append({"stage": "compiled", **_stage_numbers(compressed)})
        _check_validation(validation, validate_cfg, rec)

        report = {
            "model": model_name, "recipe": rec.name,
            "baseline": baseline, "compressed": compressed, "validation": validation,
            "passes": [r.to_dict() for r in records],
            "exports": {fmt: {**export_details[fmt], "path": FORMAT_FILES[fmt]} for fmt in exports},
            "stages": stages, "warnings": warnings,
            "seconds": round(time.perf_counter() - t_start, 3),
        }
        final_exports: dict[str, Path] = {}
        out_path = Path(out_dir) if out_dir is not None else None
        if out_path is not None:
            (staging / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
            from slimfx.report import write_markdown

            write_markdown(report, staging / "report.md", staging / "report.png")
            out_path.mkdir(parents=True, exist_ok=True)
            for f in staging.iterdir():
                shutil.move(str(f), out_path / f.name)
            final_exports = {fmt: out_path / FORMAT_FILES[fmt] for fmt in exports}
    return CompileResult(graph, module, final_exports, report, out_path, stages)


def _stage_numbers(m: dict[str, Any]) -> dict[str, Any]:
    return {"params": m["params"], "macs": m["macs"], "size_bytes": m["size_bytes"],
            "latency_b32_ms": m["latency_ms"]["b32"] if m.get("latency_ms") else None, "accuracy": m["accuracy"]}


def _export_quiet(graph: ir.Graph, path: Path, example: tuple) -> Path:
    from slimfx.exporters import export_onnx

    return export_onnx(graph, path, inputs=example).path


def _measure_stage(label: str, graph: ir.Graph, example: tuple, tmp: Path, index: int,
                   accuracy_of: Callable, bench_seconds: float, progress: Any) -> dict[str, Any]:
    """Size, latency and accuracy after one pass (latency/size left out when the stage cannot export)."""
    module = ir.lower(graph).eval()
    row: dict[str, Any] = {"stage": label, "params": ir.count_params(graph), "macs": ir.count_macs(graph),
                           "size_bytes": None, "latency_b32_ms": None, "accuracy": accuracy_of(module, module)}
    try:
        path = _export_quiet(graph, tmp / f"stage{index}.onnx", example)
        row["size_bytes"] = path.stat().st_size
        row["latency_b32_ms"] = _latencies({"stage": path}, example, bench_seconds, progress)["stage"]["b32"]
    except SlimfxError as e:
        log.info("stage %s not exportable on its own: %s", label, e)
    return row


def _export_tolerances(rec: Recipe) -> dict[str, Any]:
    return {k: v for k in ("atol", "rtol") if (v := getattr(rec.validate, k)) is not None}


def _check_validation(validation: dict[str, Any], cfg: Any, rec: Recipe) -> None:
    need = cfg.min_top1_agreement
    got = validation.get("top1_agreement")
    if need is not None and got is not None and got < need:
        raise ValidationError(
            f"the compiled model agrees with the original on only {got:.2%} of top-1 predictions; recipe "
            f"'{rec.name}' requires {need:.2%} ([validate] min_top1_agreement). Give more calibration or "
            "training data, a gentler recipe, or lower the threshold in the recipe.")
    need_sqnr = cfg.min_sqnr_db
    if need_sqnr is not None and validation["sqnr_db"] < need_sqnr:
        raise ValidationError(f"output SQNR {validation['sqnr_db']:.1f} dB is below the recipe's "
                              f"min_sqnr_db {need_sqnr} ([validate] in recipe '{rec.name}')")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


__all__ = ["compile", "CompileResult", "compare", "RecipeError"]
