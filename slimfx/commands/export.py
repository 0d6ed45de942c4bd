"""`slimfx export MODEL --format onnx|torchscript|pt2|slimfx -o PATH`: capture, export, validate against the
model. MODEL may be a saved `model.slimfx` (its graph is exported as it is)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slimfx import ir
from slimfx.commands import _args
from slimfx.exporters.onnx.export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
from slimfx.ir.errors import ExportError
from slimfx.loading import IMPORT_NOTE, resolve_model

SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2", "slimfx": ".slimfx"}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="export a model to ONNX, TorchScript, torch.export (.pt2) or a slimfx model "
                                      "file, validated with onnxruntime/torch",
                       description="Capture MODEL (a zoo name, 'package.module:callable', "
                                   "'path/to/file.py:callable', or a saved 'model.slimfx') and write it as ONNX "
                                   "(emitted from slimfx's IR), TorchScript, a torch.export program (.pt2) or a "
                                   "slimfx model file (.slimfx). The file is written only if its outputs match the "
                                   "model." + " " + IMPORT_NOTE)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--format", choices=sorted(SUFFIX), default=None,
                   help="what to write (default: the one -o's suffix names: .onnx, .pt TorchScript, .pt2, .slimfx; "
                        "onnx for any other suffix or without -o)")
    p.add_argument("-o", "--output", type=_args.output_file, default=None,
                   help="output file (default: MODEL.onnx / MODEL.pt); an existing regular file is replaced, "
                        "anything else (folder, FIFO, device) is refused")
    p.add_argument("--opset", type=_args.count("the ONNX opset", MIN_OPSET, MAX_OPSET), default=None,
                   help=f"ONNX opset (default {DEFAULT_OPSET}, or 21 for a model with 4-bit or blocked weights; "
                        f"{MIN_OPSET}-{MAX_OPSET})")
    p.add_argument("--fixed-batch", action="store_true",
                   help="ONNX, pt2: fix the batch dim to the example inputs'")
    p.add_argument("--dynamic-dims", type=_args.dynamic_dims, default=None, metavar="DIMS",
                   help=_args.DYNAMIC_DIMS_HELP)
    p.add_argument("--atol", type=_args.tolerance, default=None,
                   help="validation: absolute tolerance (default 1e-5; ONNX of a model with quantized activations, "
                        "which onnxruntime runs with integer kernels: 0.25)")
    p.add_argument("--rtol", type=_args.tolerance, default=None,
                   help="validation: relative tolerance (default 1e-4; ONNX with integer kernels: 0.05)")
    p.add_argument("--keep-invalid", action="store_true", help="keep the file even if validation fails")
    p.add_argument("--untrained", action="store_true", help="zoo models: skip training, use random weights")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _args.add_plugin_argument(p)
    return p


def _format(given: str | None, out: Path | None) -> str:
    """The format to write: --format, else the one -o's suffix names (onnx otherwise). A --format whose file
    would carry another format's suffix (`--format onnx -o model.pt`) is refused: that file would be misread."""
    named = next((f for f, suffix in SUFFIX.items() if out is not None and out.suffix.lower() == suffix), None)
    if given is None:
        return named or "onnx"
    if named is not None and named != given:
        raise ExportError(f"-o {out} has the suffix of a {named} file but --format is {given}: drop --format (the "
                          f"suffix chooses) or name the file {out.with_suffix(SUFFIX[given]).name}")
    return given


def run(args: argparse.Namespace) -> int:
    from slimfx.exporters import export_onnx, export_pt2, export_slimfx, export_torchscript

    args.format = _format(args.format, args.output)
    spec = args.model.strip()
    name = spec.rpartition(":")[2] if ":" in spec else spec  # what resolve_model names the model
    out = args.output or Path(name.replace("/", "_") + SUFFIX[args.format])
    _args.check_output_file(out)  # before any work: a FIFO, device or folder there is never replaced
    from slimfx.driver import apply_dynamic_dims, check_dynamic_dims

    dims = check_dynamic_dims(args.dynamic_dims, not args.fixed_batch)  # a fixed batch that names batch: refused
    loaded = resolve_model(spec, trained=not args.untrained)
    _args.check_output_file(out)  # again, now that the model's file is known: it is never overwritten
    if loaded.graph is not None:
        graph = loaded.graph
        if dims is not None:
            apply_dynamic_dims(graph, dims, loaded.positional()[1])
    else:
        graph = ir.capture(loaded.module, loaded.example_inputs, example_kwargs=loaded.example_kwargs,
                           dynamic_dims=dims)
    common = dict(inputs=loaded.positional()[1], keep_invalid=args.keep_invalid,
                  **{k: v for k in ("atol", "rtol") if (v := getattr(args, k)) is not None})
    if args.format == "onnx":
        res = export_onnx(graph, out, opset=args.opset, dynamic_batch=not args.fixed_batch,
                          **common)
    elif args.format == "pt2":
        res = export_pt2(graph, out, dynamic_batch=not args.fixed_batch, **common)
    elif args.format == "slimfx":
        res = export_slimfx(graph, out, **common)
    else:
        res = export_torchscript(graph, out, **common)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        extra = f" ({res.details['method']})" if args.format == "torchscript" else ""
        print(f"wrote {res.path} ({res.size_bytes:,} bytes, {res.format}{extra}) in {res.seconds:.2f} s")
        print(f"validation: {res.validation.summary()}")
    return 0
