"""`slimfx bench PATH.onnx [--batch 1,32] [--threads 1]`: onnxruntime latency of an ONNX file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ir.errors import ValidationError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="measure onnxruntime latency of an ONNX file",
                       description="Time PATH with onnxruntime (CPU, all graph optimizations, sequential, the "
                                   "given intra-op threads) on random inputs of its declared shapes.")
    p.add_argument("path", type=Path, metavar="PATH.onnx")
    p.add_argument("--batch", default="1,32", help="comma-separated batch sizes (default 1,32)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--runs", type=int, default=None, help="timed runs (default: as many as fit in ~1 s)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    from exporters.bench import measure_latency, onnx_example_inputs

    if not args.path.is_file():
        raise ValidationError(f"no ONNX file at {args.path}")
    rows = {}
    for b in (int(x) for x in str(args.batch).split(",") if x.strip()):
        stats = measure_latency(args.path, onnx_example_inputs(args.path, batch=b), threads=args.threads,
                                runs=args.runs)
        rows[f"b{b}"] = stats.to_dict()
        if not args.json:
            print(f"{args.path.name} batch {b}: {stats}")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0
