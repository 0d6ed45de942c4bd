"""resnet20 (trained) -> half-width resnet20 (8/16/32) on mnist5k-32: scratch vs KD vs AT+KD.

AT pairs the ends of the three stages (same spatial sizes, half the channels). Mean +- std over seeds.

    PYTHONPATH=. python benchmarks/distill_resnet.py --threads 1 [--seeds 0 1 2] [--epochs 8] [--T 4 --alpha 0.95] [--methods scratch,KD]
"""

from __future__ import annotations

import argparse

import torch
from _distill import compare_methods, print_table

from slimfx import models
from slimfx.models.resnet import ResNet20

METHODS = {"scratch": "ce", "KD": "kd", "AT+KD": "at+kd"}
PAIRS = [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--T", type=float, default=4.0, help="KD temperature")
    ap.add_argument("--alpha", type=float, default=0.95, help="KD weight of the soft term (0.95: the digits sweep's pick)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    args = ap.parse_args()
    methods = {m: METHODS[m] for m in args.methods.split(",")}
    torch.set_num_threads(args.threads)
    ds = models.load_dataset("mnist5k-32")
    teacher = models.get("resnet20").trained(seed=0)
    t_acc = models.accuracy(teacher, ds)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"teacher resnet20: {n(teacher)} params, test acc {t_acc:.4f}; student: {n(ResNet20(widths=(8, 16, 32)))}")
    results = compare_methods(teacher, lambda: ResNet20(widths=(8, 16, 32)), ds, methods, seeds=args.seeds,
                              epochs=args.epochs, lr=args.lr, pairs=PAIRS,
                              kd_options={"T": args.T, "alpha": args.alpha})
    print_table(results, "teacher resnet20", t_acc, "half-width student")

if __name__ == "__main__":
    main()
