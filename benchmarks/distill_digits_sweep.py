"""The sweep behind distill_digits.py's default student/budget: scratch vs KD over sizes, epochs, T and alpha.

Every row uses seeds 0 1 2 for both arms (same student, data, epochs, lr, batch, optimizer, schedule; no best-epoch
selection); scratch does not depend on T/alpha, so it is trained once per (size, epochs). Prints one markdown row
per configuration as it goes, so the whole grid -- not just the winner -- can be pasted into docs/distillation.md.

    PYTHONPATH=. python benchmarks/distill_digits_sweep.py --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import statistics

import torch
from _distill import compare_methods
from distill_digits import SmallDigitsCNN, kd_criterion, n_params

from slimfx import models


def parse_students(spec: str) -> list[tuple[tuple[int, int, int], int]]:
    """'6,12,16/24 8,16,24/32' -> [((6, 12, 16), 24), ((8, 16, 24), 32)]."""
    out = []
    for item in spec.split():
        w, h = item.split("/")
        out.append((tuple(int(x) for x in w.split(",")), int(h)))
    return out  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--students", default="6,12,16/16 6,12,16/24 6,12,20/24 6,12,24/24 8,16,20/24 8,16,24/24",
                    help="space-separated W1,W2,W3/HIDDEN")
    ap.add_argument("--epochs", type=int, nargs="+", default=[8, 10, 15, 20])
    ap.add_argument("--T", type=float, nargs="+", default=[4.0, 8.0])
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.9, 0.95])
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = models.load_dataset("digits")
    teacher = models.get("digits_cnn").trained(seed=0)
    t_acc = models.accuracy(teacher, ds)
    print(f"teacher {t_acc * 100:.2f}; criterion: KD mean > scratch mean and KD >= {(t_acc - 0.01) * 100:.2f}; "
          f"seeds {args.seeds}, lr {args.lr}")
    print("| student params | widths/hidden | epochs | T | alpha | scratch | KD | KD - scratch | holds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (widths, hidden), epochs in itertools.product(parse_students(args.students), args.epochs):
        def make(widths=widths, hidden=hidden) -> SmallDigitsCNN:
            return SmallDigitsCNN(widths, hidden)

        def mean_acc(loss: str, kd_options: dict | None = None, epochs: int = epochs, make=make) -> float:
            with contextlib.redirect_stdout(io.StringIO()):  # per-seed lines; the sweep prints one row per config
                res = compare_methods(teacher, make, ds, {loss: loss}, seeds=args.seeds, epochs=epochs,
                                      lr=args.lr, pairs=[], kd_options=kd_options)
            return statistics.mean(res[loss])

        scratch = mean_acc("ce")
        for T, alpha in itertools.product(args.T, args.alpha):
            kd = mean_acc("kd", {"T": T, "alpha": alpha})
            holds = all(kd_criterion(scratch, kd, t_acc))
            print(f"| {n_params(make()):,} | {','.join(map(str, widths))}/{hidden} | {epochs} | {T:g} | {alpha:g} | "
                  f"{scratch * 100:.2f} | {kd * 100:.2f} | {(kd - scratch) * 100:+.2f} | {'yes' if holds else 'no'} |",
                  flush=True)

if __name__ == "__main__":
    main()
