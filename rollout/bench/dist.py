"""The torch.distributed world a benchmark runs in, set up as a trainer would set it up: the
engine never initialises one (``rollout/distributed/parallel_state.py``).

Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1 in the environment) ``world(device)``
initialises the default group from torchrun's environment: nccl with this rank on
``cuda:LOCAL_RANK`` (whatever index ``device`` named) for a cuda device, gloo on cpu; and
destroys it on exit. Without torchrun it is a world of one and initialises nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: str = "cpu"  # this rank's device: cuda:LOCAL_RANK under torchrun on GPU

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes results."""
        return self.rank == 0


def env_world_size() -> int:
    """The world size torchrun announces (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def world(device: str) -> Iterator[World]:
    if env_world_size() == 1:
        yield World(0, 1, device)
        return
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        # The process-wide current device: nccl and all_gather_object use it.
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"torchrun benchmarks run on cuda or cpu, not {device!r}")
    dist.init_process_group(backend)  # env:// (MASTER_ADDR, RANK, WORLD_SIZE from torchrun)
    try:
        yield World(dist.get_rank(), dist.get_world_size(), str(dev))
    finally:
        dist.destroy_process_group()


def world_size() -> int:
    """Ranks of the initialised world (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` in a world of one.
    A collective: every rank must call it, never inside a timed loop."""
    if world_size() == 1:
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def check_same_on_all_ranks(what: str, value: Any) -> None:
    """Raise unless every rank holds an equal ``value`` (say, a digest of the prompts the
    ranks of a tensor-parallel group must all be given). A collective, as ``gather``."""
    values = gather(value)
    if any(v != values[0] for v in values):
        raise RuntimeError(f"{what} differ across ranks: {values}")
