"""Students for the digits_cnn teacher (input [B, 1, 8, 8], 10 classes), of different capacity and depth.

`slimfx distill digits_cnn --student benchmarks/students.py:narrow` takes any of them; benchmarks/distill_sweep.py
sweeps them. Only `narrow` looks like the zoo's CNN; `shallow` has one conv stage, `dwres` is a deeper
depthwise-separable residual net with global pooling, `thin` is deep and thin, `mlp` has no convolution, `strided`
downsamples with a strided conv (no 8x8 map, no pooling layer) and ends in global average pooling. `narrow` and
`dwres` get within about 1 pt of the teacher from scratch; `shallow`, `thin` and `mlp` (the sweep's round 3 pairs)
stay 2-5 pt below it. `strided` was added for round 4 (declared before any run of it): `mlp` has no feature maps,
so attention transfer needs a third student that has them.
"""

from __future__ import annotations

import torch
from torch import nn


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def narrow() -> nn.Module:
    """The zoo CNN's shape at 1/10 the size: 3 conv stages 6-12-16 (8x8, 8x8, 4x4), 16 hidden units (3.7k params)."""
    return nn.Sequential(*_cbr(1, 6), *_cbr(6, 12), nn.MaxPool2d(2), *_cbr(12, 16), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def shallow() -> nn.Module:
    """One conv stage (8 channels at 8x8), pooled to 4x4, then a linear classifier (1.4k params)."""
    return nn.Sequential(*_cbr(1, 8), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 10))


class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c),
                                  nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


def dwres() -> nn.Module:
    """Deeper and unlike the zoo: a stem, depthwise-separable residual blocks at 8x8 and 4x4 (strided depthwise
    downsampling), global average pooling and a linear head; 7 conv layers, 2.4k params."""
    return nn.Sequential(*_cbr(1, 16), _Residual(16), *_cbr(16, 16, 3, 2, groups=16), *_cbr(16, 24, 1),
                         _Residual(24), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))


def thin() -> nn.Module:
    """Deep and thin: four 3x3 conv layers of 4-8 channels (8x8, 8x8, 4x4, 4x4), two poolings, a linear head
    on the 2x2 map (1.1k params)."""
    return nn.Sequential(*_cbr(1, 4), *_cbr(4, 4), nn.MaxPool2d(2), *_cbr(4, 8), *_cbr(8, 8), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 4, 10))


def mlp() -> nn.Module:
    """No convolution at all: the 64 pixels through one hidden layer of 16 units (1.2k params); unlike the
    zoo's CNN, it has to learn from the teacher what the CNN gets from its structure."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def strided() -> nn.Module:
    """Unlike the others: a stride-2 conv straight to 4x4 (no 8x8 map, no pooling layer), a second conv at 4x4,
    global average pooling and a linear head (1.4k params)."""
    return nn.Sequential(*_cbr(1, 8, 3, 2), *_cbr(8, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
