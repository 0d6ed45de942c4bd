"""Low-bit conv/linear weights with int8 activations (W4A8, W3A8, W2A8, W8A8): AdaRound's learned rounding vs
rounding to nearest (RTN, the baseline), on the zoo's CNNs (trained), side by side in one run.

Per model: the zoo's three-way split (`slimfx.data.zoo_data`: calibration from train, accuracy on test), batch
norms folded, `quantize` (int8-static, per-channel weights, first and last layer 8-bit below 8 bits) with
`rounding = "nearest"` and `"adaround"`. Per variant: test accuracy of the ONNX file on onnxruntime
(`slimfx.data.accuracy`), its drop from fp32, the file size / fp32's, onnxruntime vs the IR (top-1 agreement),
output SQNR vs fp32, and the seconds `quantize` took.

    PYTHONPATH=.:benchmarks python benchmarks/bench_adaround.py [--models mobilenetv2,resnet20] [--iters 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_quant import ort_run, sqnr_db

from slimfx import ir, models
from slimfx.data import accuracy, zoo_data
from slimfx.exporters.onnx import to_onnx_model
from slimfx.passes import PassContext, create_pass

# (label, quantize options) per model; below 4 bits where RTN W4A8 already stays within a point
VARIANTS = {
    "mobilenetv2": [("W8A8", {"bits": 8}), ("W4A8", {"bits": 4}), ("W3A8", {"bits": 3})],
    "resnet20": [("W8A8", {"bits": 8}), ("W4A8", {"bits": 4}), ("W3A8", {"bits": 3}), ("W2A8", {"bits": 2})],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mobilenetv2,resnet20")
    p.add_argument("--iters", type=int, default=300, help="adaround_iters")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        spec = models.get(name)
        data = zoo_data(spec.dataset)
        module = spec.trained(progress=False).eval()
        ex = spec.example_inputs(batch=1)
        graph = ir.capture(module, ex)
        ctx = PassContext(ex, calibration_data=data.calibration_batches(), quiet=True)
        create_pass("fold-batchnorm").run(graph, ctx)
        fp32 = to_onnx_model(graph, inputs=ex).SerializeToString()
        (test_x,), test_y = data.test

        def onnx_accuracy(model_bytes: bytes, test_x=test_x, test_y=test_y) -> tuple[float, np.ndarray]:
            y = ort_run(model_bytes, test_x)
            acc = accuracy(lambda x, y=y: torch.from_numpy(y), [((test_x,), test_y)])
            return float(acc), y

        acc_fp32, ref = onnx_accuracy(fp32)
        rows.append({"model": name, "variant": "fp32", "rounding": "-", "accuracy": acc_fp32, "drop_pt": 0.0,
                     "size_ratio": 1.0, "sqnr_db": float("inf"), "ort_vs_ir_top1": 1.0, "seconds": 0.0})
        for label, opts in VARIANTS[name]:
            for rounding in ("nearest", "adaround"):
                g = graph.copy()
                t0 = time.perf_counter()
                res = create_pass("quantize", {"scheme": "int8-static", "speed_guard": False, "rounding": rounding,
                                               "adaround_iters": args.iters, **opts}).run(g, ctx)
                seconds = time.perf_counter() - t0
                data_bytes = to_onnx_model(g, inputs=ex).SerializeToString()
                acc, y = onnx_accuracy(data_bytes)
                with torch.no_grad():
                    y_ir = ir.lower(g)(test_x).numpy()
                row = {"model": name, "variant": label, "rounding": "RTN" if rounding == "nearest" else "AdaRound",
                       "accuracy": acc, "drop_pt": 100 * (acc_fp32 - acc), "size_ratio": len(data_bytes) / len(fp32),
                       "sqnr_db": sqnr_db(ref, y), "ort_vs_ir_top1": float((y.argmax(1) == y_ir.argmax(1)).mean()),
                       "seconds": seconds}
                if rounding == "adaround":
                    layers = res.stats["adaround"]["layers"].values()
                    row["layer_error_ratio"] = float(np.exp(np.mean([np.log(max(v["adaround"], 1e-12)
                                                                            / max(v["nearest"], 1e-12))
                                                                     for v in layers])))
                rows.append(row)
                print(f"{name} {label} {row['rounding']}: {acc:.2%} ({row['drop_pt']:+.2f} pt), "
                      f"{row['size_ratio']:.3f} of fp32, {seconds:.0f} s", file=sys.stderr, flush=True)
    print(f"\ntest split, onnxruntime on the exported files; AdaRound {args.iters} steps a layer\n")
    print("| model | weights | rounding | accuracy | drop vs fp32 | within 1.0 pt | file / fp32 | SQNR vs fp32 "
          "| ORT vs IR top-1 | layer output error AdaRound/RTN (geo. mean) | quantize time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        within = "" if r["variant"] == "fp32" else ("yes" if r["drop_pt"] <= 1.0 else "**no**")
        ratio = f"{r['layer_error_ratio']:.2f}" if "layer_error_ratio" in r else ""
        print(f"| {r['model']} | {r['variant']} | {r['rounding']} | {r['accuracy']:.2%} | {r['drop_pt']:.2f} pt "
              f"| {within} | {r['size_ratio']:.3f} | {r['sqnr_db']:.1f} dB | {r['ort_vs_ir_top1']:.2%} | {ratio} "
              f"| {r['seconds']:.0f} s |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
