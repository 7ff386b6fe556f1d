"""MemoryManager: the engine's two arenas (weights, KV cache) and sleep / wake by tag.

- ``sleep(1)``: weights copied to a host buffer (pinned on GPU), both arenas released. The
  buffer (``HostBuffer``: chunks) is allocated by the first sleep(1), its copies overlapping
  the allocation, or, with ``prepare_host_copy``, in a background thread from start-up (the
  host memory is then taken whether or not the engine ever sleeps). A sleep that cannot get
  it raises ``HostMemoryError`` before anything is released. The buffer is kept for later
  sleeps; ``sleep(2)`` and ``close`` drop it.
- ``sleep(2)``: both released, nothing kept; weights come back by update or reload.
- ``wake_up(tags)``: re-back the named arenas (same addresses on CUDA) and restore weights
  after a level-1 sleep. A wake that runs out of memory re-releases whatever it mapped
  (``wake_up()`` with room for the weights but not the KV cache leaves both asleep, the
  host copy intact) and raises ``WakeOOMError``; a later wake may succeed.
  The KV cache comes back undefined, not zeroed: every attention backend reads only the
  slots below each sequence's length (``test_attention_ignores_unwritten_kv_slots``).

Host<->device weight copies run asynchronously (pinned memory) while the other arena is
unmapped or mapped: on a GPU those are host-side driver calls that take tens of ms for a
large KV cache, and the copy engine needs no help meanwhile.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn

from rollout.errors import HostMemoryError, InvalidRequestError, WakeOOMError
from rollout.memory.arena import Arena, align_up
from rollout.memory.host_buffer import HostAllocator, HostBuffer

TAGS = ("weights", "kv_cache")

ArenaFactory = Callable[[int], Arena]


def move_params_into_arena(model: nn.Module, make_arena: ArenaFactory) -> Arena:
    """Give every parameter a home in one arena (a one-time rebinding at start-up; later
    updates copy in place). Tied parameters are one parameter, placed once."""
    params = list({id(p): p for p in model.parameters()}.values())
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total = align_up(total + p.numel() * p.element_size())
    arena = make_arena(max(total, 1))
    with torch.no_grad():
        for p, off in zip(params, offsets):
            view = arena.view(off, tuple(p.shape), p.dtype)
            view.copy_(p.data)
            p.data = view
    return arena


def _phase(phases: dict[str, float], name: str, t0: float) -> float:
    now = time.perf_counter()
    phases[name] = (now - t0) * 1e3
    return now


def plain_host_allocator(pin: bool) -> HostAllocator:
    """torch's host allocation (pinned: torch's caching pinned allocator, cudaHostAlloc)."""
    return lambda nbytes: torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


class MemoryManager:
    """The arenas by tag and the level-1 host copy of the weights.

    ``allocate_host`` allocates the host copy's chunks (default: ``plain_host_allocator``);
    ``pin_host`` says they are pinned (copies are then asynchronous). ``prepare_host_copy``
    starts allocating the whole copy (the weight arena's bytes) now, in a background thread,
    so that the first ``sleep(1)`` costs what later ones do. Create the manager after the
    engine's CUDA graph capture: a pinned allocation from another thread during a capture
    (torch's default, global capture mode) may invalidate it.
    """

    def __init__(
        self, weights: Arena, kv_cache: Arena, pin_host: bool, *, allocate_host: HostAllocator | None = None,
        prepare_host_copy: bool = False,
    ) -> None:
        self.arenas = {"weights": weights, "kv_cache": kv_cache}
        self.pin_host = pin_host
        self._allocate_host = allocate_host or plain_host_allocator(pin_host)
        self._host: HostBuffer | None = None  # level-1 copy of the weight arena
        self._host_valid = False  # _host holds the weights of the last sleep(1)
        # Where the last wake_up that woke something spent its time, on the host clock:
        # map_weights_ms / map_kv_cache_ms (restore: on CUDA, cuMemCreate + map), queue_copy_ms,
        # wait_copy_ms (what was left of the weights' copy after the maps). A diagnostic.
        self.last_wake_ms: dict[str, float] = {}
        if prepare_host_copy:
            self._host = HostBuffer(weights.nbytes, self._allocate_host)
            self._host.start_background()
            # An engine dropped without shutdown (or left at exit): the thread holds only the
            # buffer, so it would go on pinning the whole copy for nobody; it stops after the
            # chunk in progress instead. close() is idempotent.
            weakref.finalize(self, self._host.close, False)

    @property
    def is_sleeping(self) -> bool:
        return any(not a.is_mapped for a in self.arenas.values())

    def asleep_tags(self) -> list[str]:
        return [t for t, a in self.arenas.items() if not a.is_mapped]

    @staticmethod
    def check_level(level: int) -> None:
        if level not in (1, 2) or not isinstance(level, int) or isinstance(level, bool):
            raise InvalidRequestError("level", level, "1 (keep weights on the host) or 2 (discard weights)")

    def sleep(self, level: int, agree: Callable[[bool], bool] | None = None) -> None:
        """``agree(ok) -> all ok``: under tensor parallelism, whether every rank of the group
        holds its host copy (a collective every rank reaches, failed or not); a rank whose
        own copy succeeded releases nothing when another's failed, so the group stays in one
        state (all awake) instead of hanging at its next collective."""
        self.check_level(level)
        weights = self.arenas["weights"]
        # Copy whatever the arena holds: weights written since a sleep(2) must survive, and
        # the ones not written yet stay undefined (the WeightUpdater tracks which those are).
        if level == 1 and weights.is_mapped:
            if self._host is None:
                self._host = HostBuffer(weights.nbytes, self._allocate_host)
            kv = self.arenas["kv_cache"]
            kv.synchronize()  # work queued before the copy may still read the KV cache
            self._host_valid = False
            # Chunk by chunk, each copy queued before the next chunk is waited for or
            # allocated. HostMemoryError: nothing is released, the weights are untouched.
            failed: HostMemoryError | None = None
            try:
                self._host.copy_from(weights.tensor, non_blocking=self.pin_host)
            except HostMemoryError as e:
                failed = e
            if agree is not None and not agree(failed is None) and failed is None:
                failed = HostMemoryError(
                    "another rank of the tensor-parallel group could not allocate its host copy of the "
                    "weights: no rank released anything (the engine is awake, as it was)"
                )
            if failed is not None:
                raise failed
            kv.release(synchronized=True)  # only the copy is in flight: it reads weights
            self._host_valid = True
        elif level == 2:
            self._drop_host(wait=False)  # a background allocation stops after its chunk
        for arena in self.arenas.values():
            arena.release()  # waits for the copy before the weights go

    def wake_up(self, tags: Iterable[str] | None = None) -> list[str]:
        """Re-back the arenas named by ``tags`` (all when None); returns the tags woken."""
        asked = list(TAGS) if tags is None else list(tags)
        unknown = [t for t in asked if t not in TAGS]
        if unknown or not asked:
            raise InvalidRequestError("tags", tags, f"None or a non-empty list of {list(TAGS)}")
        woken: list[str] = []
        tag = ""
        phases: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            for tag in (t for t in TAGS if t in asked):  # weights first: their copy overlaps the KV map
                arena = self.arenas[tag]
                if not arena.is_mapped:
                    arena.restore()
                    woken.append(tag)
                    t0 = _phase(phases, f"map_{tag}_ms", t0)
                    if tag == "weights" and self._host_valid:
                        self._host.copy_to(arena.tensor, non_blocking=self.pin_host)  # type: ignore[union-attr]
                        t0 = _phase(phases, "queue_copy_ms", t0)
        except BaseException as e:
            # All or nothing, per call: what this call mapped goes back (release waits for a
            # copy in flight); tags woken by earlier calls stay awake. The level-1 host copy
            # is kept, so a later wake restores the weights all the same.
            for t in woken:
                self.arenas[t].release()
            if isinstance(e, WakeOOMError):
                undone = f"; {woken} put back to sleep" if woken else ""
                raise WakeOOMError(
                    f"wake_up({asked}): no room for {tag!r}{undone}; still asleep: {self.asleep_tags()} ({e})"
                ) from e
            raise
        if "weights" in woken and self._host_valid:
            self.arenas["weights"].synchronize()  # the copy is done when wake_up returns
            _phase(phases, "wait_copy_ms", t0)
        if woken:
            self.last_wake_ms = phases
        return woken

    def wait_host_copy(self, timeout: float | None = None) -> bool:
        """Wait for a background allocation of the host copy to end: True when the whole
        copy is allocated, False when there is none, it failed (the next sleep(1) raises
        ``HostMemoryError`` or retries) or ``timeout`` s passed first."""
        return self._host.wait(timeout) if self._host is not None else False

    def _drop_host(self, wait: bool) -> None:
        host, self._host, self._host_valid = self._host, None, False
        if host is not None:
            host.close(wait=wait)

    def close(self) -> None:
        """Release every arena for good and drop the host copy, after a background
        allocation's current chunk (engine shutdown)."""
        self._drop_host(wait=True)
        for arena in self.arenas.values():
            arena.close()

    def memory_usage(self) -> dict[str, dict[str, int]]:
        host = self._host.allocated_bytes if self._host is not None else 0
        return {
            "weights": {"device": self.arenas["weights"].nbytes if self.arenas["weights"].is_mapped else 0, "host": host},
            "kv_cache": {"device": self.arenas["kv_cache"].nbytes if self.arenas["kv_cache"].is_mapped else 0, "host": 0},
        }
