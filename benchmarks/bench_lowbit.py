"""INT4 weight-only linears: slimfx's `quantize-weights` vs onnxruntime's MatMulNBitsQuantizer (RTN), on the
zoo's transformer (tiny_bert, trained), both exported as MatMulNBits.

Per variant: ONNX file size / fp32, top-1 agreement with fp32 and accuracy on the test split, output SQNR vs
fp32, and onnxruntime latency (1 thread, batch 1 and 32, interleaved with fp32 and the peer, best round).

    PYTHONPATH=. python benchmarks/bench_lowbit.py [--blocks 32,64,128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from bench_quant import ort_run, sqnr_db

from slimfx import ir, models
from slimfx.exporters import best_median_ms, interleaved_latency
from slimfx.exporters.onnx import to_onnx_model
from slimfx.passes import PassContext, create_pass


def theirs_nbits(fp32: bytes, block: int, symmetric: bool, accuracy_level: int) -> bytes:
    """onnxruntime.quantization.matmul_nbits_quantizer: 4-bit RTN, MatMulNBits (QOperator)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load_from_string(fp32)
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric,
                                       accuracy_level=accuracy_level or None)
    q = MatMulNBitsQuantizer(model, algo_config=cfg, accuracy_level=accuracy_level or None)
    q.process()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "q.onnx")
        q.model.save_model_to_file(path)
        return Path(path).read_bytes()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", default="32,64,128")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget", type=float, default=2.0)
    p.add_argument("--cal", type=int, default=256, help="calibration samples (train split) for GPTQ")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    spec = models.get("tiny_bert")
    ds = models.load_dataset(spec.dataset)
    module = spec.trained(progress=False).eval()
    ex1 = spec.example_inputs(batch=1)
    graph = ir.capture(module, ex1)
    fp32 = to_onnx_model(graph, inputs=ex1).SerializeToString()
    cal = [(ds.train_x[i:i + 32],) for i in range(0, args.cal, 32)]
    ctx = PassContext(ex1, calibration_data=cal, quiet=True)
    test_x, test_y = ds.test_x, ds.test_y.numpy()
    ref = ort_run(fp32, test_x)
    rows = []
    variants = []
    for block in [int(b) for b in args.blocks.split(",")]:
        for method in ("rtn", "gptq"):
            for sym in (False, True):
                variants.append((f"ours {method} b{block}{' sym' if sym else ''}", block, method, sym, 0))
    variants.append(("ours gptq b32 acc4", 32, "gptq", False, 4))
    files: dict[str, bytes] = {}
    for label, block, method, sym, acc in variants:
        g = graph.copy()
        create_pass("quantize-weights", {"block_size": block, "method": method, "symmetric": sym,
                                         "accuracy_level": acc}).run(g, ctx)
        files[label] = to_onnx_model(g, inputs=ex1).SerializeToString()
    try:
        for block in [int(b) for b in args.blocks.split(",")]:
            for sym in (False, True):
                files[f"ORT rtn b{block}{' sym' if sym else ''}"] = theirs_nbits(fp32, block, sym, 0)
        files["ORT rtn b32 acc4"] = theirs_nbits(fp32, 32, False, 4)
    except ImportError as e:  # onnxruntime's quantizer needs the onnx_ir package
        print(f"peer skipped: onnxruntime's MatMulNBitsQuantizer does not import ({e})")
    for label, data in files.items():
        y = ort_run(data, test_x)
        rows.append({"variant": label, "size_ratio": len(data) / len(fp32), "bytes": len(data),
                     "top1_agreement": float((y.argmax(1) == ref.argmax(1)).mean()),
                     "accuracy": float((y.argmax(1) == test_y).mean()), "sqnr_db": sqnr_db(ref, y)})
    acc_fp32 = float((ref.argmax(1) == test_y).mean())
    lat = {}
    timed = {k: files[k] for k in ("ours gptq b32", "ours gptq b32 acc4", "ours rtn b64", "ORT rtn b32",
                                   "ORT rtn b32 acc4") if k in files}
    timed = {"fp32": fp32, **timed}
    for b in (1, 32):
        ex = spec.example_inputs(batch=b)
        runs = interleaved_latency(timed, ex, rounds=args.rounds, budget_s=args.budget / args.rounds, clock="cpu")
        lat[b] = {k: best_median_ms(v) for k, v in runs.items()}
    print(f"\ntiny_bert fp32: {len(fp32)} bytes, test accuracy {acc_fp32:.2%} ({len(test_y)} samples)\n")
    print("| variant | file / fp32 | top-1 agreement with fp32 | accuracy | SQNR vs fp32 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['size_ratio']:.3f} | {r['top1_agreement']:.2%} | {r['accuracy']:.2%} "
              f"| {r['sqnr_db']:.1f} dB |")
    print("\n| file | latency b1 (ms, / fp32) | latency b32 (ms, / fp32) |")
    print("|---|---|---|")
    for k in timed:
        print(f"| {k} | {lat[1][k]:.3f} ({lat[1][k] / lat[1]['fp32']:.2f}) | {lat[32][k]:.3f} "
              f"({lat[32][k] / lat[32]['fp32']:.2f}) |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "latency_ms": lat, "fp32_accuracy": acc_fp32}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
