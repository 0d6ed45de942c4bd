"""Shared by the benchmarks that compare onnxruntime latency with a peer's file in the same run.

Two onnxruntime sessions of the very same file differ by 10-25% on this kind of machine (a small VM), so
each round opens fresh sessions (`exporters.interleaved_latency`) and an A/A control (the peer's file
again) shows how far apart identical files land in this run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from exporters import interleaved_latency


def round_medians(models: dict[str, Any], inputs: tuple, *, rounds: int, budget_s: float,
                  clock: str = "cpu") -> dict[str, list[float]]:
    """Per-round median latency (ms) of each model, one thread, fresh sessions in rotating order."""
    runs = interleaved_latency(models, inputs, rounds=rounds, budget_s=budget_s, clock=clock)
    return {k: [s.median_ms for s in v] for k, v in runs.items()}


def best(times: list[float]) -> float:
    """The best round (interference only ever adds time), as `exporters.best_median_ms` for stats."""
    return min(times)


def compare(ours: list[float], theirs: list[float], control: list[float]) -> tuple[float, float, str]:
    """(best-round ratio ours/theirs, A/A noise, verdict). The noise is the median over rounds of how far
    apart two sessions of the same file are; a ratio above 1.0 by no more than that is a tie."""
    ratio = best(ours) / best(theirs)
    noise = float(np.median([abs(c / t - 1.0) for c, t in zip(control, theirs)]))
    verdict = "faster" if ratio <= 1.0 else ("tie (within A/A noise)" if ratio - 1.0 <= noise else "SLOWER")
    return ratio, noise, verdict
