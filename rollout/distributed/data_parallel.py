"""Data-parallel shares: each replica (TP group) takes its own contiguous slice of a batch,
and the results are put back together in batch order.

``parallel`` is an ``LLM``'s ``ParallelState`` (``llm.parallel``), or None for an engine
with ``tensor_parallel_size=1``: then every rank of an initialised world is its own replica
(and without a world there is one replica). Results travel as JSON bytes in a uint8
tensor, never pickle.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist

from rollout.distributed.communication import all_gather
from rollout.distributed.parallel_state import ParallelState


def dp_rank_and_size(parallel: ParallelState | None) -> tuple[int, int]:
    """This rank's replica index and the number of replicas."""
    if parallel is not None:
        return parallel.dp_rank, parallel.dp_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def dp_bounds(num_items: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """[start, end) of replica ``dp_rank``'s share: contiguous, the first ``num_items %
    dp_size`` replicas take one more."""
    base, extra = divmod(num_items, dp_size)
    start = dp_rank * base + min(dp_rank, extra)
    return start, start + base + (dp_rank < extra)


def split_for_dp(items: Any, parallel: ParallelState | None) -> list:
    """This replica's contiguous share of ``items`` (every rank passes the whole batch; the
    ranks of one TP group get the same share)."""
    items = list(items)
    start, end = dp_bounds(len(items), *dp_rank_and_size(parallel))
    return items[start:end]


def gather_from_dp(local_results: list, parallel: ParallelState | None, device: Any = "cpu") -> list:
    """Every replica's ``local_results`` (JSON-serialisable), concatenated in replica order:
    the results of ``split_for_dp`` shares come back in batch order, on every rank.
    Collective over the default (world) group: every rank calls it. ``device``: where the
    bytes travel (a CUDA device under NCCL)."""
    _, dp_size = dp_rank_and_size(parallel)
    if dp_size == 1:
        return list(local_results)
    tp = 1 if parallel is None else parallel.tensor_parallel_size
    world = dist.get_world_size()
    data = torch.frombuffer(bytearray(json.dumps(list(local_results)).encode()), dtype=torch.uint8).to(device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    all_gather(sizes, size, None)
    lengths = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    parts = [torch.empty_like(padded) for _ in range(world)]
    all_gather(parts, padded, None)
    out: list = []
    for r in range(0, world, tp):  # one rank per replica: TP rank 0 of each group
        out.extend(json.loads(bytes(parts[r][: lengths[r]].cpu().tolist()).decode()))
    return out
