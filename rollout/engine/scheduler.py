"""Scheduler: one token budget per step, ``{req_id: num_tokens}``, no prefill/decode split.

Every request is "catch ``num_computed_tokens`` up to ``num_tokens``". Running requests go
first (oldest first), then waiting ones; a prompt that does not fit the budget is chunked;
when blocks run out the youngest running request is preempted (blocks freed, recomputed
later). The same inputs always give the same schedule, which tensor parallelism relies on.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from rollout.engine.kv_cache import KVCacheManager
from rollout.engine.request import PromptLogprobsSpec, Request, RequestStatus
from rollout.errors import InvalidRequestError
from rollout.sampling_params import SamplingParams


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidRequestError(name, v, "an int >= 1")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise InvalidRequestError(
                "max_num_batched_tokens", self.max_num_batched_tokens,
                f"an int >= max_model_len={self.max_model_len} when chunked prefill is off",
            )


@dataclass
class NewRequestData:
    """A request the runner has no row for: first schedule, or resumed after preemption."""

    req_id: str
    token_ids: list[int]  # prompt + outputs so far
    num_prompt_tokens: int
    sampling_params: SamplingParams
    # Token ids whose sampling is banned until min_tokens outputs exist (EOS, stop ids).
    stop_token_ids: tuple[int, ...]
    generator: torch.Generator | None
    block_ids: list[int]
    num_computed_tokens: int
    # Which prompt positions need logprobs (prompt_logprobs or LLM.score); None: none.
    prompt_logprobs: PromptLogprobsSpec | None = None


@dataclass
class CachedRequestData:
    """A delta for a request the runner already holds."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    new_reqs: list[NewRequestData] = field(default_factory=list)
    cached_reqs: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)  # in execution order
    # Rows the runner must drop before this step: finished or preempted since the last one.
    removed_req_ids: set[str] = field(default_factory=set)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._removed: set[str] = set()
        # Blocks each running request held when last sent to the runner (for deltas).
        self._num_sent_blocks: dict[str, int] = {}
        self.num_preemptions = 0

    # ---- submission and removal -------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.requests[req.req_id] = req
        self.waiting.append(req)

    def finish_requests(self, req_ids: list[str], status: RequestStatus) -> list[Request]:
        """End requests from outside the step (stop strings, aborts). Unknown ids are skipped."""
        done = []
        for req_id in req_ids:
            req = self.requests.get(req_id)
            if req is None or req.is_finished:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            self._finish(req, status)
            done.append(req)
        return done

    def preempt_all(self) -> None:
        """Send every running request back to waiting, to be recomputed (KV cache lost)."""
        out = SchedulerOutput()
        while self.running:
            self._preempt(self.running.pop(), out)
        self._removed |= out.removed_req_ids

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(removed_req_ids=self._removed)
        self._removed = set()
        budget = self.config.max_num_batched_tokens
        preempted = False

        idx = 0
        while idx < len(self.running) and budget > 0:
            req = self.running[idx]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running.pop()
                self._preempt(victim, out)
                preempted = True
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break
            out.num_scheduled_tokens[req.req_id] = num_new
            budget -= num_new
            idx += 1
        for req in self.running[:idx]:
            self._emit_cached(req, out)
            self.kv.cache_blocks(req, req.num_computed_tokens + out.num_scheduled_tokens[req.req_id])

        # After a preemption the pool is too tight to admit anyone new this step.
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            req = self.waiting[0]
            hits, num_hit = self.kv.get_computed_blocks(req)
            num_new = req.num_tokens - num_hit
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if not self.kv.allocate_slots(req, num_new, hits):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_hit
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_hit
            self.running.append(req)
            out.num_scheduled_tokens[req.req_id] = num_new
            budget -= num_new
            block_ids = self.kv.block_ids(req.req_id)
            self._num_sent_blocks[req.req_id] = len(block_ids)
            out.new_reqs.append(
                NewRequestData(
                    req.req_id, req.all_token_ids, req.num_prompt_tokens, req.sampling_params,
                    req.stop_token_ids, req.generator, block_ids, num_hit, req.prompt_logprobs_spec,
                )
            )
            self.kv.cache_blocks(req, num_hit + num_new)
        return out

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> tuple[list[Request], list[Request]]:
        """Advance every scheduled request; append the sampled token to those that reached
        the end of their known tokens. Returns (requests that got a token, finished ones)."""
        advanced, finished = [], []
        for req_id, num in out.num_scheduled_tokens.items():
            req = self.requests[req_id]
            req.num_computed_tokens += num
            if req.num_computed_tokens < req.num_tokens:
                continue  # a prefill chunk: its sample is discarded
            req.output_token_ids.append(sampled[req_id])
            advanced.append(req)
            status = req.check_stop()
            if status is not None:
                self.running.remove(req)
                self._finish(req, status)
                finished.append(req)
        return advanced, finished

    # ---- internals ----------------------------------------------------------------
    def _emit_cached(self, req: Request, out: SchedulerOutput) -> None:
        sent = self._num_sent_blocks[req.req_id]
        block_ids = self.kv.block_ids(req.req_id, start=sent)  # only the new ones: O(1) a step
        self._num_sent_blocks[req.req_id] = sent + len(block_ids)
        out.cached_reqs.append(CachedRequestData(req.req_id, block_ids, req.num_computed_tokens))

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._num_sent_blocks.pop(req.req_id, None)
        out.removed_req_ids.add(req.req_id)
        self.waiting.appendleft(req)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        self.kv.free(req)
        self._num_sent_blocks.pop(req.req_id, None)
        self._removed.add(req.req_id)
        del self.requests[req.req_id]
