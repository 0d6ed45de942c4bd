"""Our fp32 ONNX vs torch.onnx.export(..., dynamo=False) on the zoo, measured in one run.

For each zoo model: export time (ours: capture excluded, emission + onnx.checker + write; and with
validation), graph size, and onnxruntime latency (1 thread, all graph optimizations) at batch 1 and
32, interleaving ours, theirs and an A/A control (their file again, in its own session) over several
rounds so machine noise hits all three, and keeping each side's best round median. Prints a markdown
table; the targets are latency ratio ours/theirs <= 1.0 and export time no larger than theirs. Where
onnxruntime ends up running the same kernels for both files, the true ratio is 1.0 and the measured one
lands on either side of it: a row above 1.0 by no more than the A/A noise (the median, over rounds, of
how far apart two sessions of the very same file are) is reported as a tie, not as slower.

    PYTHONPATH=. python benchmarks/bench_export.py [--models mlp,resnet20] [--rounds 5] [--clock cpu|wall]

The default clock is the calling thread's CPU time (both runtimes compute on it at one thread), so
other processes on a busy machine do not skew the ratio.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from _latency import compare

from slimfx import ir, models
from slimfx.exporters import (
    best_median_ms,
    export_onnx,
    interleaved_latency,
    ort_session,
    to_onnx_model,
    with_batch,
)
from slimfx.exporters.bench import ort_feed
from slimfx.exporters.onnx import DEFAULT_OPSET

TIMER = time.thread_time  # set from --clock in main()


def torch_export(module: torch.nn.Module, inputs: tuple, path: Path, input_names: list[str]) -> float:
    """torch.onnx.export with the TorchScript path, dynamic batch, same opset; returns seconds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = TIMER()
        torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=DEFAULT_OPSET,
                          input_names=input_names, output_names=["output"], do_constant_folding=True,
                          dynamic_axes={**{n: {0: "batch"} for n in input_names}, "output": {0: "batch"}})
        return TIMER() - t0


def ours_export(graph: ir.Graph, inputs: tuple, path: Path) -> float:
    t0 = TIMER()
    proto = to_onnx_model(graph, inputs=inputs)
    path.write_bytes(proto.SerializeToString())
    return TIMER() - t0


def ort_optimized_nodes(path: Path, tmp: Path) -> int:
    """Nodes left after onnxruntime's ALL-level graph optimizations: what actually runs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp / f"{path.stem}.ort-opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return len(onnx.load(so.optimized_model_filepath).graph.node)


def best_of(fn, n: int = 3) -> float:
    return min(fn() for _ in range(n))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(models.names()))
    ap.add_argument("--rounds", type=int, default=9, help="interleaved latency rounds per model and batch")
    ap.add_argument("--budget", type=float, default=0.15, help="seconds per latency measurement")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: the calling thread's CPU time (robust on a shared machine; default); wall: wall time")
    args = ap.parse_args()
    global TIMER
    TIMER = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    rows = []
    ok = True
    for name in args.models.split(","):
        spec = models.get(name)
        module = spec.build(seed=0).eval()  # latency and export time do not depend on trained weights
        x = tuple(spec.example_inputs(batch=2, seed=0))
        graph = ir.capture(module, x)
        ours_p, theirs_p = tmp / f"{name}.ours.onnx", tmp / f"{name}.torch.onnx"
        in_names = [n.name for n in graph.inputs]
        t_ours = best_of(lambda: ours_export(graph, x, ours_p))  # noqa: B023
        t_theirs = best_of(lambda: torch_export(module, x, theirs_p, in_names))  # noqa: B023
        t_ours_val = export_onnx(graph, ours_p, inputs=x).seconds
        # Same numbers from both files (sanity: we compare like with like).
        s_o, s_t = ort_session(ours_p), ort_session(theirs_p)
        xb = with_batch(x, 3)
        diff = float(np.abs(s_o.run(None, ort_feed(s_o, xb))[0] - s_t.run(None, ort_feed(s_t, xb))[0]).max())
        n_o, n_t = (len(onnx.load(str(p)).graph.node) for p in (ours_p, theirs_p))
        o_o, o_t = (ort_optimized_nodes(p, tmp) for p in (ours_p, theirs_p))
        ok &= o_o <= o_t
        control_p = tmp / f"{name}.torch-copy.onnx"  # A/A control: their file again, as a separate session
        shutil.copyfile(theirs_p, control_p)
        for batch in (1, 32):
            xb = with_batch(x, batch)
            runs = interleaved_latency({"ours": ours_p, "theirs": theirs_p, "control": control_p}, xb,
                                       rounds=args.rounds, budget_s=args.budget, clock=args.clock)
            mo, mt = best_median_ms(runs["ours"]), best_median_ms(runs["theirs"])
            ratio, noise, verdict = compare(runs["ours"], runs["theirs"], runs["control"])
            ok &= verdict != "SLOWER"
            rows.append((name, batch, mo, mt, ratio, noise, verdict, f"{n_o}/{n_t}", f"{o_o}/{o_t}", t_ours, t_theirs,
                         t_ours_val, diff))
            print(f"{name} b{batch}: ours {mo:.4f} ms, torch.onnx {mt:.4f} ms, ratio {ratio:.3f}, "
                  f"A/A noise {noise:.3f}: {verdict}", file=sys.stderr)
        ok &= t_ours <= t_theirs
    out = io.StringIO()
    out.write(f"\nONNX export: slimfx emitter vs torch.onnx.export(dynamo=False), opset {DEFAULT_OPSET}, "
              f"onnxruntime CPU, 1 thread, {args.clock} clock, best of {args.rounds} interleaved rounds (each a median)\n\n")
    out.write("| model | batch | ours ms | torch.onnx ms | ratio ours/theirs | A/A noise | verdict | nodes ours/theirs | "
              "nodes after ORT opt | export s ours | export s torch.onnx | export s ours+validation | "
              "max out diff |\n")
    out.write("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|\n")
    for name, b, mo, mt, ratio, noise, verdict, nodes, opt_nodes, t_o, t_t, t_v, diff in rows:
        out.write(f"| {name} | {b} | {mo:.4f} | {mt:.4f} | {ratio:.3f} | ±{noise:.3f} | {verdict} | {nodes} | "
                  f"{opt_nodes} | {t_o:.3f} | {t_t:.3f} | {t_v:.3f} | {diff:.1e} |\n")
    ratios = [r[4] for r in rows]
    out.write(f"\ngeometric-mean latency ratio: {float(np.exp(np.mean(np.log(ratios)))):.3f}; "
              f"worst: {max(ratios):.3f}; rows at or below 1.0: {sum(r <= 1.0 for r in ratios)}/{len(ratios)}; "
              f"targets met (every row faster or within this run's A/A noise, export time no larger): "
              f"{'yes' if ok else 'NO'}\n")
    print(out.getvalue())
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
