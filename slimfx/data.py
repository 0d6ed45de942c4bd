"""Data plumbing between user data, the zoo's datasets and passes.

Passes read `ctx.train_data` as an iterable of `(inputs_tuple, target)` batches and
`ctx.calibration_data` as an iterable of input tuples; these helpers make both from tensors.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class Batches:
    """Re-iterable `(inputs_tuple, target)` mini-batches over tensors; reshuffled (seeded) each pass."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, *, shuffle: bool = True,
                 seed: int = 0):
        if len(x) != len(y):
            raise ValueError(f"inputs ({len(x)}) and targets ({len(y)}) differ in length")
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self._gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        order = torch.randperm(len(self.x), generator=self._gen) if self.shuffle else torch.arange(len(self.x))
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            yield (self.x[idx],), self.y[idx]


def calibration_batches(x: torch.Tensor, samples: int, batch_size: int = 32, seed: int = 0) -> list[tuple]:
    """`samples` inputs drawn (seeded) from `x`, as a list of input tuples of `batch_size`."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=gen)[:samples]
    return [(x[idx[i:i + batch_size]],) for i in range(0, len(idx), batch_size)]
