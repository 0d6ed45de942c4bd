"""CIFAR-sized MobileNetV2 (Sandler et al. 2018) at width 0.5 with a shortened block config."""

from __future__ import annotations

import torch
from torch import nn


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection; residual add when stride 1 and cin == cout."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = cin * expand_ratio
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:  # fixed at construction, so fx sees no data-dependent branch
            return x + self.conv(x)
        return self.conv(x)


# (expand ratio t, channels c, repeats n, stride s): the ImageNet config with fewer repeats. Spatial size
# 32 -> 16 (stem) -> 8 -> 4 -> 2. Downsampling this early keeps training fast: depthwise convs are slow on
# CPU torch (a 32x32 stage made one epoch on mnist5k-32 take minutes instead of seconds).
DEFAULT_CONFIG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 2, 2),
    (6, 64, 2, 2),
    (6, 96, 1, 1),
    (6, 160, 2, 1),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """MobileNetV2 for [B, 3, 32, 32]: stride-2 stem and three stride-2 blocks (32 -> 2), ReLU6 everywhere."""

    def __init__(self, num_classes: int = 10, width_mult: float = 0.5,
                 config: tuple[tuple[int, int, int, int], ...] = DEFAULT_CONFIG,
                 last_channels: int = 640, dropout: float = 0.2, stem_stride: int = 2) -> None:
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        features: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, cin, 3, stride=stem_stride, padding=1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6())
        ]
        for t, c, n, s in config:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(
            nn.Sequential(nn.Conv2d(cin, last_channels, 1, bias=False), nn.BatchNorm2d(last_channels), nn.ReLU6())
        )
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))
