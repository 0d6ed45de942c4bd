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
                                   "given intra-op threads) on random inputs of its declared shapes. Each round opens "
                                   "a fresh session per file, in turns, and the best round is reported: two sessions "
                                   "of one file can be more than 10% apart on a busy or virtual machine. With several files, "
                                   "they must take the same inputs, and ratios to the first are printed.")
    p.add_argument("paths", type=_args.onnx_file, nargs="+", metavar="PATH.onnx")
    p.add_argument("--batch", type=_args.batch_sizes, default="1,32",
                   help="comma-separated batch sizes (default 1,32)")
    p.add_argument("--threads", type=_args.threads, default=1, help="intra-op threads (default 1)")
    p.add_argument("--runs", type=_args.count("timed runs", 1, 1_000_000), default=None,
                   help="timed runs per round (default: as many as fit in ~1 s)")
    p.add_argument("--rounds", type=_args.count("the number of rounds", 1, 1000), default=3,
                   help="rounds of fresh sessions (default 3)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    return p


def _signature(path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    from slimfx.exporters.bench import onnx_example_inputs

    return [(str(i), tuple(t.shape), str(t.dtype)) for i, t in enumerate(onnx_example_inputs(path, batch=2))]


def _fixed_batch(path: Path) -> int | None:
    """The batch size a file fixes (dim 0 of every input is a number), or None when it is symbolic."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in proto.graph.initializer}
    dims = [vi.type.tensor_type.shape.dim for vi in proto.graph.input if vi.name not in init]
    firsts = {d[0].dim_value if d and d[0].HasField("dim_value") else None for d in dims}
    return firsts.pop() if len(firsts) == 1 and None not in firsts else None


def run(args: argparse.Namespace) -> int:
    from slimfx.exporters.bench import interleaved_latency, onnx_example_inputs, ort_feed

    names = [p.name if [q.name for q in args.paths].count(p.name) == 1 else str(p) for p in args.paths]
    first = _signature(args.paths[0])
    for name, path in zip(names[1:], args.paths[1:]):
        if (sig := _signature(path)) != first:
            raise ValidationError(f"{name} takes other inputs than {names[0]} (shapes/dtypes {sig} vs {first}); "
                                  "only files with the same inputs can be timed side by side")
    batches = args.batch
    fixed = {name: b for name, path in zip(names, args.paths) if (b := _fixed_batch(path)) is not None}
    if len(set(fixed.values())) > 1:
        raise ValidationError(f"the files fix different batch sizes ({', '.join(f'{n}: {b}' for n, b in fixed.items())})"
                              "; only files that take the same inputs can be timed side by side")
    if fixed and batches != list(fixed.values())[:1]:
        name, b = next(iter(fixed.items()))
        print(f"note: {name} has a fixed batch size of {b}; timing batch {b} only", file=sys.stderr)
        batches = [b]
    for path in args.paths:  # a file onnxruntime refuses or cannot run is named before any timing
        sess = _args.open_onnx_session(path)
        try:
            sess.run(None, ort_feed(sess, onnx_example_inputs(path, batch=batches[0])))
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
            raise ValidationError(f"onnxruntime cannot run {path} at batch {batches[0]}: "
                                  f"{_args.first_line(e)}") from e
    files = dict(zip(names, (str(p) for p in args.paths)))
    rows: dict[str, dict[str, dict]] = {n: {} for n in names}
    for b in batches:
        rounds = interleaved_latency(files, onnx_example_inputs(args.paths[0], batch=b), rounds=args.rounds,
                                     threads=args.threads, runs=args.runs)
        for name, stats in rounds.items():
            best = min(stats, key=lambda s: s.median_ms)  # the round best_median_ms picks
            rows[name][f"b{b}"] = {**best.to_dict(), "rounds": len(stats)}
            if not args.json:
                ratio = "" if name == names[0] else \
                    f"  ({best.median_ms / rows[names[0]][f'b{b}']['median_ms']:.3f}x of {names[0]})"
                print(f"{name} batch {b}: {best} best of {len(stats)} rounds{ratio}")
    if args.json:
        print(json.dumps(rows[names[0]] if len(names) == 1 else rows, indent=2))
    return 0
