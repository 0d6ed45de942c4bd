"""Where int8 time goes: onnxruntime's profiler on the fp32, slimfx's int8 and onnxruntime's own int8 ONNX.

Per op type and per conv, kernel time at one thread, averaged over the runs (interleaved: each runs
`--runs` calls in turn, `--rounds` times; the best round per op is kept, since interference only adds time).
The int8 conv times are also shown as a ratio of the matching fp32 conv (the graphs list their convs in the
same order). `--peer` adds onnxruntime's `quantize_static` (as in bench_quant.py) and the op types each
int8 file runs after onnxruntime's graph optimizations (`optimized_model_filepath`).

    PYTHONPATH=. python benchmarks/profile_quant.py [--model mobilenetv2] [--batch 32] [--runs 50] [--peer]
    PYTHONPATH=. python benchmarks/profile_quant.py --skip "features.0.*" "features.1.conv.0*"   # keep those float
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter

import torch
from bench_quant import fused_ops, setup, theirs_quantize

from slimfx.exporters.bench import ort_feed
from slimfx.exporters.onnx import to_onnx_model
from slimfx.passes import PassContext, create_pass


def profile(model_bytes: bytes, x: torch.Tensor, runs: int) -> tuple[Counter, dict[str, tuple[str, float, str]]]:
    """(kernel ms per op type, {node name: (op type, kernel ms, output shape)} in execution order), per run."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_profiling = True
    so.log_severity_level = 3
    so.profile_file_prefix = tempfile.mkdtemp() + "/prof"
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    feed = ort_feed(sess, (x,))
    for _ in range(3):
        sess.run(None, feed)
    for _ in range(runs):
        sess.run(None, feed)
    with open(sess.end_profiling()) as f:
        events = [e for e in json.load(f) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    events = events[len(events) * 3 // (runs + 3):]  # drop the warm-up calls
    by_op, nodes = Counter(), {}
    for e in events:
        op = e["args"]["op_name"]
        by_op[op] += e["dur"] / runs / 1000
        name = e["name"].removesuffix("_kernel_time")
        shape = "x".join(str(d) for d in next(iter(e["args"].get("output_type_shape", [{}])[0].values()), []))
        nodes[name] = (op, nodes.get(name, (op, 0.0))[1] + e["dur"] / runs / 1000, shape)
    return by_op, nodes


def best(profiles: list[tuple[Counter, dict]]) -> tuple[Counter, dict]:
    """Per op type and per node, the smallest time over the rounds."""
    by_op = Counter({k: min(p[0].get(k, 0.0) for p in profiles) for k in profiles[0][0]})
    nodes = {k: (v[0], min(p[1].get(k, v)[1] for p in profiles), v[2]) for k, v in profiles[0][1].items()}
    return by_op, nodes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenetv2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peer", action="store_true", help="also onnxruntime's quantize_static (bench_quant.py's)")
    ap.add_argument("--their-reduce-range", action="store_true")
    ap.add_argument("--options", default="", help="extra quantize options as JSON")
    ap.add_argument("--skip", nargs="*", default=[], help="quantize's skip patterns (kept float)")
    ap.add_argument("--nodes", action="store_true", help="print every node's time, not only the convs'")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g, ex1, _, ds, fmt, cal = setup(args.model)
    q = g.copy()
    opts = {"scheme": "int8-static", "skip": args.skip, "speed_guard": False,
            **(json.loads(args.options) if args.options else {})}
    q = create_pass("quantize", opts).run(q, PassContext(ex1, calibration_data=[(c,) for c in cal],
                                                         quiet=True)).graph_after(q)
    fp32 = to_onnx_model(g, inputs=ex1).SerializeToString()
    files = {"fp32": fp32, "ours": to_onnx_model(q, inputs=ex1).SerializeToString()}
    if args.peer:
        files["theirs"] = theirs_quantize(fp32, cal, fmt, reduce_range=args.their_reduce_range)
    x = ds.test_x[:args.batch]
    rounds: dict[str, list] = {k: [] for k in files}
    for _ in range(args.rounds):
        for label, b in files.items():
            rounds[label].append(profile(b, x, args.runs))
    results = {k: best(v) for k, v in rounds.items()}
    labels = list(files)
    ops = sorted({op for by_op, _ in results.values() for op in by_op},
                 key=lambda op: -max(r[0].get(op, 0.0) for r in results.values()))
    print(f"\n{args.model}, batch {args.batch}: kernel ms per run (onnxruntime profiler, 1 thread, best of "
          f"{args.rounds} rounds of {args.runs} runs)\n")
    print("| op type | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels))
    for op in ops:
        print(f"| {op} | " + " | ".join(f"{results[k][0].get(op, 0.0):.3f} ({sum(1 for v in results[k][1].values() if v[0] == op)})"
                                         for k in labels) + " |")
    print("| **total** | " + " | ".join(f"**{sum(results[k][0].values()):.3f}**" for k in labels) + " |")
    if args.peer:
        print("\nop types after onnxruntime's optimizations (count): ours vs theirs")
        fo, ft = fused_ops(files["ours"]), fused_ops(files["theirs"])
        for op in sorted(set(fo) | set(ft)):
            mark = "" if fo.get(op, 0) == ft.get(op, 0) else "   <-- differs"
            print(f"   {op:32s} {fo.get(op, 0):4d} {ft.get(op, 0):4d}{mark}")
    # convs in a stable order (output shape, then time) so the three files' lists line up
    convs = {k: sorted(((n, t, shape) for n, (op, t, shape) in results[k][1].items() if args.nodes or "Conv" in op),
                       key=lambda r: list(results[k][1]).index(r[0])) for k in labels}
    print("\n| # | output | " + " | ".join(f"{k} us" for k in labels) + " | " +
          " | ".join(f"{k}/fp32" for k in labels[1:]) + " |")
    print("|---|---|" + "---|" * len(labels) + "---|" * (len(labels) - 1))
    for i, row in enumerate(zip(*convs.values())):
        f = row[0][1]
        print(f"| {i} | {row[-1][2]} | " + " | ".join(f"{t * 1000:.1f}" for _, t, _ in row) + " | " +
              " | ".join(f"{t / f:.2f}" for _, t, _ in row[1:]) + " |")


if __name__ == "__main__":
    main()
