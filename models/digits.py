"""Small models for the 8x8 sklearn digits: an MLP and a CNN, fast enough to train in seconds."""

from __future__ import annotations

import torch
from torch import nn


class DigitsMLP(nn.Module):
    """64 -> 128 -> 64 -> 10 MLP on flattened 8x8 digits (input [B, 64])."""

    def __init__(self, in_features: int = 64, hidden: tuple[int, int] = (128, 64), num_classes: int = 10,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.act1 = nn.ReLU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.act2 = nn.ReLU()
        self.drop2 = nn.Dropout(dropout)
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act1(self.fc1(x)))
        x = self.drop2(self.act2(self.fc2(x)))
        return self.fc3(x)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DigitsCNN(nn.Module):
    """Three conv+BN+ReLU stages and a two-layer head for [B, 1, 8, 8] digits (~41k params).

    Wide enough that 50% channel pruning and INT8 quantization have something to bite on.
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(1, 16),       # 16x8x8
            _conv_bn_relu(16, 32),      # 32x8x8
            nn.MaxPool2d(2),            # 32x4x4
            _conv_bn_relu(32, 64),      # 64x4x4
            nn.MaxPool2d(2),            # 64x2x2
        )
        self.fc1 = nn.Linear(64 * 2 * 2, 64)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        return self.fc2(self.drop(self.act(self.fc1(x))))
