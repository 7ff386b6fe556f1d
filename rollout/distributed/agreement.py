"""Debug check that every rank of a TP group runs the same requests and samples alike.

Ranks of a group must be given the same prompts and then agree without messages; when a
caller breaks that, the group silently diverges (or hangs in a collective). With
``LLM(..., debug_tp_agreement=True)`` the engine calls ``check_prompt`` for every prompt
queued and ``check_step`` after every step; each all-gathers one fixed-size digest
``[kind, index, count, hash]`` (so ranks that have drifted to different calls still meet in
the same collective) and raises ``ParallelMismatchError`` on every rank of the group when
they differ. ``NoAgreementCheck`` is the null object used otherwise.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.distributed as dist

from rollout.distributed.communication import all_gather
from rollout.errors import ParallelMismatchError

_PROMPT, _STEP = 1, 2
_KIND_NAMES = {_PROMPT: "a prompt", _STEP: "a step"}


def _digest(values: Any) -> int:
    """A 56-bit hash of JSON-serialisable ``values`` (fits an int64)."""
    data = json.dumps(values, separators=(",", ":")).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=7).digest(), "little")


class NoAgreementCheck:
    """The null check: a group of one, or the debug option off."""

    def check_prompt(self, index: int, token_ids: list[int], n: int) -> None:
        pass

    def check_step(self, step: int, req_ids: list[str], sampled_token_ids: list[int]) -> None:
        pass


class TPAgreementCheck(NoAgreementCheck):
    """All-gathers a digest over ``group`` per prompt and per step (debug only: one
    collective and a Python pass over the step's tokens each time)."""

    def __init__(self, group: Any, device: torch.device) -> None:
        self.group = group
        self.device = device
        self.size = dist.get_world_size(group)

    def check_prompt(self, index: int, token_ids: list[int], n: int) -> None:
        """``index``: the how-many-th prompt this engine was given."""
        bad = self._gather(_PROMPT, index, len(token_ids), _digest([list(token_ids), n]))
        if bad is not None:
            raise ParallelMismatchError(
                f"ranks given different prompts: prompt #{index} differs between TP ranks {bad[0]} and "
                f"{bad[1]} (every rank of a tensor-parallel group must be given the same prompts, "
                f"in the same order; use split_for_dp for data-parallel shares)"
            )

    def check_step(self, step: int, req_ids: list[str], sampled_token_ids: list[int]) -> None:
        bad = self._gather(_STEP, step, len(sampled_token_ids), _digest([req_ids, sampled_token_ids]))
        if bad is not None:
            raise ParallelMismatchError(
                f"TP ranks {bad[0]} and {bad[1]} disagree on the tokens sampled at step {step} "
                f"(rank {bad[0]}: {bad[2]}, rank {bad[1]}: {bad[3]})"
            )

    def _gather(self, kind: int, index: int, count: int, digest: int) -> tuple | None:
        """None when every rank sent the same digest; else (first rank, a disagreeing rank,
        what each was doing)."""
        mine = torch.tensor([kind, index, count, digest], dtype=torch.int64, device=self.device)
        parts = [torch.empty_like(mine) for _ in range(self.size)]
        all_gather(parts, mine, self.group)
        rows = [p.tolist() for p in parts]
        for r, row in enumerate(rows[1:], start=1):
            if row != rows[0]:
                return 0, r, _describe(rows[0]), _describe(row)
        return None


def _describe(row: list[int]) -> str:
    kind, index, count, _ = row
    what = "tokens" if kind == _STEP else "prompt tokens"
    return f"{_KIND_NAMES.get(kind, '?')} #{index} with {count} {what}"
