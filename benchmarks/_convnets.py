"""Small EfficientNet- and ConvNeXt-style nets and an ImageNet-sized MobileNetV2 (random init) for the int8
speed benchmark and tests.

EfficientNet-style: SiLU, depthwise 3x3/5x5 convs, squeeze-excite (sigmoid gate), batch norms, residual adds.
ConvNeXt-style: depthwise 7x7 convs, channels-last LayerNorm, linear 4x MLP with GELU, residual adds.
MobileNetV2-224: torchvision's mobilenet_v2 layout (width 1.0, all 17 inverted residual blocks, 1280-channel head,
1000 classes) built from slimfx's zoo class, for 3x224x224 inputs; random init, not trained.
Batch norms get random running statistics so folding is not a no-op.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int):
        super().__init__()
        self.reduce = nn.Conv2d(c, r, 1)
        self.expand = nn.Conv2d(r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = self.expand(F.silu(self.reduce(s)))
        return x * torch.sigmoid(s)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int):
        super().__init__()
        mid = cin * expand
        self.expand = None
        if expand != 1:
            self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                nn.SiLU())
        self.se = SqueezeExcite(mid, max(1, cin // 4))
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.se(self.dw(y)))
        return x + y if self.residual else y


class EfficientNetStyle(nn.Module):
    """EfficientNet-B0's layout (stages of MBConv with SiLU and squeeze-excite), narrower and shorter."""

    # (expand, channels, repeats, stride, kernel)
    STAGES = ((1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 2, 2, 3), (6, 112, 1, 1, 5),
              (6, 192, 2, 2, 5))

    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        c = int(32 * width)
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.SiLU())
        blocks = []
        for e, ch, n, s, k in self.STAGES:
            ch = int(ch * width)
            for i in range(n):
                blocks.append(MBConv(c, ch, e, k, s if i == 0 else 1))
                c = ch
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(c, 640, 1, bias=False), nn.BatchNorm2d(640), nn.SiLU())
        self.fc = nn.Linear(640, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor (ConvNeXt's downsampling norm)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pw1 = nn.Linear(c, 4 * c)
        self.pw2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXtStyle(nn.Module):
    """ConvNeXt-T's layout (patchify stem, depthwise 7x7, LayerNorm, inverted MLP with GELU), narrower."""

    def __init__(self, num_classes: int = 10, dims: tuple[int, ...] = (32, 64, 128, 256), depths=(2, 2, 4, 2)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        stages = []
        for i, (d, n) in enumerate(zip(dims, depths)):
            layers = [] if i == 0 else [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], d, 2, 2)]
            layers += [ConvNeXtBlock(d) for _ in range(n)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.fc = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x)).mean(dim=(2, 3))
        return self.fc(self.norm(x))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine params, so folded weights differ from the raw ones."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


def efficientnet_style(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(EfficientNetStyle(), seed)


def convnext_style(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNeXtStyle().eval()


# MobileNetV2's ImageNet config (expand ratio t, channels c, repeats n, stride s), Sandler et al. 2018, Table 2
MOBILENETV2_IMAGENET = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                        (6, 320, 1, 1))


def mobilenetv2_224(seed: int = 0) -> nn.Module:
    """MobileNetV2 1.0 for 3x224x224 (3.5M params, 300M MACs), random init: the MobileNetV2-class model at
    ImageNet size of issue #17, not a trained network."""
    from slimfx.models.mobilenet import MobileNetV2

    torch.manual_seed(seed)
    return randomize_bn(MobileNetV2(num_classes=1000, width_mult=1.0, config=MOBILENETV2_IMAGENET,
                                    last_channels=1280), seed)


NETS = {"efficientnet_style": efficientnet_style, "convnext_style": convnext_style,
        "mobilenetv2_224": mobilenetv2_224}
# input height and width per net (the others: the benchmark's default)
INPUT_SIZE = {"mobilenetv2_224": 224}
