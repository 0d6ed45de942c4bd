"""Shared by the distill_*.py benchmarks: train one student per (seed, method) and print mean ± std."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from slimfx import models
from slimfx.passes.distill import distill


def compare_methods(teacher: nn.Module, make_student: Callable[[], nn.Module], ds: models.Dataset,
                    methods: dict[str, str], *, seeds: list[int], epochs: int, lr: float,
                    pairs: list[tuple[str, str]], kd_options: dict | None = None) -> dict[str, list[float]]:
    """Test accuracy of a fresh student per seed and method (label -> loss name), same data and budget."""
    results: dict[str, list[float]] = {m: [] for m in methods}
    for seed in seeds:
        for label, loss in methods.items():
            torch.manual_seed(seed)
            student = make_student()
            t0 = time.perf_counter()
            distill(teacher if loss != "ce" else None, student, ds, loss=loss,
                    loss_options=kd_options if loss in ("kd", "at+kd") else None,
                    features=pairs if loss.startswith("at") else (), epochs=epochs, lr=lr, batch_size=64,
                    seed=seed, keep_best=False, quiet=True)
            acc = models.accuracy(student, ds)
            results[label].append(acc)
            print(f"seed {seed} {label:18s} acc {acc:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return results


def print_table(results: dict[str, list[float]], teacher_label: str, teacher_acc: float, student_label: str) -> None:
    seeds = len(next(iter(results.values()), []))
    print(f"\n| method | test accuracy (mean ± std, {seeds} seeds) | vs teacher |")
    print("|---|---|---|")
    print(f"| {teacher_label} | {teacher_acc * 100:.2f} | — |")
    for label, accs in results.items():
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {student_label}, {label} | {mean * 100:.2f} ± {std * 100:.2f} | {(mean - teacher_acc) * 100:+.2f} pt |")
