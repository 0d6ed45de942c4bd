"""A small language model whose LM head is tied to the token table, as GPT-2's is, in a file of its own:
`slimfx compile docs/examples/tied_lm.py:make --recipe int4-weights -o out/` (docs/quantization.md)."""

import torch
import torch.nn as nn


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 2000, d: int = 64):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.body = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied: one tensor, two modules

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.wte(ids)
        return self.head(h + self.body(h))


def make():
    torch.manual_seed(0)
    return TiedLM().eval(), (torch.randint(0, 2000, (2, 12)),)
