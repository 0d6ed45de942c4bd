"""Capture cost of the torch.export front end, against torch.export itself measured in the same run.

    PYTHONPATH=. python benchmarks/bench_capture_export.py            # BERT-base + the tiny HF models
    PYTHONPATH=. python benchmarks/bench_capture_export.py --onnx     # also ONNX: slimfx vs torch.onnx.export

For each model: torch.export.export with static shapes and with the dynamic batch/sequence dims
slimfx asks for (the peers: what any export-based tool pays), then slimfx's whole
`ir.capture(method="export")` (export + run on the example inputs + mapping to canonical ops),
median of --repeat runs after one warm-up. The target is a BERT-base capture under 10 s.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from _latency import median_seconds

from slimfx import ir
from slimfx.ir.capture_export import export_program
from slimfx.models import hf


def _median_seconds(fn, repeat: int, cpu: list[float] | None = None) -> float:
    """Median wall seconds of `fn` (see `median_seconds`); appends the median CPU seconds to `cpu`."""
    wall, cpu_s = median_seconds(fn, repeat)
    if cpu is not None:
        cpu.append(cpu_s)
    return wall


def bench_model(name: str, model: torch.nn.Module, kwargs: dict, repeat: int, onnx: bool) -> dict:
    row = {"model": name}
    row["export_static_s"] = _median_seconds(lambda: export_program(model, (), kwargs, dynamic=False), repeat)
    row["export_dynamic_s"] = _median_seconds(lambda: export_program(model, (), kwargs, dynamic=True), repeat)
    cpu: list[float] = []
    row["slimfx_capture_s"] = _median_seconds(
        lambda: ir.capture(model, (), example_kwargs=kwargs, method="export"), repeat, cpu)
    row["slimfx_capture_cpu_s"] = cpu[0]
    graph = ir.capture(model, (), example_kwargs=kwargs, method="export")
    row["nodes"] = len(graph)
    row["opaque"] = len(graph.find("opaque"))
    if onnx:
        import tempfile
        from pathlib import Path

        from slimfx.exporters.onnx import export_onnx

        inputs = tuple(kwargs.values())
        with tempfile.TemporaryDirectory() as d:
            row["slimfx_onnx_s"] = _median_seconds(
                lambda: export_onnx(graph, Path(d) / "m.onnx", inputs=inputs), 1)
            row["torch_onnx_s"] = _median_seconds(
                lambda: torch.onnx.export(model, (), str(Path(d) / "t.onnx"), kwargs=kwargs, dynamo=True,
                                          verbose=False), 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--onnx", action="store_true", help="also time ONNX export (slimfx vs torch.onnx)")
    parser.add_argument("--skip-base", action="store_true", help="tiny models only")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not hf.available():
        print("transformers is not installed (pip install 'slimfx[hf]')", file=sys.stderr)
        return 1
    cases = [] if args.skip_base else [("bert-base (12x768)", lambda: hf.build("bert", **hf.BERT_BASE))]
    cases += [(arch, lambda a=arch: hf.build(a)) for arch in hf.names()]
    try:
        from tqdm import tqdm
        it = tqdm(cases, desc="capture", disable=args.quiet or not sys.stderr.isatty())
    except ImportError:
        it = cases
    rows = []
    for name, build in it:
        model, kwargs = build()
        rows.append(bench_model(name, model, kwargs, args.repeat, args.onnx))

    cols = ["model", "nodes", "opaque", "export_static_s", "export_dynamic_s", "slimfx_capture_s",
            "slimfx_capture_cpu_s"]
    if args.onnx:
        cols += ["slimfx_onnx_s", "torch_onnx_s"]
    print(" | ".join(cols) + " | capture / dynamic export")
    for r in rows:
        cells = [f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        print(" | ".join(cells) + f" | {r['slimfx_capture_s'] / r['export_dynamic_s']:.2f}x")
    if not args.skip_base:
        base = rows[0]["slimfx_capture_s"]
        print(f"\nBERT-base capture through torch.export: {base:.2f} s wall, {rows[0]['slimfx_capture_cpu_s']:.2f} s "
              f"CPU ({'under' if base < 10 else 'OVER'} the 10 s target; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
