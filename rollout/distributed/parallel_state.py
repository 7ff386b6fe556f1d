"""``ParallelState``: which tensor-parallel group this rank belongs to.

The engine never calls ``init_process_group``: the caller (torchrun, a trainer) has. With
``tensor_parallel_size=k`` the world is cut into consecutive groups of k ranks
(``[0..k-1], [k..2k-1], ...``); each group is one tensor-parallel model, the groups are
data-parallel replicas (``dp_rank = rank // k``).

Every collective is bounded by its group's timeout (gloo honours it; see communication.py
for what a failure becomes). ``dist.new_group`` does not inherit the world's timeout (it
falls back to torch's default, 30 min for gloo), so the groups made here are given the
world's: a caller who set ``init_process_group(timeout=...)`` gets that bound everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from rollout.errors import InvalidRequestError


@dataclass(frozen=True)
class ParallelState:
    tensor_parallel_size: int = 1
    tp_group: Any = None  # a torch.distributed ProcessGroup; None only when size is 1
    tp_rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tensor_parallel_size:
            raise ValueError(f"tp_rank {self.tp_rank} outside [0, {self.tensor_parallel_size})")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"dp_rank {self.dp_rank} outside [0, {self.dp_size})")
        if self.tensor_parallel_size > 1 and self.tp_group is None:
            raise ValueError("tensor_parallel_size > 1 needs a tp_group")


def group_timeout(group: Any = None) -> timedelta | None:
    """The timeout ``group``'s collectives run under (None: the world), or None where the
    backend does not expose it. torch has no public getter: it sits on the backend's
    options (gloo and NCCL alike)."""
    pg = group if group is not None else dist.group.WORLD
    for device in pg._device_types:
        try:
            return pg._get_backend(device).options._timeout
        except (AttributeError, RuntimeError):
            continue
    return None


def init_parallel(tensor_parallel_size: int, tp_group: Any = None, timeout: timedelta | None = None) -> ParallelState:
    """The parallel config of this rank. Every rank of the world must call it, in the same
    order (``dist.new_group`` is collective over the world), unless ``tp_group`` is given:
    then that group (of ``tensor_parallel_size`` ranks, this one among them) is used as is,
    with the timeout its creator gave it. The groups made here get ``timeout``, by default
    the world's."""
    k = tensor_parallel_size
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InvalidRequestError("tensor_parallel_size", k, "an int >= 1")
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidRequestError(
            "tensor_parallel_size", k, "1 without a process group",
            "a torch.distributed process group must be initialised first (torchrun, or "
            "dist.init_process_group); the engine never initialises one",
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % k:
        raise InvalidRequestError(
            "tensor_parallel_size", k, f"a divisor of the world size {world}",
        )
    if tp_group is not None:
        size = dist.get_world_size(tp_group)
        if size != k:
            raise InvalidRequestError("tp_group", f"group of {size} ranks", f"a group of tensor_parallel_size={k} ranks")
        tp_rank = dist.get_rank(tp_group)
        if tp_rank < 0:
            raise InvalidRequestError("tp_group", "a group without this rank", f"a group containing rank {rank}")
        return ParallelState(k, tp_group, tp_rank, rank // k, world // k)
    if timeout is None:
        timeout = group_timeout()
    mine = None
    for first in range(0, world, k):  # every group, same order on every rank
        group = dist.new_group(list(range(first, first + k)), timeout=timeout, group_desc=f"tp{first // k}")
        if first <= rank < first + k:
            mine = group
    return ParallelState(k, mine, rank % k, rank // k, world // k)
