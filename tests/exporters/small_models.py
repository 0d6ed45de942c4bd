"""Small models of the zoo's kinds (CNN+BN, residual, depthwise/ReLU6, transformers, MLP) for exporter tests."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CnnBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        return self.fc(torch.flatten(x, 1))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.short(x))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(self.avg(x).view(x.size(0), -1))


class InvRes(nn.Module):
    def __init__(self, c, expand=4):
        super().__init__()
        h = c * expand
        self.body = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(inplace=True),
            nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(inplace=True),
            nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.body(x)


class MobileNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(InvRes(8), InvRes(8))
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(8, 10))

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


class Encoder(nn.Module):
    """Transformer encoder layer with explicit q/k/v reshape/permute/matmul/softmax, or F.sdpa."""

    def __init__(self, vocab=50, d=32, heads=4, layers=2, seq=16, sdpa=False, classes=5):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, seq, d) * 0.02)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            self.layers.append(nn.ModuleDict(dict(
                ln1=nn.LayerNorm(d), q=nn.Linear(d, d), k=nn.Linear(d, d), v=nn.Linear(d, d), o=nn.Linear(d, d),
                ln2=nn.LayerNorm(d), ff1=nn.Linear(d, 2 * d), ff2=nn.Linear(2 * d, d))))
        self.norm = nn.LayerNorm(d)
        self.cls = nn.Linear(d, classes)

    def attend(self, lyr, x):
        B, T, C = x.shape
        h = self.heads
        q = lyr["q"](x).view(B, T, h, C // h).permute(0, 2, 1, 3)
        k = lyr["k"](x).view(B, T, h, C // h).transpose(1, 2)
        v = lyr["v"](x).reshape(B, -1, h, C // h).transpose(1, 2)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            att = (q @ k.transpose(-2, -1)) / (k.size(-1) ** 0.5)
            y = att.softmax(dim=-1) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return lyr["o"](y)

    def forward(self, ids):
        x = self.tok(ids) + self.pos
        for lyr in self.layers:
            x = x + self.attend(lyr, lyr["ln1"](x))
            x = x + lyr["ff2"](F.gelu(lyr["ff1"](lyr["ln2"](x))))
        x = self.norm(x)
        return self.cls(x[:, 0])


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 32), nn.GELU(),
                                 nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running stats so batch_norm export is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """(eval-mode model, example inputs at batch 2) for one of SMALL_MODELS."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if name == "cnn_bn":
        return _randomize_bn(CnnBn()).eval(), (torch.randn(2, 1, 8, 8, generator=g),)
    if name == "resnet":
        return _randomize_bn(ResNet()).eval(), (torch.randn(2, 3, 16, 16, generator=g),)
    if name == "mobilenet":
        return _randomize_bn(MobileNet()).eval(), (torch.randn(2, 3, 16, 16, generator=g),)
    if name == "encoder":
        return Encoder().eval(), (torch.randint(0, 50, (2, 16), generator=g),)
    if name == "encoder_sdpa":
        return Encoder(sdpa=True).eval(), (torch.randint(0, 50, (2, 16), generator=g),)
    if name == "mlp":
        return Mlp().eval(), (torch.randn(2, 64, generator=g),)
    raise KeyError(name)


SMALL_MODELS = ("cnn_bn", "resnet", "mobilenet", "encoder", "encoder_sdpa", "mlp")
