"""Who this process is in a multi-process run, whichever launcher started it."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return World(dist.get_rank(), dist.get_world_size())
    except ImportError:
        pass
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
