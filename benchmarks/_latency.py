"""Shared by the benchmarks that compare onnxruntime latency with a peer's file in the same run.

Two onnxruntime sessions of the very same file can land more than 10% apart here, so each round opens
fresh sessions (`exporters.interleaved_latency`, best round: `exporters.best_median_ms`) and an A/A
control (the peer's file again) shows how far apart identical files land in this run.
"""

from __future__ import annotations

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
