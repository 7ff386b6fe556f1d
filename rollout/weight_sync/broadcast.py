"""Weights from one trainer rank to engine ranks by ``torch.distributed.broadcast``.

The caller creates the process group (NCCL for GPUs, gloo for CPU) and calls
``send_weights`` on the ``src`` rank while every other rank of the group calls
``recv_weights`` (or ``recv_all``). ``src`` is a global rank, as in ``dist.broadcast``.

Wire protocol, per bucket, all broadcast from ``src``:
  1. header   ``[2]`` int64: (JSON length, buffer length) in bytes
  2. metadata ``[JSON length]`` uint8: ``metas_to_json`` as UTF-8 (validated on receipt)
  3. buffer   ``[buffer length]`` uint8: the packed bucket
and finally an end marker: a header of (0, 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from rollout.errors import WeightUpdateError
from rollout.weight_sync.bucket import (
    DEFAULT_BUCKET_BYTES,
    Bucket,
    metas_from_json,
    metas_to_json,
    pack,
    unpack,
)


def send_weights(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    src: int,
    group: dist.ProcessGroup | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    device: torch.device | str | None = None,
) -> int:
    """Broadcast every tensor from this rank (which must be ``src``); return how many were sent.

    ``device`` holds the staging buffers and must suit the group's backend (a CUDA device for
    NCCL, cpu for gloo); by default each bucket stays on its first tensor's device and the end
    marker goes on the last bucket's device (cpu when nothing was sent).
    """
    if dist.get_rank() != src:
        raise WeightUpdateError(f"send_weights must run on src={src}, not rank {dist.get_rank()}")
    num_tensors = 0
    last_device = torch.device(device or "cpu")
    for bucket in pack(named_tensors, bucket_bytes, device):
        last_device = bucket.buffer.device
        payload = metas_to_json(bucket.metas).encode()
        _send_header(len(payload), bucket.buffer.numel(), src, group, last_device)
        meta_bytes = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        dist.broadcast(meta_bytes.to(last_device), src, group=group)
        dist.broadcast(bucket.buffer, src, group=group)
        num_tensors += len(bucket.metas)
    _send_header(0, 0, src, group, last_device)
    return num_tensors


def _send_header(json_nbytes: int, buffer_nbytes: int, src, group, device) -> None:
    header = torch.tensor([json_nbytes, buffer_nbytes], dtype=torch.int64, device=device)
    dist.broadcast(header, src, group=group)


def recv_weights(
    *,
    src: int,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, view)`` for every tensor ``src`` sends, bucket by bucket.

    Every bucket is received into its own buffer, so a view stays valid for as long as it is
    referenced: ``update_weights(recv_weights(...))`` may hold the whole stream to check every
    name and shape before its first copy (then the received weights are all resident at
    once); ``trainers_integration.update_weights_in_buckets`` holds one chunk at a time.
    (Reusing one buffer would save allocations but silently corrupt any view kept past its
    bucket.) Every rank must consume the stream to the end marker to stay in step with the
    group. Closing the generator after it started (use
    ``contextlib.closing`` when the loop body may raise), or a malformed bucket, receives and
    drops the rest of the stream first; a malformed bucket then raises ``WeightUpdateError``.
    """
    while True:
        json_nbytes, buffer_nbytes = _recv_header(src, group, device)
        if json_nbytes == 0:
            return
        meta_bytes = torch.empty(json_nbytes, dtype=torch.uint8, device=device)
        dist.broadcast(meta_bytes, src, group=group)
        view = torch.empty(buffer_nbytes, dtype=torch.uint8, device=device)
        dist.broadcast(view, src, group=group)
        # Here a whole bucket has been received: stopping now leaves the stream at a bucket
        # boundary, so draining keeps the group in step.
        try:
            metas = metas_from_json(bytes(meta_bytes.cpu().tolist()), buffer_nbytes)
            yield from unpack(Bucket(metas, view))
        except (WeightUpdateError, GeneratorExit):
            _drain(src, group, device)
            raise


def _recv_header(src: int, group, device) -> tuple[int, int]:
    """(JSON bytes, buffer bytes) of the next bucket; (0, 0) is the end marker."""
    header = torch.empty(2, dtype=torch.int64, device=device)
    dist.broadcast(header, src, group=group)
    json_nbytes, buffer_nbytes = header.tolist()
    return json_nbytes, buffer_nbytes


def _drain(src: int, group, device) -> None:
    """Receive and drop buckets up to the end marker, so the group stays in step."""
    while True:
        json_nbytes, buffer_nbytes = _recv_header(src, group, device)
        if json_nbytes == 0:
            return
        for n in (json_nbytes, buffer_nbytes):
            dist.broadcast(torch.empty(n, dtype=torch.uint8, device=device), src, group=group)


def recv_all(
    *,
    src: int,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str,
) -> list[tuple[str, torch.Tensor]]:
    """Receive everything ``src`` sends as a list (views into the buckets' own buffers, none
    overlapping another)."""
    return list(recv_weights(src=src, group=group, device=device))
