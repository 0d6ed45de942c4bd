"""INT8 quantization: slimfx's `quantize` pass vs onnxruntime.quantization.quantize_static.

Same fp32 model (batch norms folded), same calibration samples. Peer: quant_pre_process, QOperator (QDQ for
the nets of _convnets.py: EfficientNet- and ConvNeXt-style at 96x96, MobileNetV2 1.0 at 224x224 (mobilenetv2_224);
random init, random inputs for calibration and evaluation),
uint8 activations, int8 per-channel weights. slimfx's speed guard times on onnxruntime (1 thread) as in
slimfx.compile; --no-guard turns it off. Reported per model:
onnxruntime latency (1 thread, batch 1 and 32, thread CPU clock, best of interleaved rounds with fresh
sessions, and an A/A control for the noise: see _latency.py) of fp32 / ours / theirs, output SQNR vs fp32,
top-1 agreement, accuracy, and file sizes; plus the accuracy checks of issue #5. Ends with a markdown table.

    PYTHONPATH=. python benchmarks/bench_quant.py [--models resnet20,mobilenetv2,digits_cnn,tiny_bert,efficientnet_style,mobilenetv2_224]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from _convnets import INPUT_SIZE, NETS
from _latency import compare

from slimfx import ir, models
from slimfx.exporters import best_median_ms, graph_latency_ms, interleaved_latency
from slimfx.exporters.onnx import to_onnx_model
from slimfx.passes import PassContext, create_pass

DEFAULT_MODELS = ("digits_cnn", "resnet20", "mobilenetv2", "tiny_bert", "efficientnet_style", "convnext_style")
CONVNET_SIZE = 96


def float_graph(spec, ex1: tuple, quiet: bool = True) -> ir.Graph:
    """The trained zoo model captured, batch norms folded (the fp32 baseline both tools start from)."""
    module = spec.trained(progress=not quiet).eval()
    graph = ir.capture(module, ex1)
    create_pass("fold-batchnorm").run(graph, PassContext(ex1, quiet=True))
    return graph


def sqnr_db(ref: np.ndarray, y: np.ndarray) -> float:
    from slimfx.ir.metrics import tensor_sqnr_db

    return tensor_sqnr_db(torch.from_numpy(np.asarray(ref)), torch.from_numpy(np.asarray(y)))


def _chunk(x: torch.Tensor) -> int:
    """Rows per call: 256, fewer for large inputs (a 224x224 net's activations at 256 rows take gigabytes)."""
    return max(1, min(256, 2 ** 20 // max(1, x[0].numel())))


def ort_run(model_bytes: bytes, x: torch.Tensor, batch: int | None = None) -> np.ndarray:
    from slimfx.exporters.bench import ort_session

    sess = ort_session(model_bytes)
    batch = batch or _chunk(x)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + batch].numpy()})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def fused_ops(model_bytes: bytes) -> Counter:
    """Op types onnxruntime actually runs after its graph optimizations."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "opt.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = path
        so.intra_op_num_threads = 1
        ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(path).graph.node)


def theirs_quantize(fp32_bytes: bytes, cal: list[torch.Tensor], fmt: str = "QOperator",
                    reduce_range: bool = False) -> bytes:
    """onnxruntime's static quantization: pre-processed, QOperator (or QDQ), U8 activations, S8 per-channel."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, name: str):
            self.it = iter([{name: c.numpy()} for c in cal])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as d:
        src, pre, out = (os.path.join(d, f) for f in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        Path(src).write_bytes(fp32_bytes)
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        name = onnx.load(pre).graph.input[0].name
        quantize_static(pre, out, Reader(name), quant_format=getattr(QuantFormat, fmt),
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=reduce_range)
        return Path(out).read_bytes()


class _RandomData:
    """A stand-in dataset for the random-init conv nets: random inputs, labels from nothing (accuracy n/a)."""

    def __init__(self, n: int, size: int = CONVNET_SIZE):
        g = torch.Generator().manual_seed(0)
        self.train_x = torch.randn(n, 3, size, size, generator=g)
        self.test_x = torch.randn(n, 3, size, size, generator=g)
        self.test_y = torch.zeros(n, dtype=torch.long)


def setup(name: str, *, cal_batch: int = 32, cal_batches: int = 8, eval_n: int = 256, quiet: bool = True):
    """(batch-norm-folded fp32 graph, batch-1 and batch-32 example inputs, dataset, the peer's format,
    calibration batches) of a zoo model or a _convnets net (random init, random inputs)."""
    torch.manual_seed(0)
    if name in NETS:
        module = NETS[name]()
        size = INPUT_SIZE.get(name, CONVNET_SIZE)
        ex1 = (torch.randn(1, 3, size, size),)
        ex32 = (torch.randn(32, 3, size, size),)
        graph = ir.capture(module, ex1)
        create_pass("fold-batchnorm").run(graph, PassContext(ex1, quiet=True))
        ds = _RandomData(max(cal_batch * cal_batches, eval_n), size)
        fmt = "QDQ"
    else:
        spec = models.get(name)
        ds = models.load_dataset(spec.dataset)
        ex1 = spec.example_inputs(batch=1)
        ex32 = spec.example_inputs(batch=32)
        graph = float_graph(spec, ex1, quiet)
        fmt = "QOperator"
    cal = [ds.train_x[i:i + cal_batch] for i in range(0, cal_batch * cal_batches, cal_batch)]
    return graph, ex1, ex32, ds, fmt, cal


def bench_model(name: str, args) -> dict:
    graph, ex1, ex32, ds, fmt, cal = setup(name, cal_batch=args.cal_batch, cal_batches=args.cal_batches,
                                           eval_n=args.eval_n, quiet=args.quiet)
    ctx = PassContext(ex1, calibration_data=[(c,) for c in cal], quiet=args.quiet,
                      measure_ms=None if args.no_guard else graph_latency_ms)
    fp32 = to_onnx_model(graph, inputs=ex1).SerializeToString()
    opts = dict(json.loads(args.options)) if args.options else {}
    scheme = "int8-dynamic" if name == "tiny_bert" and not args.bert_static else "int8-static"
    q = graph.copy()
    res = create_pass("quantize", {"scheme": scheme, **opts}).run(q, ctx)
    q = res.graph_after(q)
    ours = to_onnx_model(q, inputs=ex1).SerializeToString()
    theirs = theirs_quantize(fp32, cal, fmt, reduce_range=args.their_reduce_range)

    test_x, test_y = ds.test_x[:args.eval_n], ds.test_y[:args.eval_n]
    ref = ort_run(fp32, test_x)
    y_ours, y_theirs = ort_run(ours, test_x), ort_run(theirs, test_x)
    lowered = ir.lower(q)
    with torch.inference_mode():
        y_ir = torch.cat([lowered(test_x[i:i + _chunk(test_x)]) for i in range(0, len(test_x), _chunk(test_x))]).numpy()
    row: dict = {"model": name, "scheme": scheme, "theirs_format": fmt,
                 "stats": {k: v for k, v in res.stats.items() if k != "skipped"}}
    row["sqnr_db"] = {"ours": sqnr_db(ref, y_ours), "theirs": sqnr_db(ref, y_theirs)}
    row["accuracy"] = {k: float((v.argmax(1) == test_y.numpy()).mean())
                       for k, v in (("fp32", ref), ("ours", y_ours), ("theirs", y_theirs))}
    # The logits stay float (QGemm with float output); their quantization step is the one an 8-bit
    # quantization of the fp32 output range would have. Issue #5 asks for agreement within 2 steps.
    step = max(float(ref.max() - ref.min()) / 255, 1e-12)
    diff = float(np.abs(y_ours - y_ir).max())
    row["ort_vs_ir"] = {"top1_agreement": float((y_ours.argmax(1) == y_ir.argmax(1)).mean()),
                        "max_abs_diff": diff, "output_step": step, "max_diff_in_steps": diff / step}
    row["size_bytes"] = {"fp32": len(fp32), "ours": len(ours), "theirs": len(theirs)}
    row["size_ratio"] = len(ours) / len(fp32)
    lat, row["ratio"] = {}, {}
    for b, ex in (("b1", ex1), ("b32", ex32)):
        # fresh sessions in rotating order each round, plus an A/A control (their file again): see _latency.py
        runs = interleaved_latency({"fp32": fp32, "ours": ours, "theirs": theirs, "control": theirs}, ex,
                                   rounds=args.rounds, budget_s=args.budget / args.rounds, clock="cpu")
        lat[b] = {k: best_median_ms(v) for k, v in runs.items() if k != "control"}
        ratio, noise, verdict = compare(runs["ours"], runs["theirs"], runs["control"])
        row["ratio"][b] = {"ours/theirs": ratio, "a/a_noise": noise, "verdict": verdict,
                           "ours/fp32": lat[b]["ours"] / lat[b]["fp32"], "theirs/fp32": lat[b]["theirs"] / lat[b]["fp32"]}
    row["latency_ms"] = lat
    if args.ops:
        row["ops"] = {"ours": dict(fused_ops(ours)), "theirs": dict(fused_ops(theirs))}
    return row


def accuracy_checks(args) -> dict:
    """digits_cnn accuracy per scheme (sign after STE fine-tuning) and mobilenetv2 per-tensor SQNR with
    cross-layer equalization + bias correction (issue #5's accuracy criteria)."""
    from slimfx.ir.metrics import tensor_sqnr_db as sqnr
    from slimfx.passes.quantize.sensitivity import graph_outputs

    out: dict = {}
    spec = models.get("digits_cnn")
    ex1 = spec.example_inputs(batch=1)
    g = float_graph(spec, ex1, args.quiet)
    ds = models.load_dataset(spec.dataset)
    cal = [(ds.train_x[i:i + args.cal_batch],) for i in range(0, args.cal_batch * args.cal_batches, args.cal_batch)]
    train = (ds.train_x, ds.train_y)
    base = models.accuracy(ir.lower(g), ds)
    out["digits_cnn"] = {"fp32": base}
    for label, opts in (("int8", {"scheme": "int8-static"}), ("fixed-point8", {"scheme": "fixed-point", "bits": 8}),
                        ("sign", {"scheme": "sign"}), ("sign+ste", {"scheme": "sign", "qat_epochs": 8, "qat_lr": 2e-3})):
        q = g.copy()
        create_pass("quantize", opts).run(q, PassContext(ex1, calibration_data=cal, train_data=train, quiet=args.quiet))
        acc = models.accuracy(ir.lower(q), ds)
        out["digits_cnn"][label] = {"accuracy": acc, "drop_points": 100 * (base - acc)}
    spec = models.get("mobilenetv2")
    ex1 = spec.example_inputs(batch=1)
    g = float_graph(spec, ex1, args.quiet)
    ds = models.load_dataset(spec.dataset)
    cal = [(ds.train_x[i:i + args.cal_batch],) for i in range(0, args.cal_batch * args.cal_batches, args.cal_batch)]
    test = [(ds.test_x[:args.eval_n],)]
    ref = graph_outputs(g, test)
    out["mobilenetv2_per_tensor_sqnr_db"] = {}
    for label, steps in (("plain", ["quantize"]), ("cle", ["equalize", "quantize"]),
                         ("bc", ["quantize", "bias-correction"]), ("cle+bc", ["equalize", "quantize", "bias-correction"])):
        q = g.copy()
        ctx = PassContext(ex1, calibration_data=cal, quiet=args.quiet)
        for p in steps:
            create_pass(p, {"per_channel": False} if p == "quantize" else {}).run(q, ctx)
        out["mobilenetv2_per_tensor_sqnr_db"][label] = sqnr(ref, graph_outputs(q, test))
    return out


def print_summary(rows: list[dict]) -> None:
    print("\n| model | scheme (theirs) | latency ours/theirs b1, b32 (A/A noise) | ours/fp32 b1, b32 | theirs/fp32 b1, b32 "
          "| SQNR ours / theirs | accuracy fp32 → ours | ORT vs IR: top-1, max diff in output steps "
          "| size ours / fp32 (theirs) | kept float by the speed guard |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lat = ", ".join(f"{v['ours/theirs']:.3f} (±{v['a/a_noise']:.3f}, {v['verdict']})" for v in r["ratio"].values())
        own = ", ".join(f"{v['ours/fp32']:.2f}" for v in r["ratio"].values())
        peer = ", ".join(f"{v['theirs/fp32']:.2f}" for v in r["ratio"].values())
        sz = r["size_bytes"]
        guard = r["stats"].get("speed_guard")
        kept = ("whole model" if guard.get("kept_model_float") else ", ".join(guard.get("kept_float", {})) or "none") \
            if isinstance(guard, dict) else (guard or "off")
        acc = "n/a (random init)" if r["model"] in NETS else f"{r['accuracy']['fp32']:.2%} → {r['accuracy']['ours']:.2%}"
        print(f"| {r['model']} | {r['scheme']} ({r['theirs_format']}) | {lat} | {own} | {peer} "
              f"| {r['sqnr_db']['ours']:.1f} / {r['sqnr_db']['theirs']:.1f} dB "
              f"| {acc} | {r['ort_vs_ir']['top1_agreement']:.1%}, "
              f"{r['ort_vs_ir']['max_diff_in_steps']:.2f} | {sz['ours'] / sz['fp32']:.3f} ({sz['theirs'] / sz['fp32']:.3f}) "
              f"| {kept} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--options", default="", help='extra quantize options as JSON, e.g. \'{"calibration": "minmax"}\'')
    p.add_argument("--cal-batches", type=int, default=8)
    p.add_argument("--cal-batch", type=int, default=32)
    p.add_argument("--eval-n", type=int, default=1000)
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timed runs per latency")
    p.add_argument("--rounds", type=int, default=9, help="interleaved measurement rounds")
    p.add_argument("--bert-static", action="store_true", help="int8-static for tiny_bert (default: int8-dynamic)")
    p.add_argument("--no-guard", action="store_true", help="quantize without the speed guard")
    p.add_argument("--their-reduce-range", action="store_true", help=(
        "7-bit weights for onnxruntime's quantizer too (its advice for x86 CPUs without VNNI, where full-range "
        "int8 weights saturate; slimfx's reduce_range default)"))
    p.add_argument("--ops", action="store_true", help="list the op types onnxruntime runs after fusion")
    p.add_argument("--no-accuracy", action="store_true", help="skip the digits/mobilenetv2 accuracy checks")
    p.add_argument("--json", help="write results here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        row = bench_model(name.strip(), args)
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    if not args.no_accuracy:
        acc = accuracy_checks(args)
        rows.append({"accuracy_checks": acc})
        print(json.dumps(acc, indent=1), flush=True)
    print_summary([r for r in rows if "model" in r])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
