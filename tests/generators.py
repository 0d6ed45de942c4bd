"""Hypothesis strategies that build random architectures: MLPs and CNNs with residual adds,
concatenations, depthwise/grouped convs, batch norms, assorted activations, squeeze-excite gates and
ConvNeXt-style layer-scale blocks (channels-last Linear MLP between permutes).

Every test that takes "arbitrary models" (capture, passes, pruning, export) draws from here:

    @given(random_model())
    def test_roundtrip(case):
        model, inputs = case
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

ACTIVATIONS = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh, "hardswish": nn.Hardswish, "leaky_relu": nn.LeakyReLU, "identity": nn.Identity,
}


def _randomize_bn(bn: nn.BatchNorm2d | nn.BatchNorm1d, gen: torch.Generator) -> None:
    """Give a batch norm non-trivial statistics, so folding it is a real test."""
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
        bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
        bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(n, generator=gen) * 0.1)


class ConvBlock(nn.Module):
    """conv -> [bn] -> act, optionally grouped/depthwise."""

    def __init__(self, cin: int, cout: int, k: int, groups: int, bn: bool, act: str, bias: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.act = ACTIVATIONS[act]()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class ResidualBlock(nn.Module):
    """x + block(x) (channel count unchanged)."""

    def __init__(self, ch: int, k: int, bn: bool, act: str):
        super().__init__()
        self.body = ConvBlock(ch, ch, k, 1, bn, act, bias=not bn)
        self.act = ACTIVATIONS[act]()

    def forward(self, x):
        return self.act(self.body(x) + x)


class CatBlock(nn.Module):
    """Two conv branches concatenated along channels."""

    def __init__(self, cin: int, c1: int, c2: int, act: str):
        super().__init__()
        self.a = ConvBlock(cin, c1, 1, 1, True, act, bias=False)
        self.b = ConvBlock(cin, c2, 3, 1, False, act, bias=True)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class DepthwiseBlock(nn.Module):
    """Depthwise 3x3 then pointwise 1x1 (MobileNet style)."""

    def __init__(self, cin: int, cout: int, act: str):
        super().__init__()
        self.dw = ConvBlock(cin, cin, 3, cin, True, act, bias=False)
        self.pw = ConvBlock(cin, cout, 1, 1, True, "identity", bias=False)

    def forward(self, x):
        return self.pw(self.dw(x))


class SEBlock(nn.Module):
    """Squeeze-excite as torchvision writes it: x * gate(fc2(act(fc1(avgpool(x))))), 1x1 convs."""

    def __init__(self, ch: int, squeeze: int, act: str, gate: str):
        super().__init__()
        self.fc1 = nn.Conv2d(ch, squeeze, 1)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Conv2d(squeeze, ch, 1)
        self.gate = nn.Hardsigmoid() if gate == "hardsigmoid" else nn.Sigmoid()

    def forward(self, x):
        return self.gate(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1))))) * x


class LayerScaleBlock(nn.Module):
    """ConvNeXt-style residual: depthwise conv, channels-last Linear MLP (permute), a per-channel gamma."""

    def __init__(self, ch: int, hidden: int, k: int, act: str):
        super().__init__()
        self.dw = nn.Conv2d(ch, ch, k, padding=k // 2, groups=ch)
        self.fc1 = nn.Linear(ch, hidden)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, ch)
        self.gamma = nn.Parameter(torch.rand(ch, 1, 1) + 0.5)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(y))).permute(0, 3, 1, 2)
        return x + self.gamma * y


class RandomCNN(nn.Module):
    def __init__(self, blocks: nn.ModuleList, feat: int, hidden: int, classes: int, pool: str, act: str):
        super().__init__()
        self.blocks = blocks
        self.pool = pool
        self.fc1 = nn.Linear(feat, hidden)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        if self.pool == "avg":
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        else:
            x = torch.flatten(x, 1)
        return self.fc2(self.act(self.fc1(x)))


class RandomMLP(nn.Module):
    def __init__(self, widths: list[int], acts: list[str], residual: list[bool], bn: list[bool]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) if use else nn.Identity() for b, use in zip(widths[1:], bn))
        self.acts = nn.ModuleList(ACTIVATIONS[a]() for a in acts)
        # Decided here, not in forward: fx cannot branch on traced shapes.
        self.residual = [r and a == b for r, a, b in zip(residual, widths[:-1], widths[1:])]

    def forward(self, x):
        n = len(self.layers)
        for i, (lin, norm, act) in enumerate(zip(self.layers, self.norms, self.acts)):
            y = lin(x)
            if i < n - 1:
                y = act(norm(y))
            if self.residual[i]:
                y = y + x
            x = y
        return x


@st.composite
def random_cnn(draw, max_blocks: int = 4, size: int = 8) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cin = draw(st.sampled_from([1, 3]))
    ch = cin
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    blocks = []
    for _ in range(draw(st.integers(1, max_blocks))):
        kind = draw(st.sampled_from(["conv", "res", "cat", "dw", "grouped", "se", "scale"]))
        if kind == "conv" or (kind in ("res", "se", "scale") and ch < 2):
            cout = draw(st.integers(2, 12))
            blocks.append(ConvBlock(ch, cout, draw(st.sampled_from([1, 3, 5])), 1, draw(st.booleans()), act,
                                    bias=draw(st.booleans())))
            ch = cout
        elif kind == "res":
            blocks.append(ResidualBlock(ch, draw(st.sampled_from([1, 3])), draw(st.booleans()), act))
        elif kind == "cat":
            c1, c2 = draw(st.integers(1, 6)), draw(st.integers(1, 6))
            blocks.append(CatBlock(ch, c1, c2, act))
            ch = c1 + c2
        elif kind == "se":
            blocks.append(SEBlock(ch, draw(st.integers(1, 4)), draw(st.sampled_from(["relu", "silu", "hardswish"])),
                                  draw(st.sampled_from(["sigmoid", "hardsigmoid"]))))
        elif kind == "scale":
            blocks.append(LayerScaleBlock(ch, draw(st.integers(2, 16)), draw(st.sampled_from([3, 7])), act))
        elif kind == "dw":
            cout = draw(st.integers(2, 12))
            blocks.append(DepthwiseBlock(ch, cout, act))
            ch = cout
        else:
            groups = draw(st.sampled_from([1, 2]))
            cin_g = ch if ch % groups == 0 else ch
            groups = groups if ch % groups == 0 else 1
            cout = groups * draw(st.integers(1, 6))
            blocks.append(ConvBlock(cin_g, cout, 3, groups, True, act, bias=False))
            ch = cout
    pool = draw(st.sampled_from(["avg", "flatten"]))
    feat = ch if pool == "avg" else ch * size * size
    hidden = draw(st.integers(4, 24))
    model = RandomCNN(nn.ModuleList(blocks), feat, hidden, draw(st.integers(2, 10)), pool, act)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            _randomize_bn(m, gen)
    batch = draw(st.integers(1, 4))
    x = torch.randn(batch, cin, size, size, generator=gen)
    return model.eval(), (x,)


@st.composite
def random_mlp(draw, max_layers: int = 5) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = draw(st.integers(1, max_layers))
    widths = [draw(st.integers(2, 32)) for _ in range(n + 1)]
    acts = [draw(st.sampled_from(sorted(ACTIVATIONS))) for _ in range(n)]
    residual = [draw(st.booleans()) for _ in range(n)]
    bn = [draw(st.booleans()) for _ in range(n)]
    model = RandomMLP(widths, acts, residual, bn)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            _randomize_bn(m, gen)
    batch = draw(st.integers(2, 5))
    return model.eval(), (torch.randn(batch, widths[0], generator=gen),)


def random_model() -> st.SearchStrategy[tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    """A random MLP or CNN with its example inputs."""
    return st.one_of(random_mlp(), random_cnn())
