"""`slimfx export MODEL --format onnx|torchscript -o PATH`: capture, export, validate against the model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slimfx import ir
from slimfx.loading import resolve_model

SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="export a model to ONNX or TorchScript, validated with onnxruntime/torch",
                       description="Capture MODEL (a zoo name, 'package.module:callable' or "
                                   "'path/to/file.py:callable') and write it as ONNX (emitted from slimfx's IR) "
                                   "or TorchScript. The file is written only if its outputs match the model.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--format", choices=sorted(SUFFIX), default="onnx")
    p.add_argument("-o", "--output", type=Path, default=None, help="output file (default: MODEL.onnx / MODEL.pt)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17; 17-23)")
    p.add_argument("--fixed-batch", action="store_true", help="ONNX: fix the batch dim to the example inputs'")
    p.add_argument("--atol", type=float, default=1e-5, help="validation: absolute tolerance (default 1e-5)")
    p.add_argument("--rtol", type=float, default=1e-4, help="validation: relative tolerance (default 1e-4)")
    p.add_argument("--keep-invalid", action="store_true", help="keep the file even if validation fails")
    p.add_argument("--untrained", action="store_true", help="zoo models: skip training, use random weights")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    from slimfx.exporters import export_onnx, export_torchscript
    from slimfx.exporters.onnx import DEFAULT_OPSET

    loaded = resolve_model(args.model, trained=not args.untrained)
    graph = ir.capture(loaded.module, loaded.example_inputs)
    out = args.output or Path(loaded.name.replace(":", "_").replace("/", "_") + SUFFIX[args.format])
    common = dict(inputs=loaded.example_inputs, atol=args.atol, rtol=args.rtol, keep_invalid=args.keep_invalid)
    if args.format == "onnx":
        res = export_onnx(graph, out, opset=args.opset or DEFAULT_OPSET, dynamic_batch=not args.fixed_batch,
                          **common)
    else:
        res = export_torchscript(graph, out, **common)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        extra = f" ({res.details['method']})" if args.format == "torchscript" else ""
        print(f"wrote {res.path} ({res.size_bytes:,} bytes, {res.format}{extra}) in {res.seconds:.2f} s")
        print(f"validation: {res.validation.summary()}")
    return 0
