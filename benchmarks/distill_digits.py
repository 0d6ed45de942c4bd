"""Whole-model distillation on sklearn digits: digits_cnn (trained) -> a student with <= 1/4 of its params.

Compares, with the same student, data and budget: scratch (labels only), KD, CTKD (adaptive T),
logit-standardized KD, AT (CE + attention transfer) and AT+KD. Mean +- std over seeds.

    PYTHONPATH=. python benchmarks/distill_digits.py [--seeds 0 1 2] [--epochs 30]
    PYTHONPATH=. python benchmarks/distill_digits.py --methods scratch,KD --widths 4,8,12 --hidden 16 --epochs 30
"""

from __future__ import annotations

import argparse

import torch
from _distill import compare_methods, print_table
from torch import nn

import models

METHODS = {"scratch": "ce", "KD": "kd", "CTKD (adaptive T)": "ctkd", "logit-std KD": "logit-std",
           "AT": "at", "AT+KD": "at+kd"}
PAIRS = [("features.1", "features.1"), ("features.3", "features.3")]  # 8x8 and 4x4 stage ends


class SmallDigitsCNN(nn.Module):
    """digits_cnn's layout at widths 8/16/24 and a 32-unit head (~1/5 of its params)."""

    def __init__(self, widths: tuple[int, int, int] = (8, 16, 24), hidden: int = 32) -> None:
        super().__init__()

        def cbr(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

        a, b, c = widths
        self.features = nn.Sequential(cbr(1, a), cbr(a, b), nn.MaxPool2d(2), cbr(b, c), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(c * 4, hidden)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(self.features(x).flatten(1)))))


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--widths", default="8,16,24", help="student conv widths (default 8,16,24: 8,210 params)")
    ap.add_argument("--hidden", type=int, default=32, help="student hidden units")
    ap.add_argument("--T", type=float, default=4.0, help="KD temperature")
    ap.add_argument("--alpha", type=float, default=0.9, help="KD weight of the soft term")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    args = ap.parse_args()
    widths = tuple(int(w) for w in args.widths.split(","))
    methods = {m: METHODS[m] for m in args.methods.split(",")}
    torch.set_num_threads(args.threads)
    ds = models.load_dataset("digits")
    teacher = models.get("digits_cnn").trained(seed=0)
    t_acc = models.accuracy(teacher, ds)
    probe = SmallDigitsCNN(widths, args.hidden)
    ratio = n_params(probe) / n_params(teacher)
    assert ratio <= 0.25, ratio
    print(f"teacher digits_cnn: {n_params(teacher)} params, test acc {t_acc:.4f}; "
          f"student: {n_params(probe)} params ({ratio:.3f} of the teacher)")
    results = compare_methods(teacher, lambda: SmallDigitsCNN(widths, args.hidden), ds, methods, seeds=args.seeds,
                              epochs=args.epochs, lr=args.lr, pairs=PAIRS,
                              kd_options={"T": args.T, "alpha": args.alpha})
    print_table(results, f"teacher digits_cnn ({n_params(teacher)} params)", t_acc,
                f"student ({n_params(probe)} params)")

if __name__ == "__main__":
    main()
