"""`slimfx bench PATH.onnx [MORE.onnx ...] [--batch 1,32] [--threads 1] [--rounds 3]`: onnxruntime latency of
ONNX files, measured side by side when there are several."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slimfx.commands import _args
from slimfx.ir.errors import ValidationError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="measure onnxruntime latency of ONNX files (side by side when several)",
                       description="Time each PATH with onnxruntime (CPU, all graph optimizations, sequential, the "
                                   "given intra-op threads) on random inputs of its declared shapes (dim 0 the "
                                   "--batch, other dynamic dims by --size or the example a slimfx file was exported "
                                   "from; printed before the timings). Each round opens a fresh session per file, in "
                                   "turns, and the best round is reported: two sessions of one file can be more than "
                                   "10% apart on a busy or virtual machine. With several files, all are timed on the "
                                   "first one's inputs, which they must take, and ratios to the first are printed.")
    p.add_argument("paths", type=_args.onnx_file, nargs="+", metavar="PATH.onnx")
    p.add_argument("--batch", type=_args.batch_sizes, default="1,32",
                   help="comma-separated batch sizes (default 1,32)")
    p.add_argument("--threads", type=_args.threads, default=1, help="intra-op threads (default 1)")
    p.add_argument("--runs", type=_args.count("timed runs", 1, 1_000_000), default=None,
                   help="timed runs per round (default: as many as fit in ~1 s)")
    p.add_argument("--rounds", type=_args.count("the number of rounds", 1, 1000), default=3,
                   help="rounds of fresh sessions (default 3)")
    p.add_argument("--size", type=_size, action="append", default=[], metavar="NAME=N",
                   help="the size of a dynamic dim other than the batch (dim 0), by the first file's name for it, "
                        "e.g. --size sequence=128; repeatable. Default: the size in the example a slimfx file "
                        "was exported from; a dim of no known size is refused, never guessed")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    return p


def _size(text: str) -> tuple[str, int]:
    """--size NAME=N: the size of a file's dynamic dim NAME (argparse type)."""
    name, sep, value = text.partition("=")
    try:
        size = int(value.strip(), 10) if sep else 0
    except ValueError:
        size = 0
    if not name.strip() or not 1 <= size <= _args.BATCH_MAX:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: give a dynamic dim's name and size as NAME=N, "
                                         f"N from 1 to {_args.BATCH_MAX}, e.g. --size sequence=128")
    return name.strip(), size


def _shapes(inputs: tuple, path: Path) -> dict[str, str]:
    from slimfx.exporters.bench import onnx_input_specs

    return {name: f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"
            for (name, _, _), x in zip(onnx_input_specs(path), inputs)}


def _listed(shapes: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in shapes.items())


def _inputs(path: Path, name: str, batch: int, sizes: dict[str, int]) -> tuple:
    from slimfx.exporters.bench import onnx_example_inputs

    try:
        return onnx_example_inputs(path, batch=batch, sizes=sizes)
    except ValidationError as e:
        raise ValidationError(f"{name}: {e}") from None


def _takes(path: Path, inputs: tuple) -> str | None:
    """Why the ONNX file cannot take `inputs` (count, dtype, rank, fixed sizes), or None."""
    from slimfx.exporters.bench import onnx_input_specs

    specs = onnx_input_specs(path)
    if len(specs) != len(inputs):
        return f"it takes {len(specs)} inputs, not {len(inputs)}"
    for (iname, dt, dims), x in zip(specs, inputs):
        if dt != x.dtype or len(dims) != x.dim() or any(isinstance(d, int) and d != s for d, s in zip(dims, x.shape)):
            declared = ", ".join(str(d) if d is not None else "?" for d in dims)
            return (f"its input {iname!r} is {str(dt).removeprefix('torch.')}[{declared}], not "
                    f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}")
    return None


def _fixed_batch(path: Path) -> int | None:
    """The batch size a file fixes (dim 0 of every input is a number), or None when it is symbolic."""
    from slimfx.exporters.bench import onnx_input_specs

    firsts = {dims[0] if dims and isinstance(dims[0], int) else None for _, _, dims in onnx_input_specs(path)}
    return firsts.pop() if len(firsts) == 1 and None not in firsts else None


def run(args: argparse.Namespace) -> int:
    from slimfx.exporters.bench import interleaved_latency, ort_feed

    names = [p.name if [q.name for q in args.paths].count(p.name) == 1 else str(p) for p in args.paths]
    sizes = dict(args.size)
    batches = args.batch
    fixed = {name: b for name, path in zip(names, args.paths) if (b := _fixed_batch(path)) is not None}
    if len(set(fixed.values())) > 1:
        raise ValidationError(f"the files fix different batch sizes ({', '.join(f'{n}: {b}' for n, b in fixed.items())})"
                              "; only files that take the same inputs can be timed side by side")
    if fixed and batches != list(fixed.values())[:1]:
        name, b = next(iter(fixed.items()))
        print(f"note: {name} has a fixed batch size of {b}; timing batch {b} only", file=sys.stderr)
        batches = [b]
    # every file is timed on the first one's inputs (its dynamic dims sized by --size, else by the example it
    # was exported from): the others only have to take them, whatever they name their dims
    inputs = {b: _inputs(args.paths[0], names[0], b, sizes) for b in batches}
    for name, path in zip(names[1:], args.paths[1:]):
        if (why := _takes(path, inputs[batches[0]])) is not None:
            raise ValidationError(f"{name} cannot take the inputs of {names[0]} ({why}; {names[0]} is timed on "
                                  f"{_listed(_shapes(inputs[batches[0]], args.paths[0]))}): only files with the same inputs "
                                  "can be timed side by side; bench them one at a time")
    for path in args.paths:  # a file onnxruntime refuses or cannot run is named before any timing
        sess = _args.open_onnx_session(path)
        try:
            sess.run(None, ort_feed(sess, inputs[batches[0]]))
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
            raise ValidationError(f"onnxruntime cannot run {path} at batch {batches[0]}: "
                                  f"{_args.first_line(e)}") from e
    files = dict(zip(names, (str(p) for p in args.paths)))
    rows: dict[str, dict[str, dict]] = {n: {} for n in names}
    for b in batches:
        shapes = _shapes(inputs[b], args.paths[0])
        if not args.json:
            print(f"batch {b} inputs: {_listed(shapes)}")
        rounds = interleaved_latency(files, inputs[b], rounds=args.rounds, threads=args.threads, runs=args.runs)
        for name, stats in rounds.items():
            best = min(stats, key=lambda s: s.median_ms)  # the round best_median_ms picks
            rows[name][f"b{b}"] = {**best.to_dict(), "rounds": len(stats), "inputs": shapes}
            if not args.json:
                ratio = "" if name == names[0] else \
                    f"  ({best.median_ms / rows[names[0]][f'b{b}']['median_ms']:.3f}x of {names[0]})"
                print(f"{name} batch {b}: {best} best of {len(stats)} rounds{ratio}")
    if args.json:
        print(json.dumps(rows[names[0]] if len(names) == 1 else rows, indent=2))
    return 0
