"""A tiny BERT-style encoder classifier with attention written out explicitly.

Attention uses separate q/k/v/out projections and an explicit (B, S, heads, head_dim) reshape so that
torch.fx captures every op and a structured pruner can see (and remove) whole heads.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MultiHeadSelfAttention(nn.Module):
    """Unmasked multi-head self-attention over a fixed sequence length."""

    def __init__(self, d_model: int, num_heads: int, seq_len: int, dropout: float = 0.1) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.seq_len = seq_len
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.size(0)
        S = self.seq_len
        q = self.q_proj(x).reshape(B, S, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, S, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, S, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        attn = self.attn_drop(torch.softmax(scores, dim=-1))
        ctx = torch.matmul(attn, v).permute(0, 2, 1, 3).reshape(B, S, self.num_heads * self.head_dim)
        return self.out_proj(ctx)


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + fc2(gelu(fc1(ln2(x))))."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, seq_len: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadSelfAttention(d_model, num_heads, seq_len, dropout)
        self.drop1 = nn.Dropout(dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_ff, d_model)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop1(self.attn(self.ln1(x)))
        return x + self.drop2(self.fc2(self.act(self.fc1(self.ln2(x)))))


class TinyBert(nn.Module):
    """4-layer, d_model 128, 4-head encoder over int64 token ids [B, seq_len], mean-pooled classifier."""

    def __init__(self, vocab_size: int = 1000, num_classes: int = 4, seq_len: int = 64, d_model: int = 128,
                 num_heads: int = 4, d_ff: int = 512, num_layers: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        # Position ids as a buffer (not derived from the input shape) so the captured graph is static.
        self.register_buffer("position_ids", torch.arange(seq_len))
        self.emb_drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, num_heads, d_ff, seq_len, dropout) for _ in range(num_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.classifier = nn.Linear(d_model, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(input_ids) + self.pos_emb(self.position_ids)
        x = self.emb_drop(x)
        for layer in self.layers:
            x = layer(x)
        return self.classifier(self.ln_f(x).mean(dim=1))
