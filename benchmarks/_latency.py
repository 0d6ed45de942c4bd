"""Shared by the benchmarks that compare onnxruntime latency with a peer's file in the same run.

On this kind of machine (a small VM), two onnxruntime sessions of the very same file differ by 10-25% in
median latency, so one session per side proves nothing. Each round therefore opens a fresh session per
model, in a rotating order, and an A/A control (the peer's file again) shows how far apart identical
files land in this run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from exporters import measure_latency


def interleaved_latency(models: dict[str, Any], inputs: tuple, *, rounds: int, budget_s: float,
                        clock: str = "cpu") -> dict[str, list[float]]:
    """Per-round median latency (ms) of each model (ONNX path/bytes), one fresh session per model and round."""
    runs: dict[str, list[float]] = {k: [] for k in models}
    items = list(models.items())
    for r in range(rounds):
        for label, model in items[r % len(items):] + items[:r % len(items)]:
            runs[label].append(measure_latency(model, inputs, threads=1, budget_s=budget_s, clock=clock).median_ms)
    return runs


def best(times: list[float]) -> float:
    """Best round: interference only ever adds time."""
    return min(times)


def compare(ours: list[float], theirs: list[float], control: list[float]) -> tuple[float, float, str]:
    """(best-round ratio ours/theirs, A/A noise, verdict). The noise is the median over rounds of how far
    apart two sessions of the same file are; a ratio above 1.0 by no more than that is a tie."""
    ratio = best(ours) / best(theirs)
    noise = float(np.median([abs(c / t - 1.0) for c, t in zip(control, theirs)]))
    verdict = "faster" if ratio <= 1.0 else ("tie (within A/A noise)" if ratio - 1.0 <= noise else "SLOWER")
    return ratio, noise, verdict
