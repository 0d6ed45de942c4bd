"""Structured pruning vs Torch-Pruning 1.6, measured in one run (onnxruntime, 1 thread, medians).

    PYTHONPATH=. python benchmarks/bench_prune.py [--models resnet20,mobilenetv2,tiny_bert,digits_cnn]

resnet20 / mobilenetv2: slimfx `prune-channels{sparsity=0.5, criterion=l2}` against Torch-Pruning's
MagnitudePruner (L2 importance, pruning_ratio 0.5, last fc ignored). Both pruned models and the dense
one are captured and exported with exporters.export_onnx (so only the pruning differs) and timed at batch 1
and 32, best of 7 rounds of fresh sessions, with Torch-Pruning's file timed twice as an A/A control
(_latency.py): ours vs TP within that noise is a tie. tiny_bert: 50% heads and
50% FFN units (embedding stream protected). digits_cnn: accuracy after 50% channels + fine-tune and after
50% unstructured magnitude masks.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _latency import compare

from slimfx import ir, models
from slimfx.exporters import LatencyStats, best_median_ms, export_onnx, interleaved_latency, validate_onnx
from slimfx.passes import PassContext, create_pass


def _rounds(paths: dict[str, Path], spec, batch: int, rounds: int = 7) -> dict[str, list[LatencyStats]]:
    """Per-round stats, fresh sessions in rotating order (see _latency.py)."""
    return interleaved_latency({k: str(p) for k, p in paths.items()}, spec.example_inputs(batch=batch),
                               rounds=rounds, budget_s=0.4, clock="cpu")


def _ours(model, spec, tmp: Path, name: str, **opts):
    x = spec.example_inputs(batch=1)
    g = ir.capture(model, x)
    res = None
    if opts:
        res = create_pass("prune-channels", opts).run(g, PassContext(example_inputs=x))
        g = res.graph_after(g)
    path = tmp / f"{name}.onnx"
    export_onnx(g, path, inputs=x)
    return g, res, path


def _torch_pruning(model, spec, tmp: Path):
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    x = spec.example_inputs(batch=1)
    last = m.fc if hasattr(m, "fc") else m.classifier
    base, _ = tp.utils.count_ops_and_params(m, x)
    pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.5, ignored_layers=[last])
    pruner.step()
    after, _ = tp.utils.count_ops_and_params(m, x)
    # the same exporter as ours (capture + exporters.export_onnx), so only the pruning differs
    g = ir.capture(m, x)
    path = tmp / "tp.onnx"
    export_onnx(g, path, inputs=x)
    return after / base, ir.count_macs(g), path


def bench_cnn(name: str, tmp: Path) -> dict:
    spec = models.get(name)
    model = spec.build(seed=0).eval()
    dense_g, _, dense_p = _ours(model, spec, tmp, "dense")
    g, res, ours_p = _ours(model, spec, tmp, "ours", sparsity=0.5, criterion="l2")
    validate_onnx(ours_p, g, spec.example_inputs(batch=4))
    tp_macs, tp_ours_count, tp_p = _torch_pruning(model, spec, tmp)
    row = {"model": name, "macs_ratio": res.stats["macs_ratio"], "tp_macs_ratio": tp_ours_count / ir.count_macs(dense_g),
           "tp_macs_ratio_tp_counter": tp_macs}
    tp_copy = tmp / f"{name}_tp_copy.onnx"  # A/A control: Torch-Pruning's file again, its own sessions
    shutil.copyfile(tp_p, tp_copy)
    for b in (1, 32):
        runs = _rounds({"dense": dense_p, "ours": ours_p, "tp": tp_p, "tp_control": tp_copy}, spec, b)
        d, o, t = (best_median_ms(runs[k]) for k in ("dense", "ours", "tp"))
        # pruned/dense: ours <= TP's is ours_ms <= tp_ms against the same dense model
        ratio, noise, verdict = compare(runs["ours"], runs["tp"], runs["tp_control"])
        row[f"b{b}"] = {"dense_ms": d, "ours_ms": o, "tp_ms": t, "ours_ratio": o / d, "tp_ratio": t / d,
                        "ours_vs_tp": ratio, "a/a_noise": noise, "verdict": verdict}
    if name == "mobilenetv2":  # 50% per group leaves depthwise convs (linear in channels) at half their MACs
        g2, res2, _ = _ours(model, spec, tmp, "ours_t", target_macs=0.27, criterion="l2")
        row["target_macs_0.27"] = {"sparsity": res2.stats["sparsity"], "macs_ratio": res2.stats["macs_ratio"]}
    return row


def bench_bert(tmp: Path) -> dict:
    spec = models.get("tiny_bert")
    model = spec.build(seed=0).eval()
    x = spec.example_inputs(batch=2)
    g = ir.capture(model, x)
    res = create_pass("prune-channels", {"sparsity": 0.5, "protect": ["tok_emb"]}).run(g, PassContext(example_inputs=x))
    g = res.graph_after(g)
    out = ir.lower(g)(*x)
    path = tmp / "bert.onnx"
    export_onnx(g, path, inputs=x)
    rep = validate_onnx(path, g, x)
    dense = ir.capture(model, x)
    dpath = tmp / "bert_dense.onnx"
    export_onnx(dense, dpath, inputs=x)
    heads = [r for r in res.stats["groups"] if r["kind"] == "heads"]
    lat = _rounds({"pruned": path, "dense": dpath}, spec, 1, rounds=3)
    return {"model": "tiny_bert", "macs_ratio": res.stats["macs_ratio"], "finite": bool(torch.isfinite(out).all()),
            "validation": rep.to_dict() if hasattr(rep, "to_dict") else str(rep),
            "heads_kept": [r["kept_channels"] // 32 for r in heads],
            "latency_ratio_b1": best_median_ms(lat["pruned"]) / best_median_ms(lat["dense"])}


def bench_digits(seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """50% channels + 10 epochs of fine-tuning, scored at the last epoch (no epoch picked on the test split),
    over seeds; and 50% unstructured magnitude masks without fine-tuning."""
    import statistics

    spec = models.get("digits_cnn")
    model = spec.trained(progress=False).eval()
    data = models.load_dataset("digits")
    x = spec.example_inputs(batch=1)

    def acc(m):
        return models.accuracy(m, "digits")

    out: dict = {"dense": acc(model)}
    for criterion in ("l2", "bn-scale"):
        pruned, tuned = [], []
        for seed in seeds:
            g = ir.capture(model, x)
            ctx = PassContext(example_inputs=x, train_data=(data.train_x, data.train_y), quiet=True, seed=seed)
            g = create_pass("prune-channels", {"sparsity": 0.5, "criterion": criterion}).run(g, ctx).graph_after(g)
            pruned.append(acc(ir.lower(g).eval()))
            create_pass("finetune", {"epochs": 10, "lr": 3e-3}).run(g, ctx)
            tuned.append(acc(ir.lower(g).eval()))
        out[f"channels50_{criterion}"] = pruned[0]
        out[f"channels50_{criterion}+ft"] = {"per_seed": tuned, "mean": statistics.mean(tuned),
                                             "drop_points": 100 * (out["dense"] - statistics.mean(tuned))}
    for scope in ("layer", "global"):
        g = ir.capture(model, x)
        create_pass("prune-weights", {"sparsity": 0.5, "scope": scope}).run(g, PassContext(example_inputs=x))
        out[f"masks50_{scope}"] = acc(ir.lower(g).eval())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,mobilenetv2,tiny_bert,digits_cnn")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in args.models.split(","):
            t = time.time()
            if name in ("resnet20", "mobilenetv2"):
                row = bench_cnn(name, tmp)
            elif name == "tiny_bert":
                row = bench_bert(tmp)
            elif name == "digits_cnn":
                row = {"model": "digits_cnn", **bench_digits()}
            else:
                raise SystemExit(f"unknown model {name}")
            row["seconds"] = round(time.time() - t, 1)
            print(json.dumps(row, indent=1, default=float), flush=True)
            results.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
