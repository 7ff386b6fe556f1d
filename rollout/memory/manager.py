"""MemoryManager: the engine's two arenas (weights, KV cache) and sleep / wake by tag.

- ``sleep(1)``: weights copied to a host buffer (pinned on GPU), both arenas released.
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

from collections.abc import Callable, Iterable

import torch
from torch import nn

from rollout.errors import InvalidRequestError, WakeOOMError
from rollout.memory.arena import Arena, align_up

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


class MemoryManager:
    def __init__(self, weights: Arena, kv_cache: Arena, pin_host: bool) -> None:
        self.arenas = {"weights": weights, "kv_cache": kv_cache}
        self.pin_host = pin_host
        self._host_weights: torch.Tensor | None = None  # level-1 copy of the weight arena
        self._host_valid = False

    @property
    def is_sleeping(self) -> bool:
        return any(not a.is_mapped for a in self.arenas.values())

    def asleep_tags(self) -> list[str]:
        return [t for t, a in self.arenas.items() if not a.is_mapped]

    @staticmethod
    def check_level(level: int) -> None:
        if level not in (1, 2) or not isinstance(level, int) or isinstance(level, bool):
            raise InvalidRequestError("level", level, "1 (keep weights on the host) or 2 (discard weights)")

    def sleep(self, level: int) -> None:
        self.check_level(level)
        weights = self.arenas["weights"]
        # Copy whatever the arena holds: weights written since a sleep(2) must survive, and
        # the ones not written yet stay undefined (the WeightUpdater tracks which those are).
        if level == 1 and weights.is_mapped:
            if self._host_weights is None:
                self._host_weights = torch.empty(weights.nbytes, dtype=torch.uint8, pin_memory=self.pin_host)
            kv = self.arenas["kv_cache"]
            kv.synchronize()  # work queued before the copy may still read the KV cache
            self._host_weights.copy_(weights.tensor, non_blocking=self.pin_host)
            kv.release(synchronized=True)  # only the copy is in flight: it reads weights
            self._host_valid = True
        elif level == 2:
            self._host_weights, self._host_valid = None, False
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
        try:
            for tag in (t for t in TAGS if t in asked):  # weights first: their copy overlaps the KV map
                arena = self.arenas[tag]
                if not arena.is_mapped:
                    arena.restore()
                    woken.append(tag)
                    if tag == "weights" and self._host_valid:
                        arena.tensor.copy_(self._host_weights, non_blocking=self.pin_host)
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
        return woken

    def close(self) -> None:
        """Release every arena for good and drop the host copy (engine shutdown)."""
        self._host_weights, self._host_valid = None, False
        for arena in self.arenas.values():
            arena.close()

    def memory_usage(self) -> dict[str, dict[str, int]]:
        host = self._host_weights.numel() if self._host_weights is not None else 0
        return {
            "weights": {"device": self.arenas["weights"].nbytes if self.arenas["weights"].is_mapped else 0, "host": host},
            "kv_cache": {"device": self.arenas["kv_cache"].nbytes if self.arenas["kv_cache"].is_mapped else 0, "host": 0},
        }
