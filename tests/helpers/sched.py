"""Schedulers, requests and a fake runner for testing the scheduler and KV cache with no model.

``FakeRunner`` mirrors what ``ModelRunner`` rebuilds from ``SchedulerOutput`` diffs (rows,
block tables, computed counts) and keeps a fake KV cache: each slot stores an exact id of
the token prefix that produced it and the weight version it was written under. Reading KV
computed for another prefix (a wrong prefix hit, a stale block, a block handed to two
writers) fails an assertion instead of silently producing wrong logits.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rollout.engine.kv_cache import KVCacheManager
from rollout.engine.request import Request
from rollout.config import SchedulerConfig
from rollout.engine.scheduler import Scheduler, SchedulerOutput
from rollout.sampling_params import SamplingParams

DEFAULT_TOKEN = 7
# make_request draws prompt tokens from here, away from the small ids tests use as EOS/stop.
PROMPT_VOCAB = range(100, 1000)

SampledTokenFn = Callable[[Request], int]


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 256,
    enable_caching: bool = True,
    enable_chunked_prefill: bool = True,
) -> Scheduler:
    config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len, enable_chunked_prefill)
    return Scheduler(config, KVCacheManager(num_blocks, block_size, enable_caching))


def engine_max_num_tokens(scheduler: Scheduler) -> int:
    """The per-request token cap LLMEngine passes: the model length or the whole KV cache."""
    return min(scheduler.config.max_model_len, scheduler.kv.capacity_tokens)


def prompt_tokens(req_id: str, num_tokens: int) -> list[int]:
    """Deterministic tokens, distinct per ``req_id`` (so unrelated prompts never share blocks)."""
    rng = random.Random(f"prompt:{req_id}")
    return [rng.choice(PROMPT_VOCAB) for _ in range(num_tokens)]


def make_request(
    req_id: str,
    prompt: int | Sequence[int] = 8,
    max_tokens: int | None = 16,
    *,
    min_tokens: int = 0,
    eos_token_ids: Sequence[int] = (),
    stop_token_ids: Sequence[int] | None = None,
    ignore_eos: bool = False,
    prompt_logprobs: int | None = None,
    max_num_tokens: int = 1 << 20,
) -> Request:
    """``prompt``: a length (tokens derived from ``req_id``) or the token ids themselves."""
    tokens = prompt_tokens(req_id, prompt) if isinstance(prompt, int) else list(prompt)
    params = SamplingParams(
        max_tokens=max_tokens, min_tokens=min_tokens, stop_token_ids=list(stop_token_ids or []),
        ignore_eos=ignore_eos, prompt_logprobs=prompt_logprobs,
    )
    return Request(req_id, tokens, params, max_num_tokens=max_num_tokens, eos_token_ids=tuple(eos_token_ids))


def run_step(
    scheduler: Scheduler, sampled_token_fn: SampledTokenFn | None = None, runner: FakeRunner | None = None
) -> tuple[SchedulerOutput, list[Request], list[Request]]:
    """schedule() then update() with fake samples: ``sampled_token_fn(req)`` for every
    scheduled request (prefill chunks included; the scheduler must discard those).
    With a ``runner``, the step also goes through its checks."""
    out = scheduler.schedule()
    fn = sampled_token_fn or (lambda req: DEFAULT_TOKEN)
    sampled = {req_id: fn(scheduler.requests[req_id]) for req_id in out.num_scheduled_tokens}
    if runner is not None:
        runner.execute(out, sampled)
    advanced, finished = scheduler.update(out, sampled)
    return out, advanced, finished


def run_until_done(
    scheduler: Scheduler, sampled_token_fn: SampledTokenFn | None = None, max_steps: int = 1000,
    runner: FakeRunner | None = None,
) -> list[SchedulerOutput]:
    outs = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return outs
        out, _, _ = run_step(scheduler, sampled_token_fn, runner)
        assert not out.is_empty, "no progress with requests pending"
        outs.append(out)
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def admit(kv: KVCacheManager, req: Request) -> int:
    """Do for ``req`` what the scheduler does when it admits a whole prompt in one step:
    look up hits, allocate, mark computed, register full blocks. Returns the hit length."""
    hits, num_hit = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - num_hit, hits)
    req.num_computed_tokens = req.num_tokens
    kv.cache_blocks(req, req.num_tokens)
    return num_hit


def check_block_refs(scheduler: Scheduler) -> None:
    """Pool invariants, and every ref count equals the number of requests holding the block."""
    kv = scheduler.kv
    kv.pool.check_invariants()
    holders = [0] * kv.num_blocks
    for req_id, req in scheduler.requests.items():
        ids = kv.block_ids(req_id)
        assert len(set(ids)) == len(ids), (req_id, ids)
        for block_id in ids:
            holders[block_id] += 1
        if req in scheduler.running:
            assert len(ids) * kv.block_size >= req.num_computed_tokens
        else:
            assert not ids and req.num_computed_tokens == 0, req
    assert [b.ref_cnt for b in kv.pool.blocks] == holders
    assert sum(b.ref_cnt for b in kv.pool.blocks) == sum(len(kv.block_ids(r)) for r in scheduler.requests)


@dataclass
class _Row:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    prefix_ids: list[int] = field(default_factory=list)  # [num_tokens] exact id of tokens[:i + 1]


class FakeRunner:
    """The runner's side of the scheduler protocol, with a fake KV cache (see module doc)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.block_size = scheduler.kv.block_size
        self.rows: dict[str, _Row] = {}
        self.kv: dict[int, tuple[int, int]] = {}  # slot -> (weight_version, prefix id)
        self.weight_version = 0
        self._prefix_trie: dict[tuple[int, int], int] = {}

    def reset_prefix_cache(self) -> None:
        """Models a weight update: KV written before it must never be hit afterwards."""
        self.weight_version += 1
        self.scheduler.kv.reset_prefix_cache()

    def execute(self, out: SchedulerOutput, sampled: dict[str, int]) -> None:
        for req_id in out.removed_req_ids:
            self.rows.pop(req_id, None)
        for new in out.new_reqs:
            assert new.req_id not in self.rows, f"{new.req_id} sent as new twice"
            row = _Row(list(new.token_ids), list(new.block_ids), new.num_computed_tokens)
            self._extend_prefix_ids(row)
            self.rows[new.req_id] = row
        for cached in out.cached_reqs:
            row = self.rows[cached.req_id]
            row.block_ids += cached.new_block_ids
            assert row.num_computed_tokens == cached.num_computed_tokens, cached.req_id
        assert set(out.num_scheduled_tokens) <= set(self.rows)
        hit_lens = {new.req_id: new.num_computed_tokens for new in out.new_reqs}
        # Within a layer every K/V write of the step lands before any attention read.
        for req_id, num in out.num_scheduled_tokens.items():
            row = self.rows[req_id]
            assert row.block_ids == self.scheduler.kv.block_ids(req_id), req_id
            assert 0 < num <= len(row.token_ids) - row.num_computed_tokens, (req_id, num)
            # KV attending to KV from older weights is as stale as that KV.
            version = min(
                [self.weight_version] + [self.kv[self._slot(row, pos)][0] for pos in range(row.num_computed_tokens)]
            )
            for pos in range(row.num_computed_tokens, row.num_computed_tokens + num):
                self.kv[self._slot(row, pos)] = (version, row.prefix_ids[pos])
        for req_id, num in out.num_scheduled_tokens.items():
            row = self.rows[req_id]
            end = row.num_computed_tokens + num
            for pos in range(end):
                version, prefix_id = self.kv.get(self._slot(row, pos), (None, None))
                assert prefix_id == row.prefix_ids[pos], f"{req_id} reads KV of another prefix at {pos}"
                # A prefix hit must be KV computed under the current weights.
                assert req_id not in hit_lens or pos >= hit_lens[req_id] or version == self.weight_version, (
                    f"{req_id} hits KV computed before a prefix-cache reset at {pos}"
                )
            row.num_computed_tokens = end
            if end == len(row.token_ids):
                row.token_ids.append(sampled[req_id])
                self._extend_prefix_ids(row)

    def _slot(self, row: _Row, pos: int) -> int:
        block_idx, offset = divmod(pos, self.block_size)
        assert block_idx < len(row.block_ids), "position beyond the block table"
        return row.block_ids[block_idx] * self.block_size + offset

    def _extend_prefix_ids(self, row: _Row) -> None:
        for pos in range(len(row.prefix_ids), len(row.token_ids)):
            key = (row.prefix_ids[-1] if row.prefix_ids else -1, row.token_ids[pos])
            row.prefix_ids.append(self._prefix_trie.setdefault(key, len(self._prefix_trie)))
