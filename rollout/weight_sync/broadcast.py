"""Weights from one trainer rank to engine ranks by ``torch.distributed.broadcast``.

The caller creates the process group (NCCL for GPUs, gloo for CPU) and calls
``send_weights`` on the ``src`` rank while every other rank of the group calls
``recv_weights`` (or ``recv_all``). ``src`` is a global rank, as in ``dist.broadcast``.
The wire protocol (``protocol``) has a vote after each header and each bucket's metadata,
and a commit vote at the end, so whichever side finds a problem, both sides stop:

- a receiver refusing a bucket (bad header or metadata, no memory), or whose consumer stops
  reading early: every rank raises ``WeightSyncError``, nothing more of the transfer moves;
- a sender failing part-way (its iterator raised, a tensor could not be packed): it sends an
  abort header and both sides raise ``WeightSyncError``;
- a peer dying or hanging: the next collective fails within the group's timeout with
  ``PeerFailureError`` (then destroy the group).

After a ``WeightSyncError`` the same ranks can run the next transfer. ``send_weights``
returns only when every receiver took every bucket. On a receiver,
``llm.update_weights(recv_weights(...))`` lists the whole stream before its first copy, so
a transfer that fails at any point leaves the engine's weights unchanged, bit for bit.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from rollout.errors import WeightSyncError, WeightUpdateError
from rollout.weight_sync.bucket import DEFAULT_BUCKET_BYTES, Bucket, metas_to_json, pack, unpack
from rollout.weight_sync.protocol import (
    ABORT,
    BUCKET,
    DEFAULT_MAX_BUCKET_BYTES,
    END,
    NO_MEMORY,
    REFUSED_HEADER,
    REFUSED_METADATA,
    STOPPED,
    Link,
)
from rollout.weight_sync.schema import MAX_JSON_BYTES, metas_from_json


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
    NCCL, cpu for gloo); by default each bucket stays on its first tensor's device and the
    headers go on the last bucket's device (cpu before the first). Raises
    ``WeightSyncError`` when this side fails part-way (the cause chained) or a receiver
    refuses, ``PeerFailureError`` when a receiver dies or times out.
    """
    if dist.get_rank() != src:
        raise WeightUpdateError(f"send_weights must run on src={src}, not rank {dist.get_rank()}")
    last_device = torch.device(device or "cpu")
    link = Link.open(src, group, last_device)
    buckets = pack(named_tensors, bucket_bytes, device)
    num_tensors = 0
    for index in itertools.count():
        where = f"weight transfer from rank {src}, bucket {index}"
        try:
            bucket = next(buckets, None)
            payload = b"" if bucket is None else metas_to_json(bucket.metas).encode()
            if len(payload) > MAX_JSON_BYTES:
                raise WeightSyncError(f"{len(payload)} bytes of metadata, more than MAX_JSON_BYTES={MAX_JSON_BYTES}")
        except Exception as e:  # noqa: BLE001 - whatever stopped this side, the receivers must stop too
            link.send_header(ABORT, 0, 0, last_device)
            raise WeightSyncError(f"{where}: the sender failed ({type(e).__name__}: {e}); aborted on every rank") from e
        if bucket is None:
            link.send_header(END, 0, 0, last_device)
            link.vote_or_raise(None, 0, last_device, f"{where} (the end)")  # the commit
            return num_tensors
        last_device = bucket.buffer.device
        link.send_header(BUCKET, len(payload), bucket.buffer.numel(), last_device)
        link.vote_or_raise(None, 0, last_device, where)
        link.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(last_device), "metadata")
        link.vote_or_raise(None, 0, last_device, where)
        link.broadcast(bucket.buffer, "a bucket")
        num_tensors += len(bucket.metas)
    raise AssertionError("unreachable")  # itertools.count() does not end


def recv_weights(
    *,
    src: int,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str,
    max_bucket_bytes: int = DEFAULT_MAX_BUCKET_BYTES,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, view)`` for every tensor ``src`` sends, bucket by bucket.

    Every bucket is received into its own buffer, so a view stays valid for as long as it is
    referenced: ``update_weights(recv_weights(...))`` holds the whole stream to check every
    name and shape before its first copy (then the received weights are all resident at
    once); ``trainers_integration.update_weights_in_buckets`` holds one chunk at a time (and
    on a failure part-way marks what it did not reach stale). (Reusing one buffer would save
    allocations but silently corrupt any view kept past its bucket.)

    Every bucket is checked before its buffer is allocated: a header whose buffer exceeds
    ``max_bucket_bytes``, or metadata that ``schema.metas_from_json`` refuses, aborts the
    transfer on every rank with ``WeightSyncError``. Read the stream to its end: a consumer
    that stops early (closing the generator; use ``contextlib.closing`` when the loop body
    may raise) makes this rank refuse the next header, so the sender and the other receivers
    raise ``WeightSyncError`` too (``close`` itself does not raise it).
    """
    if not isinstance(max_bucket_bytes, int) or isinstance(max_bucket_bytes, bool) or max_bucket_bytes < 0:
        raise WeightUpdateError(f"max_bucket_bytes must be an int >= 0, got {max_bucket_bytes!r}")
    device = torch.device(device)
    link = Link.open(src, group, device)
    for index in itertools.count():
        where = f"weight transfer from rank {src}, bucket {index}"
        header = link.recv_header(device)
        if header.is_abort:
            raise WeightSyncError(f"{where}: the sender aborted the transfer")
        # Validate, then allocate: nothing is sized by a length that was not checked first.
        problem, reason, meta_bytes = header.problem(max_bucket_bytes), REFUSED_HEADER, None
        if problem is None and header.kind == BUCKET:
            meta_bytes, problem = _allocate(header.json_nbytes, device)
            reason = NO_MEMORY
        link.vote_or_raise(problem, reason, device, where)
        if header.kind == END:
            return
        link.broadcast(meta_bytes, "metadata")
        buffer = None
        try:
            metas = metas_from_json(meta_bytes.cpu().numpy().tobytes(), header.buffer_nbytes)
        except WeightSyncError as e:
            problem, reason = str(e), REFUSED_METADATA
        else:
            buffer, problem = _allocate(header.buffer_nbytes, device)
            reason = NO_MEMORY
        link.vote_or_raise(problem, reason, device, where)
        link.broadcast(buffer, "a bucket")
        try:
            yield from unpack(Bucket(metas, buffer))
        except BaseException:  # closed early, or an error thrown in: refuse what comes next
            _refuse_rest(link, device, where)
            raise
    raise AssertionError("unreachable")  # itertools.count() does not end


def _allocate(nbytes: int, device: torch.device) -> tuple[torch.Tensor | None, str | None]:
    try:
        return torch.empty(nbytes, dtype=torch.uint8, device=device), None
    except (RuntimeError, MemoryError) as e:  # an out-of-memory error is a RuntimeError
        return None, f"could not allocate {nbytes} bytes on {device}: {str(e)[:200]}"


def _refuse_rest(link: Link, device: torch.device, where: str) -> None:
    """This rank's consumer stopped after a bucket: answer the next header with a refusal, so
    every rank ends the transfer (an ABORT needs no answer)."""
    if link.recv_header(device).is_abort:
        return
    try:
        link.vote_or_raise("the consumer stopped reading the stream", STOPPED, device, where)
    except WeightSyncError:
        pass  # expected: the transfer is now aborted on every rank, as the consumer asked


def recv_all(
    *,
    src: int,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str,
    max_bucket_bytes: int = DEFAULT_MAX_BUCKET_BYTES,
) -> list[tuple[str, torch.Tensor]]:
    """Receive everything ``src`` sends as a list (views into the buckets' own buffers, none
    overlapping another)."""
    return list(recv_weights(src=src, group=group, device=device, max_bucket_bytes=max_bucket_bytes))
