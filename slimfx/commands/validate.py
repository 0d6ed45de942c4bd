"""`slimfx validate PATH --model MODEL`: compare an exported ONNX/TorchScript file with the model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slimfx.ir.errors import ValidationError
from slimfx.loading import resolve_model


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("validate", help="compare an exported .onnx/.pt file with the model it came from",
                       description="Run PATH (ONNX with onnxruntime, or TorchScript) and MODEL on the same inputs "
                                   "and report max abs/rel error, cosine, SQNR and top-1 agreement. Exit status 2 "
                                   "when outside tolerance.")
    p.add_argument("path", type=Path, metavar="PATH")
    p.add_argument("--model", required=True, metavar="MODEL", help="zoo name, 'pkg.mod:callable' or 'file.py:callable'")
    p.add_argument("--batch", default="1,7", help="comma-separated batch sizes to check (default 1,7)")
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--untrained", action="store_true", help="zoo models: skip training, use random weights")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    from slimfx.exporters import validate_onnx, validate_torchscript, with_batch

    if not args.path.is_file():
        raise ValidationError(f"no exported model at {args.path}")
    loaded = resolve_model(args.model, trained=not args.untrained)
    batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    sets = [with_batch(loaded.example_inputs, b) for b in batches]
    fn = validate_torchscript if args.path.suffix in (".pt", ".pth", ".ts") else validate_onnx
    report = fn(args.path, loaded.module, sets, atol=args.atol, rtol=args.rtol)
    print(json.dumps(report.to_dict(), indent=2) if args.json else f"{args.path}: {report.summary()}")
    if not report.passed:
        raise ValidationError(f"{args.path} does not match {loaded.name}: {report.summary()}")
    return 0
