"""torchrun for the commands: `torchrun --nproc_per_node=N -m slimfx distill ...` makes one data-parallel job.

torchrun starts N copies of the command with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. `Ranks.from_env()`
joins them into one process group (gloo: the commands train on the CPU); the trainer then wraps the student in
DistributedDataParallel and shards every global batch across the ranks (passes/distill/trainer.py). Rank 0 alone
prints and writes files. Without torchrun (WORLD_SIZE unset or 1) everything here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from slimfx.ir.errors import SlimfxError

T = TypeVar("T")


class Ranks:
    """This process's place in a torchrun job: rank, world size, and whether it is the one that reports."""

    def __init__(self, rank: int = 0, world: int = 1, owns_group: bool = False) -> None:
        self.rank, self.world, self.owns_group = rank, world, owns_group

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Ranks:
        """Join the torchrun job the environment describes (WORLD_SIZE > 1), else a single process."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
        except ValueError as e:
            raise SlimfxError(f"WORLD_SIZE and RANK must be whole numbers (set by torchrun): {e}") from e
        if world <= 1:
            return cls()
        if dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise SlimfxError(f"WORLD_SIZE={world} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                              "not set: start the ranks with "
                              "`torchrun --nproc_per_node=N -m slimfx ...`, or unset WORLD_SIZE for one process")
        dist.init_process_group("gloo", rank=rank, world_size=world)
        return cls(rank, world, owns_group=True)

    def first(self, fn: Callable[[], T]) -> T:
        """`fn()` on rank 0 first, then on the others (e.g. a zoo teacher is trained and cached only once)."""
        if self.world == 1:
            return fn()
        value = fn() if self.main else None
        dist.barrier()
        return value if self.main else fn()  # type: ignore[return-value]

    def __enter__(self) -> Ranks:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
