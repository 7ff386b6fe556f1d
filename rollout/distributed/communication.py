"""The model's collectives over its tensor-parallel group; no-ops for a group of one."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _group_size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def tensor_model_parallel_all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum ``x`` over ``group`` in place and return it (every rank gets the same tensor)."""
    if _group_size(group) == 1:
        return x
    dist.all_reduce(x, group=group)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, group: Any, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``, in group-rank order."""
    size = _group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def min_over_group(value: int, group: Any, device: torch.device) -> int:
    """The smallest ``value`` of any rank in ``group`` (say, KV blocks sized per rank, which
    every rank of a TP group must agree on to schedule alike)."""
    if _group_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t.item())
