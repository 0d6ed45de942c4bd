"""Re-implementations of patterns public architectures use that capture used to leave opaque (issue #15):
torchvision's stochastic depth and relative-position-bias helpers (wrapped with torch.fx.wrap), a
ViT-style encoder on nn.MultiheadAttention, hand-written attention scaled by 1/sqrt(q.size(-1)), and
a timm-style norm block that asserts its input's rank. Small sizes: each compiles in a few seconds."""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

# --- torchvision.ops.stochastic_depth, as torchvision writes it -------------------------------------------

def stochastic_depth(input: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:  # noqa: A002
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ["batch", "row"]:
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    if mode == "row":
        size = [input.shape[0]] + [1] * (input.ndim - 1)
    else:
        size = [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device)
    noise = noise.bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


torch.fx.wrap("stochastic_depth")


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        return stochastic_depth(input, self.p, self.mode, self.training)


class SDBlock(nn.Module):
    """A residual block whose branch goes through stochastic depth (an EfficientNet/ConvNeXt habit)."""

    def __init__(self, c: int, p: float):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.sd = StochasticDepth(p, "row")

    def forward(self, x):
        return x + self.sd(F.relu(self.bn(self.conv(x))))


class StochasticDepthNet(nn.Module):
    def __init__(self, c: int = 8, blocks: int = 3, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*[SDBlock(c, 0.1 * (i + 1)) for i in range(blocks)])
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


# --- torchvision.models.swin_transformer's relative position bias ----------------------------------------

def _get_relative_position_bias(relative_position_bias_table: torch.Tensor, relative_position_index: torch.Tensor,
                                window_size: list[int]) -> torch.Tensor:
    N = window_size[0] * window_size[1]
    relative_position_bias = relative_position_bias_table[relative_position_index]
    relative_position_bias = relative_position_bias.view(N, N, -1)
    relative_position_bias = relative_position_bias.permute(2, 0, 1).contiguous().unsqueeze(0)
    return relative_position_bias


torch.fx.wrap("_get_relative_position_bias")


class WindowAttention(nn.Module):
    """Attention inside one window of tokens, with a learnt bias per relative position (Swin)."""

    def __init__(self, dim: int = 16, window: int = 3, heads: int = 2):
        super().__init__()
        self.window, self.heads = [window, window], heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.5)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += window - 1
        rel[:, :, 1] += window - 1
        rel[:, :, 0] *= 2 * window - 1
        self.register_buffer("relative_position_index", rel.sum(-1).flatten())

    def forward(self, x):  # x: [B, N, C] with N = window * window
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * (c // self.heads) ** -0.5
        attn = q @ k.transpose(-2, -1)
        attn = attn + _get_relative_position_bias(self.relative_position_bias_table, self.relative_position_index,
                                                  self.window)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class WindowNet(nn.Module):
    def __init__(self, dim: int = 16, window: int = 3, classes: int = 4):
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.attn = WindowAttention(dim, window)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):  # x: [B, N, 3]
        h = self.embed(x)
        return self.head((h + self.attn(h)).mean(1))


# --- a ViT/DeiT-style encoder on nn.MultiheadAttention --------------------------------------------------

class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        torch._assert(x.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {x.shape}")
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class TinyViT(nn.Module):
    def __init__(self, image: int = 8, patch: int = 4, dim: int = 16, heads: int = 2, layers: int = 2,
                 classes: int = 5):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos_embedding = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.5)
        self.layers = nn.Sequential(*[EncoderBlock(dim, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        n = x.shape[0]
        x = self.patch(x).reshape(n, self.patch.out_channels, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1) + self.pos_embedding
        return self.head(self.ln(self.layers(x))[:, 0])


# --- hand-written attention: a scale from the head size ------------------------------------------------

class HandAttention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2, classes: int = 3):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        b, n, d = x.size()
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attn = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
        y = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b * 1, n, d)
        return self.head(self.out(y).mean(1))


# --- a timm-style norm block asserting its input's rank ------------------------------------------------

class AssertingNorm(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        torch._assert(x.dim() == 4 and x.shape[1] == self.bn.num_features, "channels")
        return F.relu(self.bn(x))


class AssertingCNN(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (8, 8, 16, 16, 16), classes: int = 4):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), AssertingNorm(w)]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def seeded(cls: type, *args, seed: int = 0, **kwargs) -> nn.Module:
    """An eval-mode instance with seeded weights and non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    m = cls(*args, **kwargs)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


# --- torchvision.models.swin_transformer's shifted-window attention (v1 and v2), a wrapped function --------

def shifted_window_attention(x: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor,
                             bias: torch.Tensor, window: list[int], heads: int, shift: list[int],
                             qkv_bias: torch.Tensor, proj_bias: torch.Tensor,
                             logit_scale: torch.Tensor | None = None) -> torch.Tensor:
    B, H, W, C = x.shape
    pad_r = (window[1] - W % window[1]) % window[1]
    pad_b = (window[0] - H % window[0]) % window[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # zero padding up to whole windows
    _, pH, pW, _ = x.shape
    shift = shift.copy()
    if window[0] >= pH:
        shift[0] = 0
    if window[1] >= pW:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nw = (pH // window[0]) * (pW // window[1])
    x = x.view(B, pH // window[0], window[0], pW // window[1], window[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * nw, window[0] * window[1], C)
    if logit_scale is not None:  # v2: the k part of the qkv bias is zero, written in place on a copy
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length: 2 * length].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # v2: cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (C // heads) ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + bias.expand_as(attn[:1]).reshape_as(bias)
    if sum(shift) > 0:  # a mask built from sizes alone, written in place region by region
        attn_mask = x.new_zeros((pH, pW))
        h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
        w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0]: h[1], w[0]: w[1]] = count
                count += 1
        attn_mask = attn_mask.view(pH // window[0], window[0], pW // window[1], window[1])
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(nw, window[0] * window[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
        attn = attn.view(x.size(0) // nw, nw, heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, x.size(1), x.size(1))
    x = (F.softmax(attn, dim=-1) @ v).transpose(1, 2).reshape(x.size(0), x.size(1), C)
    x = F.linear(x, proj_weight, proj_bias)
    x = x.view(B, pH // window[0], pW // window[1], window[0], window[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pH, pW, C)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


torch.fx.wrap("shifted_window_attention")


class ShiftedWindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, shift: int, heads: int, v2: bool):
        super().__init__()
        self.window, self.shift, self.heads = [window, window], [shift, shift], heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        n = window * window
        self.bias = nn.Parameter(torch.randn(1, heads, n, n) * 0.5)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(heads, 1, 1))) if v2 else None

    def forward(self, x):
        return shifted_window_attention(x, self.qkv.weight, self.proj.weight, self.bias, self.window, self.heads,
                                        self.shift, self.qkv.bias, self.proj.bias, self.logit_scale)


class SwinNet(nn.Module):
    """Patches in [B, H, W, C] layout through a plain and a shifted window block (H, W not multiples of the
    window: the blocks pad); v2 adds cosine attention and the zeroed k bias."""

    def __init__(self, dim: int = 16, window: int = 3, classes: int = 4, v2: bool = False):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 2, stride=2)
        self.blocks = nn.ModuleList([ShiftedWindowAttention(dim, window, s, 2, v2) for s in (0, window // 2)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)
        for b in self.blocks:
            x = x + b(self.norm(x))
        return self.head(x.mean((1, 2)))


# --- timm patterns: levit's cached attention biases, deit's unbind, resmlp's affine, in-place act, edgenext ---

class CachedBiasAttention(nn.Module):
    """timm's levit: attention biases gathered from a table with a buffer of offsets (`table[:, idx]`) and,
    in eval mode, cached in a dict on the module keyed by the device."""

    def __init__(self, heads: int = 2, n: int = 4):
        super().__init__()
        self.table = nn.Parameter(torch.randn(heads, 2 * n - 1))
        pos = torch.arange(n)
        self.register_buffer("idx", (pos[:, None] - pos[None, :]).abs(), persistent=False)
        self.attention_bias_cache: dict[str, torch.Tensor] = {}

    def biases(self, device: torch.device) -> torch.Tensor:
        if self.training:
            return self.table[:, self.idx]
        key = str(device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.table[:, self.idx]
        return self.attention_bias_cache[key]

    def forward(self, x):  # [B, heads, n, n] scores
        return (x * 0.5 + self.biases(x.device)).softmax(-1)


class TimmAttention(nn.Module):
    """timm.layers.Attention (deit, vit): q, k, v from one projection, split with unbind."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Affine(nn.Module):
    """resmlp's affine norm: torch.addcmul(beta, alpha, x)."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(dim) + 0.1 * torch.randn(dim))
        self.beta = nn.Parameter(0.1 * torch.randn(dim))

    def forward(self, x):
        return torch.addcmul(self.beta, self.alpha, x)


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass whose forward ends in an in-place activation, with an
    in-place layer scale after it (`x.mul_(gamma)`)."""

    def __init__(self, c: int):
        super().__init__(c)
        self.act = nn.SiLU(inplace=True)
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.5))

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        x = self.act(x)
        return x.mul_(self.gamma)


class PositionalEncodingFourier(nn.Module):
    """edgenext's position encoding: built from `torch.zeros((B, H, W))` (B follows the batch), cumsum, a
    frequency table from arange, sin/cos, then a 1x1 conv."""

    def __init__(self, hidden_dim: int = 8, dim: int = 16, temperature: float = 10000.0):
        super().__init__()
        self.token_projection = nn.Conv2d(hidden_dim * 2, dim, kernel_size=1)
        self.scale, self.temperature, self.hidden_dim = 2 * math.pi, temperature, hidden_dim

    def forward(self, shape: tuple[int, int, int]):
        device = self.token_projection.weight.device
        inv_mask = ~torch.zeros(shape).to(device=device, dtype=torch.bool)
        y_embed = inv_mask.cumsum(1, dtype=torch.float32)
        x_embed = inv_mask.cumsum(2, dtype=torch.float32)
        y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * self.scale
        dim_t = torch.arange(self.hidden_dim, dtype=torch.int64, device=device).to(torch.float32)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.hidden_dim)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return self.token_projection(torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2))


class TimmPatternsNet(nn.Module):
    """The timm patterns in one small net: conv stem with BatchNormAct, edgenext's position encoding (a leaf
    for torch.fx, as timm registers it), tokens through resmlp's affine and deit's attention, levit's cached
    biases on a 4x4 score map."""

    def __init__(self, c: int = 16, classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.bn = BatchNormAct(c)
        self.pos = PositionalEncodingFourier(hidden_dim=8, dim=c)
        self.norm = Affine(c)
        self.attn = TimmAttention(c, 2)
        self.bias = CachedBiasAttention(2, 4)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.bn(self.stem(x))
        b, c, h, w = x.shape
        x = x + self.pos((b, h, w))
        t = x.flatten(2).transpose(1, 2)  # [B, 16 tokens, C]
        t = t + self.attn(self.norm(t))
        s = self.bias(t[:, :, :2].transpose(1, 2).reshape(b, 2, 4, 4))  # [B, 2 heads, 4, 4]
        return self.head(t.mean(1)) + s.mean((1, 2, 3))[:, None]
