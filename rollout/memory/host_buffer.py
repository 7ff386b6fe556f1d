"""HostBuffer: the host copy of an arena, allocated in chunks, in the caller's thread or ahead
of time in a background thread.

Pinning host memory is slow: ``cudaHostAlloc`` faults in and locks every page, ~0.35 s per
GiB on an H100 host, while the pinned copy it serves runs at ~55 GB/s. One allocation at the
first ``sleep(level=1)`` made that sleep 20-25x slower than the later ones (issue #19: 1.44 s
for Qwen2.5-1.5B, 6.0 s for Qwen3-8B, against 0.06 and 0.31 s).
So the copy is a list of chunks, allocated in order, and a copy goes chunk by chunk:

- ahead of time (``start_background()``): one daemon thread allocates every chunk; a sleep
  that comes before it is done copies the chunks that exist and waits only for the next one
  it needs, so its copies overlap the allocation of the rest;
- on demand (no thread): the caller allocates chunk i+1 while the copy of chunk i runs (a
  pinned copy is asynchronous), so the first sleep costs about the allocation, not the sum.

Every chunk's size is a power of two, at most ``MAX_CHUNK_BYTES``: torch's pinned allocator
rounds each allocation up to a power of two, which made the one allocation of Qwen2.5-1.5B's
3.1 GB take (and pin) 4 GiB. The chunks cover ``nbytes`` exactly.

Lock discipline: ``_cond`` guards every field below it in ``__init__``; allocations run
outside the lock, one at a time (``_allocating``), always of chunk ``_num_allocated``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from rollout.errors import HostMemoryError

MAX_CHUNK_BYTES = 256 << 20
# At least this many chunks when the buffer is large enough, so that a small buffer too has a
# next chunk to allocate while the previous one is copied (and tests see several chunks).
MIN_CHUNKS = 8

# nbytes -> a flat, contiguous uint8 CPU tensor of nbytes (pinned on a GPU platform).
HostAllocator = Callable[[int], torch.Tensor]


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def chunk_spans(nbytes: int, max_chunk_bytes: int = MAX_CHUNK_BYTES, min_chunks: int = MIN_CHUNKS) -> list[tuple[int, int]]:
    """``(offset, size)`` of each chunk of a buffer of ``nbytes``, in order, covering it
    exactly: chunks of one power-of-two size (at most ``max_chunk_bytes``, at most about
    ``nbytes / min_chunks``), then the rest as its binary digits, largest first."""
    if nbytes < 1 or max_chunk_bytes < 1 or max_chunk_bytes & (max_chunk_bytes - 1):
        raise ValueError(f"chunk_spans({nbytes}, {max_chunk_bytes}): nbytes >= 1 and a power-of-two chunk size")
    chunk = min(max_chunk_bytes, _pow2_floor(max(1, nbytes // min_chunks)))
    spans = [(i * chunk, chunk) for i in range(nbytes // chunk)]
    offset = len(spans) * chunk
    rest = nbytes - offset
    while rest:
        size = _pow2_floor(rest)
        spans.append((offset, size))
        offset += size
        rest -= size
    return spans


class HostBuffer:
    """The host copy of ``nbytes`` of device memory, as chunks ``spans[i] = (offset, size)``.

    Contract:
    - ``start_background()`` (optional, once) allocates every chunk, in order, in a daemon
      thread that holds nothing but this buffer.
    - ``chunk(i)`` returns chunk i, a flat uint8 host tensor of ``spans[i][1]`` bytes. While
      the thread runs it waits only until chunk i exists; otherwise the caller allocates the
      missing chunks up to i itself. If the allocation of a chunk <= i failed it raises
      ``HostMemoryError`` (a failure in the thread is raised once, by the first call that
      needs that chunk; the next call tries again in its caller's thread). The chunks that
      exist are kept.
    - ``close(wait)`` stops the thread after the chunk it is allocating (``wait``: and waits
      for that), then drops every chunk. Idempotent; the buffer is not used after it.
    """

    def __init__(self, nbytes: int, allocate: HostAllocator, max_chunk_bytes: int = MAX_CHUNK_BYTES) -> None:
        self.nbytes = nbytes
        self.spans = chunk_spans(nbytes, max_chunk_bytes)
        self._allocate = allocate
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._chunks: list[torch.Tensor | None] = [None] * len(self.spans)
        self._num_allocated = 0  # chunks [0, _num_allocated) exist
        self._allocating = False  # chunk _num_allocated is being allocated (thread or caller)
        self._background = False  # the thread is running
        self._error: HostMemoryError | None = None  # the thread's failure, until raised
        self._closed = False

    # ---- state ----------------------------------------------------------------------------
    @property
    def allocated_bytes(self) -> int:
        with self._cond:
            n = self._num_allocated
        return self.spans[n - 1][0] + self.spans[n - 1][1] if n else 0

    @property
    def is_complete(self) -> bool:
        with self._cond:
            return self._num_allocated == len(self.spans)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the background thread (if any) has stopped; True when every chunk
        exists, False on a failure, after ``close`` or when ``timeout`` s passed first."""
        with self._cond:
            self._cond.wait_for(lambda: not self._background, timeout)
            return self._num_allocated == len(self.spans) and not self._closed

    # ---- allocation -----------------------------------------------------------------------
    def start_background(self) -> None:
        with self._cond:
            if self._thread is not None or self._closed:
                raise RuntimeError("HostBuffer.start_background: started already, or closed")
            self._background = True
            self._thread = threading.Thread(target=self._run, name=f"rollout-host-copy-{id(self):x}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed or self._num_allocated == len(self.spans):
                    self._background = False
                    self._cond.notify_all()
                    return
                i = self._num_allocated
                self._allocating = True
            try:
                chunk = self._allocate_chunk(i)
            except BaseException as e:  # noqa: BLE001 - handed to the caller that needs chunk i
                with self._cond:
                    self._allocating = self._background = False
                    self._error = e if isinstance(e, HostMemoryError) else self._failure(i, e)
                    self._cond.notify_all()
                return
            self._store(i, chunk)

    def _allocate_chunk(self, i: int) -> torch.Tensor:
        size = self.spans[i][1]
        try:
            t = self._allocate(size)
            ok = (isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype == torch.uint8
                  and t.dim() == 1 and t.numel() == size and t.is_contiguous())
            if not ok:
                got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"the host allocator returned {got}, not a flat contiguous uint8 CPU tensor of {size} bytes")
        except Exception as e:
            raise self._failure(i, e) from e
        return t

    def _failure(self, i: int, e: BaseException) -> HostMemoryError:
        offset, size = self.spans[i]
        err = HostMemoryError(
            f"could not allocate the host copy's chunk {i} of {len(self.spans)} ({size} bytes at offset {offset} "
            f"of {self.nbytes}): {type(e).__name__}: {e}"
        )
        err.__cause__ = e
        return err

    def _store(self, i: int, chunk: torch.Tensor) -> None:
        with self._cond:
            self._allocating = False
            if not self._closed:  # after close the chunk is dropped here
                self._chunks[i] = chunk
                self._num_allocated = i + 1
            self._cond.notify_all()

    def chunk(self, i: int) -> torch.Tensor:
        while True:
            with self._cond:
                if self._closed:
                    raise RuntimeError("HostBuffer.chunk after close")
                if i < self._num_allocated:
                    return self._chunks[i]  # type: ignore[return-value]
                if self._error is not None:
                    err, self._error = self._error, None
                    raise err
                if self._background or self._allocating:
                    self._cond.wait()
                    continue
                j = self._num_allocated
                self._allocating = True
            try:
                chunk = self._allocate_chunk(j)
            except BaseException:
                with self._cond:
                    self._allocating = False
                    self._cond.notify_all()
                raise
            self._store(j, chunk)

    def close(self, wait: bool = True) -> None:
        with self._cond:
            self._closed = True
            self._chunks = [None] * len(self.spans)
            self._num_allocated = 0
            self._error = None
            self._cond.notify_all()
            thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    # ---- copies ---------------------------------------------------------------------------
    def copy_from(self, src: torch.Tensor, non_blocking: bool) -> None:
        """Copy the flat uint8 ``src`` of ``nbytes`` into the chunks, queueing chunk i's copy
        before waiting for (or allocating) chunk i+1. On ``HostMemoryError`` ``src`` is
        untouched; chunks before the failed one may hold its bytes (copies may be in flight)."""
        for i, (offset, size) in enumerate(self.spans):
            self.chunk(i).copy_(src[offset : offset + size], non_blocking=non_blocking)

    def copy_to(self, dst: torch.Tensor, non_blocking: bool) -> None:
        """Copy every chunk into the flat uint8 ``dst`` of ``nbytes`` (all chunks must exist)."""
        with self._cond:
            if self._num_allocated != len(self.spans):
                raise RuntimeError(f"HostBuffer.copy_to: {self._num_allocated} of {len(self.spans)} chunks exist")
            chunks = list(self._chunks)
        for (offset, size), chunk in zip(self.spans, chunks):
            dst[offset : offset + size].copy_(chunk, non_blocking=non_blocking)
