"""The engine's collectives, and what their failure means.

Every collective rollout runs goes through ``all_reduce`` or ``all_gather`` here (the
model's TP layers, KV sizing, the agreement check, data-parallel gathers), so a failed one
becomes ``PeerFailureError`` in this one place. A collective fails when a peer died (gloo:
"Connection reset by peer", at once) or did not answer within the group's timeout (gloo:
"Timed out waiting ...", after the timeout; see parallel_state.py for where it comes
from). torch raises a plain ``RuntimeError`` (``DistBackendError`` on NCCL) for both; only
the ``dist`` call sits in the ``try``, so errors of our own tensor work are not relabelled.
The group is unusable afterwards: every later collective over it fails the same way.

Under NCCL a timed-out collective is normally ended by NCCL's watchdog, which aborts the
process; and collectives captured in CUDA graphs never pass through Python. Both are
outside what this module can turn into an exception.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from rollout.distributed.parallel_state import group_timeout
from rollout.errors import PeerFailureError


def _group_size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def peer_failure(collective: str, group: Any, err: BaseException) -> PeerFailureError:
    """The error for ``collective`` over ``group`` (None: the world) failing with ``err``:
    names the collective, the group (its global ranks and description), this rank and the
    group's timeout."""
    pg = group if group is not None else dist.group.WORLD
    try:
        ranks = dist.get_process_group_ranks(pg)
        desc = pg.group_desc
    except Exception:  # the error must still be raised if the bookkeeping is gone too
        ranks, desc = "?", "?"
    timeout = group_timeout(group)
    within = f"{timeout.total_seconds():g}s" if timeout is not None else "its timeout"
    return PeerFailureError(
        f"{collective} over process group {desc!r} (global ranks {ranks}) failed on rank "
        f"{dist.get_rank()}: a peer died or did not answer within {within}; the group is unusable "
        f"({type(err).__name__}: {err})"
    )


def all_reduce(x: torch.Tensor, group: Any, op: Any = None) -> None:
    """``dist.all_reduce`` in place over ``group`` (None: the world) with ``op`` (None:
    sum); ``PeerFailureError`` when it fails."""
    try:
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op is None else op, group=group)
    except RuntimeError as e:  # DistBackendError is one
        raise peer_failure("all_reduce", group, e) from e


def all_gather(parts: list[torch.Tensor], x: torch.Tensor, group: Any) -> None:
    """``dist.all_gather`` of ``x`` into ``parts`` over ``group`` (None: the world);
    ``PeerFailureError`` when it fails."""
    try:
        dist.all_gather(parts, x, group=group)
    except RuntimeError as e:
        raise peer_failure("all_gather", group, e) from e


def tensor_model_parallel_all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum ``x`` over ``group`` in place and return it (every rank gets the same tensor)."""
    if _group_size(group) == 1:
        return x
    all_reduce(x, group)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, group: Any, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``, in group-rank order."""
    size = _group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    all_gather(parts, x, group)
    return torch.cat(parts, dim=dim)


def min_over_group(value: int, group: Any, device: torch.device) -> int:
    """The smallest ``value`` of any rank in ``group`` (say, KV blocks sized per rank, which
    every rank of a TP group must agree on to schedule alike)."""
    if _group_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    all_reduce(t, group, op=dist.ReduceOp.MIN)
    return int(t.item())
