"""Conv latency on onnxruntime by channel count: why prune-channels says `round_to = 8`.

onnxruntime's fast CPU conv kernels (NCHWc) work on blocks of channels; a pruned width that is not a multiple
of the block falls to a slower path. This times, per width, a 3x3 conv (width -> width channels) and a
depthwise 7x7 conv (ConvNeXt's) on 56x56 maps at batch 32, 1 thread, the widths interleaved in rounds (best
round each), and prints milliseconds and the ratio to the nearest multiple of 8 at or above the width.

    PYTHONPATH=. python benchmarks/conv_widths.py [--widths 16,22,24,28,32] [--rounds 3]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from slimfx import ir
from slimfx.exporters import best_median_ms, measure_latency
from slimfx.exporters.onnx import to_onnx_model


def layer(kind: str, width: int) -> nn.Module:
    if kind == "conv3x3":
        return nn.Conv2d(width, width, 3, padding=1)
    return nn.Conv2d(width, width, 7, padding=3, groups=width)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="16,22,24,28,32", help="channel counts to time, comma-separated")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=56, help="height and width of the feature map")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    print(f"| layer | width | ms (batch {args.batch}, {args.size}x{args.size}, 1 thread) | vs width rounded up to 8 |")
    print("|---|---|---|---|")
    for kind in ("conv3x3", "depthwise7x7"):
        torch.manual_seed(0)
        files, inputs = {}, {}
        for w in sorted(set(widths) | {-(-w // 8) * 8 for w in widths}):
            x = torch.randn(args.batch, w, args.size, args.size)
            files[w] = to_onnx_model(ir.capture(layer(kind, w).eval(), (x,)), inputs=(x,)).SerializeToString()
            inputs[w] = (x,)
        stats: dict[int, list] = {w: [] for w in files}
        for r in range(args.rounds):  # the widths in turns, a fresh session each (the best round counts)
            for w in list(files)[r % len(files):] + list(files)[:r % len(files)]:
                stats[w].append(measure_latency(files[w], inputs[w], threads=1, budget_s=0.5))
        ms = {w: best_median_ms(s) for w, s in stats.items()}
        for w in widths:
            print(f"| {kind} | {w} | {ms[w]:.3f} | {ms[w] / ms[-(-w // 8) * 8]:.2f}x |")


if __name__ == "__main__":
    main()
