"""`slimfx compile [MODEL]`: the main job. Without MODEL: digits_cnn (trained on first use), recipe
`default`, outputs in ./slimfx-out/."""

from __future__ import annotations

import argparse
import json
import logging

import torch

from slimfx.commands import _args
from slimfx.driver import DEFAULT_BENCH_SECONDS, DEFAULT_RECIPE
from slimfx.ir.errors import SlimfxError
from slimfx.loading import IMPORT_NOTE, resolve_model

DEFAULT_MODEL = "digits_cnn"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("compile", help="prune, distil, quantize and export a model, with a report",
                       description="Compile MODEL with a recipe into validated ONNX/TorchScript/torch.export files "
                                   "and a report (report.json, report.md). MODEL is a zoo name, "
                                   "'package.module:callable', 'path/to/file.py:callable', or a saved "
                                   "'model.slimfx' to continue from (resume: e.g. prune once, then try several "
                                   f"quantization recipes); default: {DEFAULT_MODEL}. {IMPORT_NOTE}")
    p.add_argument("model", metavar="MODEL", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help="built-in recipe name or path to a .toml file "
                   f"(default: {DEFAULT_RECIPE})")
    p.add_argument("-o", "--out", type=_args.output_dir, default="slimfx-out",
                   help="output directory (default: ./slimfx-out)")
    p.add_argument("--format", type=_args.export_formats, default=None,
                   help="onnx, torchscript, pt2 (torch.export) and/or slimfx (a model file `compile` can resume "
                        "from), comma-separated (default: the recipe's [export] formats)")
    p.add_argument("--calibration-samples", type=_args.count("the number of calibration samples", 1, 1_000_000),
                   default=None, help="training samples drawn to calibrate quantization when the data has no "
                   "calibration part (default: the data's calibration_samples, 256)")
    p.add_argument("--seed", type=_args.seed, default=0,
                   help=f"seeds weights, data order and a user callable's random example inputs (0-{_args.SEED_MAX})")
    p.add_argument("--threads", type=_args.threads, default=1,
                   help="torch threads for calibration and training (default 1: fastest for small models, "
                        "and steady on a busy machine); latency is always measured on 1 thread")
    p.add_argument("--bench-seconds", type=_args.bench_seconds, default=DEFAULT_BENCH_SECONDS,
                   help="the one time budget of the latency report: every file at batch 1 and 32, side by side "
                        f"in up to 3 rounds of fresh sessions (default {DEFAULT_BENCH_SECONDS:g} s; more is "
                        "steadier; 0: no latency report, as --no-bench)")
    p.add_argument("--no-bench", action="store_true", help="skip the latency report (sizes and checks stay)")
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="your data: 'file.py:fn' or 'package.module:fn' returning slimfx.Data(train=..., "
                        "validation=..., test=..., calibration=...); zoo models bring their own (default: the "
                        "recipe's data key)")
    p.add_argument("--fixed-batch", action="store_true",
                   help="for a model that runs at its example's batch size only: ONNX/pt2 files fixed at that "
                        "batch size, data run in chunks of it")
    p.add_argument("--dynamic-dims", type=_args.dynamic_dims, default=None, metavar="DIMS",
                   help=_args.DYNAMIC_DIMS_HELP)
    p.add_argument("--force", action="store_true", help="replace an existing, non-empty --out directory")
    p.add_argument("--keep-rejected", action="store_true",
                   help="when the recipe's [validate] gate fails, write the outputs to OUT.rejected/ for inspection "
                        "(exit code 3 either way)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables; print only the output path")
    p.add_argument("--print-ir", action="store_true", help="print the IR after every pass that changed it")
    _args.add_plugin_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    from slimfx.data import load_data, zoo_data
    from slimfx.driver import compile as compile_model
    from slimfx.output import OutputDir
    from slimfx.recipe import load_recipe
    from slimfx.report import format_report

    if args.threads < 1:
        raise SlimfxError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    recipe = load_recipe(args.recipe)  # recipe errors surface before any model is loaded or trained
    formats = ([f.strip() for f in args.format.split(",") if f.strip()] if args.format else None)
    OutputDir.claim(args.out, force=args.force).discard()  # refuse a bad --out before loading or training
    data = load_data(args.data) if args.data else recipe.load_data()
    loaded = resolve_model(args.model, seed=args.seed, progress=not args.quiet)
    OutputDir.claim(args.out, force=args.force).discard()  # again: --out must not hold the model or data file read
    if data is None and loaded.zoo is not None and loaded.zoo.dataset:
        data = zoo_data(loaded.zoo.dataset, seed=args.seed, calibration_samples=args.calibration_samples or 256)
    elif data is not None and args.calibration_samples is not None:  # the flag overrides what the data says
        data.calibration_samples = args.calibration_samples
    model = loaded.graph if loaded.graph is not None else loaded.module  # a saved graph: resume from its IR
    result = compile_model(model, loaded.example_inputs, recipe, data=data,
                           example_kwargs=loaded.example_kwargs, out_dir=args.out, formats=formats, force=args.force,
                           keep_rejected=args.keep_rejected, name=loaded.name, quiet=args.quiet, seed=args.seed,
                           bench_seconds=0 if args.no_bench else args.bench_seconds, print_ir=args.print_ir,
                           dynamic_batch=not args.fixed_batch, dynamic_dims=args.dynamic_dims)
    if args.quiet:
        print(result.out_dir)
        return 0
    print(f"\nslimfx compiled {loaded.name} with recipe '{recipe.name}' in {result.report['seconds']:.1f} s\n")
    print(format_report(result.report))
    print(f"\nwrote {', '.join(str(p) for p in result.exports.values())}, "
          f"{result.out_dir / 'report.json'}, {result.out_dir / 'report.md'}")
    if logging.getLogger("slimfx").isEnabledFor(logging.DEBUG):
        print(json.dumps(result.report, indent=2, default=str))
    return 0
