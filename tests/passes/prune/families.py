"""Small re-implementations of public architecture families, written the way torchvision writes them.

The main suite has no torchvision; these follow its module structure (the blocks, the order of ops, the
functional spellings: SqueezeExcitation's `scale * input`, ConvNeXt's Permute + LayerNorm + Linear MLP and
its `layer_scale` parameter of shape [C, 1, 1], LayerNorm2d as permute + F.layer_norm + permute,
stochastic depth as a call that is the identity in eval mode) at a small width and resolution, so the
pruning tests see the graphs the real networks give.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvNormActivation(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                 act: Callable[..., nn.Module] | None = nn.ReLU):
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                                   nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: x * scale_act(fc2(act(fc1(avgpool(x)))))."""

    def __init__(self, channels: int, squeeze: int, act: Callable[..., nn.Module] = nn.ReLU,
                 scale_act: Callable[..., nn.Module] = nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = act()
        self.scale_activation = scale_act()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


@torch.fx.wrap
def stochastic_depth(x: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """torchvision.ops.stochastic_depth (wrapped as torchvision wraps it): the identity in eval mode."""
    if not training or p == 0.0:
        return x
    size = [x.shape[0]] + [1] * (x.ndim - 1) if mode == "row" else [1] * x.ndim
    noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(1.0 - p)
    return x * noise.div_(1.0 - p)


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str = "row"):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x):
        return stochastic_depth(x, self.p, self.mode, self.training)


# --- MobileNetV3 ---------------------------------------------------------------------------------

class InvertedResidualV3(nn.Module):
    def __init__(self, cin: int, k: int, expanded: int, cout: int, use_se: bool, hs: bool, stride: int):
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvNormActivation(cin, expanded, 1, act=act))
        layers.append(ConvNormActivation(expanded, expanded, k, stride, groups=expanded, act=act))
        if use_se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4, 8), scale_act=nn.Hardsigmoid))
        layers.append(ConvNormActivation(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        y = self.block(x)
        return y + x if self.use_res else y


class MobileNetV3Like(nn.Module):
    """mobilenet_v3_small's layout at a fraction of its width: hardswish stem, SE with hardsigmoid gates,
    depthwise 3x3/5x5, a 1x1 last conv, Linear + Hardswish + Dropout + Linear classifier."""

    # (cin, kernel, expanded, cout, use_se, hardswish, stride), mobilenet_v3_small's rows at width 1/2
    CONFIG = [(8, 3, 8, 8, True, False, 2), (8, 3, 40, 16, False, False, 2), (16, 3, 48, 16, False, False, 1),
              (16, 5, 48, 24, True, True, 2), (24, 5, 120, 24, True, True, 1), (24, 5, 64, 24, True, True, 1),
              (24, 5, 144, 48, True, True, 2), (48, 5, 288, 48, True, True, 1)]

    def __init__(self, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [ConvNormActivation(3, 8, 3, 2, act=nn.Hardswish)]
        layers += [InvertedResidualV3(*row) for row in self.CONFIG]
        layers.append(ConvNormActivation(48, 288, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(288, 512), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(512, classes))

    def forward(self, x):
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


# --- EfficientNet --------------------------------------------------------------------------------

class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int, sd_prob: float):
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        expanded = cin * expand
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvNormActivation(cin, expanded, 1, act=nn.SiLU))
        layers.append(ConvNormActivation(expanded, expanded, k, stride, groups=expanded, act=nn.SiLU))
        layers.append(SqueezeExcitation(expanded, max(1, cin // 4), act=nn.SiLU))
        layers.append(ConvNormActivation(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob, "row")

    def forward(self, x):
        y = self.block(x)
        if self.use_res:
            y = self.stochastic_depth(y) + x
        return y


class EfficientNetLike(nn.Module):
    """efficientnet_b0's layout at width 1/2 with fewer repeats: SiLU, MBConv with SE (SiLU inside,
    sigmoid gate), stochastic depth on the residual branches, 1x1 head conv, Dropout + Linear."""

    # (expand, kernel, stride, cin, cout, repeats)
    CONFIG = [(1, 3, 1, 16, 8, 1), (6, 3, 2, 8, 12, 2), (6, 5, 2, 12, 20, 2), (6, 3, 2, 20, 40, 2),
              (6, 5, 1, 40, 56, 1)]

    def __init__(self, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [ConvNormActivation(3, 16, 3, 2, act=nn.SiLU)]
        total = sum(r[-1] for r in self.CONFIG)
        i = 0
        for expand, k, stride, cin, cout, reps in self.CONFIG:
            stage = []
            for j in range(reps):
                stage.append(MBConv(cin if j == 0 else cout, cout, expand, k, stride if j == 0 else 1,
                                    0.2 * i / total))
                i += 1
            layers.append(nn.Sequential(*stage))
        layers.append(ConvNormActivation(56, 224, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(224, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --- ConvNeXt ------------------------------------------------------------------------------------

class Permute(nn.Module):
    def __init__(self, dims: list[int]):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    """torchvision's channels-first LayerNorm: permute, F.layer_norm over C, permute back."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float, sd_prob: float):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=True), Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(sd_prob, "row")

    def forward(self, x):
        result = self.layer_scale * self.block(x)
        result = self.stochastic_depth(result)
        result += x
        return result


class ConvNeXtLike(nn.Module):
    """convnext_tiny's layout at width 1/8 and depths (1, 1, 2, 1): 4x4 stride-4 stem + LayerNorm2d,
    CNBlocks (7x7 depthwise, channels-last LayerNorm, Linear MLP with GELU, layer-scale gamma, stochastic
    depth), LayerNorm2d + 2x2 stride-2 downsampling, avgpool + LayerNorm2d + Flatten + Linear head."""

    def __init__(self, dims: tuple[int, ...] = (12, 24, 48, 96), depths: tuple[int, ...] = (1, 1, 2, 1),
                 classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))]
        total, i = sum(depths), 0
        for s, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            stage = []
            for _ in range(depth):
                stage.append(CNBlock(dim, 1e-6 * 1e5, 0.1 * i / max(1, total - 1)))  # gamma 0.1: not negligible
                i += 1
            layers.append(nn.Sequential(*stage))
            if s + 1 < len(dims):
                layers.append(nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dims[s + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


# --- ViT -----------------------------------------------------------------------------------------

class EncoderBlock(nn.Module):
    """torchvision's ViT encoder block: pre-norm nn.MultiheadAttention and an MLP, both residual."""

    def __init__(self, heads: int, dim: int, mlp: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp, dim),
                                 nn.Dropout(0.0))

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class ViTLike(nn.Module):
    """vit_b_16's layout, tiny: patch conv, class token, position embedding, encoder blocks, head."""

    def __init__(self, image: int = 32, patch: int = 8, dim: int = 32, heads: int = 4, mlp: int = 64,
                 layers: int = 2, classes: int = 10):
        super().__init__()
        self.patch, self.dim = patch, dim
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        seq = (image // patch) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, seq, dim) * 0.02)
        self.layers = nn.Sequential(*[EncoderBlock(heads, dim, mlp) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        n = x.shape[0]
        x = self.conv_proj(x).reshape(n, self.dim, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        x = self.layers(x + self.pos_embedding)
        return self.head(self.ln(x)[:, 0])


# --- ShuffleNetV2 ---------------------------------------------------------------------------------

def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleBlock(nn.Module):
    """torchvision's shufflenetv2.InvertedResidual: stride 2 concatenates two branches of the input, stride 1
    splits the input in halves (chunk), passes one through and concatenates it with the other's branch; a
    channel shuffle after either."""

    def __init__(self, inp: int, oup: int, stride: int):
        super().__init__()
        self.stride = stride
        half = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
                nn.Conv2d(inp, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2Like(nn.Module):
    """shufflenet_v2_x1_0's layout at width 1/4 and repeats (2, 3, 2): stem conv + max pool, three stages of
    a stride-2 block and stride-1 blocks, 1x1 conv5, global mean, fc."""

    def __init__(self, channels: tuple[int, ...] = (8, 32, 64, 128, 256), repeats: tuple[int, ...] = (2, 3, 2),
                 classes: int = 10):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, channels[0], 3, 2, 1, bias=False), nn.BatchNorm2d(channels[0]),
                                   nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = channels[0]
        for i, (rep, cout) in enumerate(zip(repeats, channels[1:4], strict=True)):
            setattr(self, f"stage{i + 2}", nn.Sequential(ShuffleBlock(cin, cout, 2),
                                                          *[ShuffleBlock(cout, cout, 1) for _ in range(rep - 1)]))
            cin = cout
        self.conv5 = nn.Sequential(nn.Conv2d(cin, channels[-1], 1, bias=False), nn.BatchNorm2d(channels[-1]),
                                   nn.ReLU(inplace=True))
        self.fc = nn.Linear(channels[-1], classes)

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        return self.fc(self.conv5(x).mean([2, 3]))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial batch-norm statistics and norm affines (pruning must carry them exactly)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            with torch.no_grad():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                    m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model.eval()


FAMILIES = {"mobilenet_v3": MobileNetV3Like, "efficientnet": EfficientNetLike, "convnext": ConvNeXtLike,
            "vit": ViTLike, "shufflenet_v2": ShuffleNetV2Like}
