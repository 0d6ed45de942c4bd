"""The README's results table: every zoo model through the built-in recipes with `slimfx.compile`.

Each row is one compile (trained zoo weights and the zoo's data: 256 calibration samples and fine-tuning from
the train split, the gate on the validation split, accuracy on the test split); ratios are compiled/original
on onnxruntime, one thread, in the same run. A row the recipe's gate rejects is marked ✗ (no latency: it is
not measured for a rejected model).

    PYTHONPATH=. python benchmarks/bench_recipes.py                 # every zoo model, recipes int8 and default
    PYTHONPATH=. python benchmarks/bench_recipes.py --models digits_cnn --recipes default,int8,prune50
    PYTHONPATH=. python benchmarks/bench_recipes.py --recipes all    # every built-in recipe on every zoo model
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import slimfx
from slimfx import models
from slimfx.data import zoo_data
from slimfx.errors import GateError
from slimfx.recipe import builtin_recipes


def run(model_name: str, recipe: str, seed: int = 0, bench_seconds: float = 1.0, steady_rounds: int = 0) -> dict:
    spec = models.get(model_name)
    module = spec.trained(seed=seed, progress=False)
    steady = None
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        try:
            r = slimfx.compile(module, spec.example_inputs(), recipe, name=model_name, out_dir=out, formats=("onnx",),
                               data=zoo_data(spec.dataset, seed=seed), quiet=True, seed=seed,
                               bench_seconds=bench_seconds).report
            passed = True
        except GateError as e:
            r, passed = e.report, False
        seconds = time.perf_counter() - t0
        if steady_rounds and passed:
            steady = _steady_ratios(module, spec.example_inputs(), Path(out) / "model.onnx", steady_rounds)
    b, c = r["baseline"], r["compressed"]
    return {"model": model_name, "recipe": recipe, "macs": c["macs"] / b["macs"],
            "size": c["size_bytes"] / b["size_bytes"],
            "b1": _ratio(c, b, "b1"), "b32": _ratio(c, b, "b32"), "passed": passed,
            "acc0": b["accuracy"], "acc1": c["accuracy"], "agree": r["validation"]["top1_agreement"],
            "sqnr": r["validation"]["sqnr_db"], "seconds": seconds, "guard": _guard(r), "steady": steady}


def _steady_ratios(module, example, compiled: Path, rounds: int) -> dict[str, tuple[float, float]]:
    """compiled/original time at batch 1 and 32, steadier than the report's few wall-clock rounds on a busy
    machine: `rounds` interleaved rounds (fresh sessions, rotating order), one thread, thread CPU clock, the
    best round of each file; with the noise of the ratio (each file's second-best round above its best, added)."""
    from slimfx import ir
    from slimfx.exporters import export_onnx, with_batch
    from slimfx.exporters.bench import interleaved_latency

    with tempfile.TemporaryDirectory() as tmp:
        original = export_onnx(ir.capture(module, example, for_inference=True), Path(tmp) / "original.onnx",
                               inputs=example, validate=False).path
        out = {}
        for b in (1, 32):
            t = interleaved_latency({"original": original, "compiled": compiled}, with_batch(example, b),
                                    rounds=rounds, budget_s=0.3, clock="cpu")
            best = {k: sorted(s.median_ms for s in v) for k, v in t.items()}
            noise = sum(v[1] / v[0] - 1 for v in best.values())
            out[f"b{b}"] = (best["compiled"][0] / best["original"][0], noise)
    return out


def _xs(v: tuple[float, float] | None) -> str:
    return f"{v[0]:.2f}x ±{v[1]:.2f}" if v is not None else "—"


def _guard(report: dict) -> str:
    """What the quantize step's speed guard kept float (and its int8/fp32 verdict), '' when it did not run."""
    for p in report["passes"]:
        g = p["stats"].get("speed_guard") if p["name"] in ("quantize", "quantize-weights") else None
        if p["name"] == "quantize-weights" and isinstance(g, dict):  # MatMulNBits or the folded form
            r = g.get("model_ratio")
            return f"form: {g['chosen']}" + (" (MatMulNBits {b1:.2f}x/{b32:.2f}x)".format(**r["nbits"]) if r else "")
        if isinstance(g, dict):
            kept = "whole model" if g["chosen"] == "float" else "weight-only (int8 weights, float compute)" \
                if g["chosen"] == "weight-only" else ", ".join(g["kept_float"]) or "none"
            v = (g.get("model_verdict") or {}).get("int8")
            return kept + (f" (int8 {v['b1']:.2f}x/{v['b32']:.2f}x ±{v['spread']:.2f})" if v else "")
        if isinstance(g, str):
            return g.split(":")[0]
    return ""


def _ratio(compiled: dict, original: dict, batch: str) -> float | None:
    c, o = (compiled.get("latency_ms") or {}).get(batch), (original.get("latency_ms") or {}).get(batch)
    return c / o if c and o else None


def _x(v: float | None) -> str:
    return f"{v:.2f}x" if v is not None else "—"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(models.names()))
    ap.add_argument("--recipes", default="int8,default", help="comma-separated, or 'all' (every built-in)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training and calibration")
    ap.add_argument("--bench-seconds", type=float, default=1.0)
    ap.add_argument("--steady-rounds", type=int, default=0, help=(
        "also time original and compiled ONNX in this many interleaved rounds (thread CPU clock, best round): "
        "the 'steady' columns, for a busy machine; 0: off"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    recipes = builtin_recipes() if args.recipes == "all" else args.recipes.split(",")
    print("| model | recipe | MACs | ONNX size | latency b1 | latency b32 | accuracy (orig → compiled) "
          "| top-1 agreement | SQNR | compile time | speed guard kept float"
          + (" | steady b1 | steady b32 |" if args.steady_rounds else " |"))
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.steady_rounds else ""))
    for m in args.models.split(","):
        for rec in recipes:
            row = run(m.strip(), rec.strip(), bench_seconds=args.bench_seconds, steady_rounds=args.steady_rounds)
            rows.append(row)
            gate = "" if row["passed"] else " ✗"
            print(f"| {row['model']} | {row['recipe']}{gate} | {row['macs']:.3f}x | {row['size']:.3f}x | {_x(row['b1'])} "
                  f"| {_x(row['b32'])} | {100 * row['acc0']:.2f}% → {100 * row['acc1']:.2f}% "
                  f"| {100 * row['agree']:.1f}% | {row['sqnr']:.1f} dB | {row['seconds']:.0f} s | {row['guard']} |"
                  + (f" {_xs((row['steady'] or {}).get('b1'))} | {_xs((row['steady'] or {}).get('b32'))} |"
                     if args.steady_rounds else ""), flush=True)


if __name__ == "__main__":
    main()
