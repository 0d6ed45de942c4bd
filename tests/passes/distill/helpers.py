"""Small models and data shared by the distillation tests (fast on 2 cores)."""

from __future__ import annotations

import functools

import torch
from torch import nn


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn digits as [N, 1, 8, 8] floats: (train_x, train_y, test_x, test_y), fixed split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def accuracy(module: nn.Module) -> float:
    _, _, xt, yt = digits()
    with torch.no_grad():
        return float((module(xt).argmax(1) == yt).float().mean())


class SmallCNN(nn.Module):
    def __init__(self, c1: int = 16, c2: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(c2 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        return self.fc(self.drop(x.flatten(1)))


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + x)


class TinyResNet(nn.Module):
    """A stem, a stage of 3 residual blocks, pooling and a classifier: what distill-subgraph swaps."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.relu = nn.ReLU()
        self.stage = nn.Sequential(Block(c), Block(c), Block(c))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage(self.relu(self.stem(x)))
        return self.fc(self.pool(x).flatten(1))


@functools.cache
def trained(kind: str) -> nn.Module:
    """A trained teacher (cached per test session): 'cnn' or 'resnet'."""
    from slimfx.passes.distill import distill

    torch.manual_seed(0)
    model = SmallCNN() if kind == "cnn" else TinyResNet()
    x, y, _, _ = digits()
    distill(None, model, (x, y), loss="ce", epochs=4, lr=3e-3, quiet=True)
    return model.eval()


def conv_student(teacher_block: nn.Module, example: torch.Tensor) -> nn.Module:
    """A custom distill-subgraph student: two plain convs with the block's channel count."""
    c = example.shape[1]
    return nn.Sequential(nn.Conv2d(c, c // 2, 3, padding=1), nn.ReLU(), nn.Conv2d(c // 2, c, 3, padding=1), nn.ReLU())
