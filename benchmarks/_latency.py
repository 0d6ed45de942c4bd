"""Shared by the benchmarks that compare onnxruntime latency with a peer's file in the same run.

Two onnxruntime sessions of the very same file can land more than 10% apart here, so each round opens
fresh sessions (`exporters.interleaved_latency`, best round: `exporters.best_median_ms`) and an A/A
control (the peer's file again) shows how far apart identical files land in this run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from slimfx.exporters import LatencyStats, best_median_ms


def compare(ours: list[LatencyStats], theirs: list[LatencyStats],
            control: list[LatencyStats]) -> tuple[float, float, str]:
    """(best-round ratio ours/theirs, A/A noise, verdict). The noise is the median over rounds of how far
    apart two sessions of the same file are; a ratio above 1.0 by no more than that is a tie."""
    ratio = best_median_ms(ours) / best_median_ms(theirs)
    noise = float(np.median([abs(c.median_ms / t.median_ms - 1.0) for c, t in zip(control, theirs)]))
    verdict = "faster" if ratio <= 1.0 else ("tie (within A/A noise)" if ratio - 1.0 <= noise else "SLOWER")
    return ratio, noise, verdict


def median_seconds(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds of this process) of `fn` over `repeat` calls after one warm-up
    (first-call imports and dispatcher caches are not what a user pays twice). CPU seconds are what other
    jobs on a busy machine do not inflate."""
    fn()
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)
