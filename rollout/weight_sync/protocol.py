"""The wire protocol of ``broadcast``: headers, votes, and collectives that fail, never hang.

Every rank of the group takes part in every step, in this order, per bucket:

  1. header    ``[4]`` int64 broadcast from src: (MAGIC, BUCKET, JSON bytes, buffer bytes)
  2. vote      ``[2]`` int64 all-reduce MAX: does every receiver accept the header (and could
               it allocate the metadata)?
  3. metadata  ``[JSON bytes]`` uint8 from src: ``metas_to_json`` as UTF-8
  4. vote      does every receiver accept the metadata (``schema.metas_from_json`` against the
               header's buffer length) and could it allocate the buffer?
  5. buffer    ``[buffer bytes]`` uint8 from src: the packed bucket

then a header (MAGIC, END, 0, 0) and a last vote, the commit: the sender returns only when
every receiver took every bucket to the end of the stream. A sender that fails (its tensors
could not be packed, its iterator raised) sends (MAGIC, ABORT, 0, 0) in place of its next
header; no vote follows an ABORT. Every other header is followed by a vote, so a receiver
whose consumer stopped early still answers the next header with a refusal.

A vote is ``(1 + rank, reason)`` from a rank that refuses and ``(0, 0)`` from one that accepts;
the all-reduce MAX makes any refusal visible to all. After a refused vote, or an ABORT, every
rank raises ``WeightSyncError`` and the group is at a transfer boundary: the same ranks can
run the next transfer. A collective that fails (a peer died, or did not answer within the
process group's timeout) raises ``PeerFailureError``; the group is then unusable (destroy it).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from rollout.errors import PeerFailureError, WeightSyncError
from rollout.weight_sync.schema import MAX_JSON_BYTES

MAGIC = 0x524F4C4C0001  # "ROLL", protocol version 1: a peer speaking another version is refused
BUCKET, END, ABORT = 1, 2, 3
# Default cap on one bucket's buffer at a receiver. A tensor bigger than the sender's
# bucket_bytes travels alone, so this bounds the largest tensor; raise it for bigger ones.
DEFAULT_MAX_BUCKET_BYTES = 16 << 30

# Why a receiver refused (the vote's second element).
REFUSED_HEADER, REFUSED_METADATA, NO_MEMORY, STOPPED = 1, 2, 3, 4
REASONS = {
    REFUSED_HEADER: "refused the header",
    REFUSED_METADATA: "refused the metadata",
    NO_MEMORY: "could not allocate the bucket",
    STOPPED: "stopped reading the stream before its end",
}


@dataclass(frozen=True)
class Header:
    magic: int
    kind: int
    json_nbytes: int
    buffer_nbytes: int

    @property
    def is_abort(self) -> bool:
        return self.magic == MAGIC and self.kind == ABORT

    def problem(self, max_bucket_bytes: int) -> str | None:
        """Why a receiver refuses this header, or None."""
        if self.magic != MAGIC:
            return f"header magic {self.magic:#x} is not {MAGIC:#x} (another protocol or version, or out of step)"
        if self.kind == BUCKET:
            if not 2 <= self.json_nbytes <= MAX_JSON_BYTES:
                return f"metadata length {self.json_nbytes} outside [2, {MAX_JSON_BYTES}]"
            if not 0 <= self.buffer_nbytes <= max_bucket_bytes:
                return f"buffer length {self.buffer_nbytes} outside [0, max_bucket_bytes={max_bucket_bytes}]"
            return None
        if self.kind in (END, ABORT):
            if (self.json_nbytes, self.buffer_nbytes) != (0, 0):
                return f"an END/ABORT header with lengths ({self.json_nbytes}, {self.buffer_nbytes})"
            return None
        return f"unknown header kind {self.kind}"


@dataclass(frozen=True)
class Link:
    """One transfer's view of the group: who sends, over which group, which rank this is, and
    how long any collective may take (the group's own timeout)."""

    src: int
    group: dist.ProcessGroup | None
    rank: int
    timeout: timedelta | None

    @classmethod
    def open(cls, src: int, group: dist.ProcessGroup | None, device: torch.device) -> Link:
        return cls(src, group, dist.get_rank(), group_timeout(group, device))

    def broadcast(self, tensor: torch.Tensor, what: str) -> None:
        self._wait(lambda: dist.broadcast(tensor, self.src, group=self.group, async_op=True), what)

    def send_header(self, kind: int, json_nbytes: int, buffer_nbytes: int, device: torch.device) -> None:
        header = torch.tensor([MAGIC, kind, json_nbytes, buffer_nbytes], dtype=torch.int64, device=device)
        self.broadcast(header, "a header")

    def recv_header(self, device: torch.device) -> Header:
        header = torch.empty(4, dtype=torch.int64, device=device)
        self.broadcast(header, "a header")
        return Header(*header.tolist())

    def vote(self, reason: int, device: torch.device) -> tuple[int, int] | None:
        """This rank's vote (``reason`` 0 accepts); returns None when every rank accepted, else
        (a refusing rank, the largest reason)."""
        ballot = torch.tensor([self.rank + 1 if reason else 0, reason], dtype=torch.int64, device=device)
        self._wait(lambda: dist.all_reduce(ballot, op=dist.ReduceOp.MAX, group=self.group, async_op=True), "a vote")
        rank_plus_one, worst = ballot.tolist()
        return None if rank_plus_one == 0 else (rank_plus_one - 1, worst)

    def vote_or_raise(self, problem: str | None, reason: int, device: torch.device, where: str) -> None:
        """Vote (refusing with ``reason`` when ``problem``); raise ``WeightSyncError`` on every
        rank when any rank refused: this rank's own problem, or which rank refused."""
        refused = self.vote(reason if problem else 0, device)
        if problem:
            raise WeightSyncError(f"{where}: {problem}; the transfer is aborted on every rank")
        if refused is not None:
            rank, worst = refused
            raise WeightSyncError(
                f"{where}: rank {rank} {REASONS.get(worst, f'refused (reason {worst})')}; "
                "the transfer is aborted on every rank"
            )

    def _wait(self, start, what: str) -> None:
        # Work.wait(timeout) blocks until done or raises: with NCCL too, where a plain wait
        # only orders streams and a dead peer would leave the next host read blocked.
        try:
            work = start()
            if self.timeout is None:
                work.wait()
            else:
                work.wait(self.timeout)
        except RuntimeError as e:  # gloo/NCCL: peer closed the connection, or timed out
            raise PeerFailureError(
                f"weight transfer from rank {self.src}: {what} failed on rank {self.rank} "
                f"(a peer died or did not answer within {self.timeout or 'the group timeout'}): {str(e)[:300]}"
            ) from e


def group_timeout(group: dist.ProcessGroup | None, device: torch.device) -> timedelta | None:
    """The timeout the group was created with, or None where torch does not expose it (then
    the backend's own timeout still applies to every collective)."""
    pg = group if group is not None else dist.group.WORLD
    for device_type in dict.fromkeys((torch.device(device).type, "cuda", "cpu")):
        try:
            return pg._get_backend(torch.device(device_type)).options._timeout
        except Exception:  # noqa: BLE001 - a private API, or no backend for this device type
            continue
    return None
