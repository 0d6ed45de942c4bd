"""Small models for the pass tests (the zoo and tests/generators.py cover the big and the random)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial batch-norm statistics, so folding is a real test."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.3)
    return model


class ConvBnNet(nn.Module):
    """conv(bias) -> bn -> relu -> conv(no bias) -> bn -> relu6 -> depthwise conv -> bn -> pool -> linear -> bn1d."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.b3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        self.b4 = nn.BatchNorm1d(5)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu6(self.b2(self.c2(x)))
        x = self.b3(self.dw(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.b4(self.fc(x))


class Conv1dBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(4, 6, 3, padding=1, bias=False)
        self.b = nn.BatchNorm1d(6)

    def forward(self, x):
        return torch.tanh(self.b(self.c(x)))


class SharedConv(nn.Module):
    """The conv output also feeds a second branch, so its batch norm must not be folded."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 1)
        self.b = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.c(x)
        return self.b(y) + y


class Noops(nn.Module):
    """Every kind of no-op remove-identity knows, plus ones it must keep."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.3)
        self.ident = nn.Identity()

    def forward(self, x):
        y = self.ident(self.drop(self.fc(x)))
        y = y * 1
        y = 1 * y
        y = y + 0
        y = y / 1
        y = y - 0
        y = y.reshape(y.shape[0], 6).contiguous().flatten(1)
        z = y.reshape(-1)          # a real reshape: must stay
        return y * 2, z + 0.5      # a real mul: must stay


class Duplicates(nn.Module):
    """Common subexpressions: the same op on the same operands, incl. swapped add operands."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        a = torch.relu(self.fc(x))
        b = torch.relu(self.fc(x))
        c = a + x
        d = x + b
        e = torch.sigmoid(a) * 2.0
        f = torch.sigmoid(b) * 2.0
        return c * d + e - f


class ConstantSubgraph(nn.Module):
    """Weights computed from params at run time (transposed, scaled, arange table) must fold."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))
        self.scale = nn.Parameter(torch.rand(6) + 0.5)
        self.register_buffer("offset", torch.randn(4))

    def forward(self, x):
        w = (self.w * self.scale.unsqueeze(1)).t()        # [4, 6] computed from params only
        pos = torch.arange(4, dtype=torch.float32) * 0.1 + self.offset
        return x @ w + 0.0, x + pos


def make(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(cls(), seed).eval()
