"""Where int8 time goes: onnxruntime's profiler on the fp32 and the int8-static ONNX of a zoo model.

Per op type and per conv, kernel time at one thread, averaged over the runs; the int8 conv time is also
shown as a ratio of the matching fp32 conv (the two graphs list their convs in the same order).

    PYTHONPATH=. python benchmarks/profile_quant.py [--model mobilenetv2] [--batch 32] [--runs 50]
    PYTHONPATH=. python benchmarks/profile_quant.py --skip "features.0.*" "features.1.conv.0*"   # keep those float
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter

import torch
from bench_quant import float_graph

from slimfx import models
from slimfx.exporters.bench import ort_feed
from slimfx.exporters.onnx import to_onnx_model
from slimfx.passes import PassContext, create_pass


def profile(model_bytes: bytes, x: torch.Tensor, runs: int) -> tuple[Counter, dict[str, float]]:
    """(kernel ms per op type, kernel ms per conv node in graph order), per run."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.enable_profiling = True
    so.log_severity_level = 3
    so.profile_file_prefix = tempfile.mkdtemp() + "/prof"
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    feed = ort_feed(sess, (x,))
    for _ in range(runs):
        sess.run(None, feed)
    with open(sess.end_profiling()) as f:
        events = [e for e in json.load(f) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    by_op, convs = Counter(), {}
    for e in events:
        by_op[e["args"]["op_name"]] += e["dur"] / runs / 1000
        if "Conv" in e["args"]["op_name"]:
            name = e["name"].removesuffix("_kernel_time")
            convs[name] = convs.get(name, 0.0) + e["dur"] / runs / 1000
    return by_op, convs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenetv2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--skip", nargs="*", default=[], help="quantize's skip patterns (kept float)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = models.get(args.model)
    ex1 = spec.example_inputs(batch=1)
    g = float_graph(spec, ex1)
    ds = models.load_dataset(spec.dataset)
    cal = [(ds.train_x[i:i + 32],) for i in range(0, 256, 32)]
    q = g.copy()
    create_pass("quantize", {"scheme": "int8-static", "skip": args.skip}).run(
        q, PassContext(ex1, calibration_data=cal, quiet=True))
    x = ds.test_x[:args.batch]
    results = {label: profile(to_onnx_model(graph, inputs=ex1).SerializeToString(), x, args.runs)
               for label, graph in (("fp32", g), ("int8", q))}
    for label, (by_op, _) in results.items():
        print(f"{label}: {sum(by_op.values()):.3f} ms per run at batch {args.batch}")
        for op, ms in by_op.most_common():
            print(f"   {op:28s} {ms:.3f} ms")
    fp_convs, q_convs = results["fp32"][1], results["int8"][1]
    print("\n| # | fp32 conv | fp32 us | int8 us | int8/fp32 |\n|---|---|---|---|---|")
    for i, ((name, f), q_ms) in enumerate(zip(fp_convs.items(), q_convs.values())):
        print(f"| {i} | {name} | {f * 1000:.1f} | {q_ms * 1000:.1f} | {q_ms / f:.2f} |")


if __name__ == "__main__":
    main()
