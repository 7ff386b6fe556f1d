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

from rollout.config import SchedulerConfig
from rollout.engine.kv_cache import KVCacheManager
from rollout.engine.request import PromptLogprobsSpec, Request, RequestStatus
from rollout.sampling_params import SamplingParams


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
    # The experts given for each position (LLM.score's routing replay); None: the router's.
    replay_routes: torch.Tensor | None = None


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
    # The scheduler's own record (the runner ignores it): requests whose sample this step
    # keeps, in execution order; ``Scheduler.update`` hands them their tokens.
    sampling_reqs: list[Request] = field(default_factory=list)

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

    def roll_back(self, out: SchedulerOutput) -> None:
        """The step ``out`` was scheduled but never ran: its samples will not come back, and
        the rows it told the runner to drop are dropped by the next step instead. The caller
        then preempts the running requests (their KV of this step was never written)."""
        self._removed |= out.removed_req_ids
        for req in out.sampling_reqs:
            if not req.is_finished and req.num_pending_tokens > 0:
                req.num_pending_tokens -= 1

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Pick this step's ``{req_id: num_tokens}`` and advance each request's
        ``num_computed_tokens`` by it at once, so the next step can be scheduled before this
        one's sampled tokens are back (``update`` appends them later). A request whose
        tokens in flight already reach its length limit is not scheduled again."""
        out = SchedulerOutput(removed_req_ids=self._removed)
        self._removed = set()
        budget = self.config.max_num_batched_tokens
        preempted = False

        scheduled: list[tuple[Request, int]] = []
        idx = 0
        while idx < len(self.running) and budget > 0:
            req = self.running[idx]
            end = req.num_scheduled_end
            num_new = min(end - req.num_computed_tokens, budget)
            if req.num_computed_tokens + num_new >= end and not req.may_sample_more:
                idx += 1  # its last token is in flight: nothing left to compute
                continue
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running.pop()
                self._preempt(victim, out)
                preempted = True
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break
            scheduled.append((req, num_new))
            budget -= num_new
            idx += 1
        for req, num_new in scheduled:
            self._emit_cached(req, out)
            out.num_scheduled_tokens[req.req_id] = num_new
            self._advance(req, num_new, out)

        # After a preemption the pool is too tight to admit anyone new this step.
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
            # A request preempted with a token in flight waits for it (its recompute needs it).
            and not self.waiting[0].num_pending_tokens
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
                    req.replay_routes,
                )
            )
            self._advance(req, num_new, out)
        if out.is_empty:
            # Nothing runs, so the runner sees no output: the rows to drop wait for the next.
            self._removed |= out.removed_req_ids
            out.removed_req_ids = set()
        return out

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> tuple[list[Request], list[Request]]:
        """Take the tokens sampled by the step ``out`` scheduled (``{req_id: token}``; rows
        whose sample is discarded, like a prefill chunk's, may be in it too). Requests that
        finished or were aborted since that step was scheduled are skipped. Returns
        (requests that got a token, finished ones)."""
        advanced, finished = [], []
        for req in out.sampling_reqs:
            if req.is_finished or self.requests.get(req.req_id) is not req:
                continue  # stopped while this step was in flight: its token is thrown away
            req.num_pending_tokens -= 1
            req.output_token_ids.append(sampled[req.req_id])
            advanced.append(req)
            status = req.check_stop()
            if status is not None:
                if req.status == RequestStatus.RUNNING:
                    # Blocks that waited for this token join the prefix cache before the
                    # request lets them go (the next turn of a conversation hits them).
                    self.kv.cache_blocks(req, min(req.num_computed_tokens, req.num_tokens))
                    self.running.remove(req)
                else:  # preempted while its token was in flight
                    self.waiting.remove(req)
                self._finish(req, status)
                finished.append(req)
        return advanced, finished

    # ---- internals ----------------------------------------------------------------
    def _advance(self, req: Request, num_new: int, out: SchedulerOutput) -> None:
        """Count this step's tokens as computed; register the full blocks whose tokens are
        all known (a block ending in a token still in flight waits for a later step)."""
        self.kv.cache_blocks(req, min(req.num_computed_tokens + num_new, req.num_tokens))
        req.num_computed_tokens += num_new
        if req.num_computed_tokens >= req.num_scheduled_end:
            req.num_pending_tokens += 1
            out.sampling_reqs.append(req)

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
