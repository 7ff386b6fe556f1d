"""Scheduler with no model: budgets, chunking, prefix hits, preemption, stops, aborts, and
random workloads checked against a fake runner after every step."""

from __future__ import annotations

import itertools
import random

import pytest

from rollout.engine.request import RequestStatus
from rollout.config import SchedulerConfig
from tests.helpers.sched import (
    FakeRunner,
    check_block_refs,
    engine_max_num_tokens,
    make_request,
    make_scheduler,
    run_step,
    run_until_done,
)

EOS = 2


def _counter(start: int = 500):
    it = itertools.count(start)
    return lambda req: next(it)


# ---- config ----------------------------------------------------------------------------
def test_config_validation():
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_seqs=0, max_num_batched_tokens=8, max_model_len=8)
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=8, max_model_len=16, enable_chunked_prefill=False)
    SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=8, max_model_len=16)


# ---- budgets and order -----------------------------------------------------------------
def test_token_budget_and_running_before_waiting():
    sched = make_scheduler(max_num_batched_tokens=16)
    for req_id in "abc":
        sched.add_request(make_request(req_id, 10, max_tokens=3))
    steps = [list(o.num_scheduled_tokens.items()) for o in run_until_done(sched)]
    assert steps == [
        [("a", 10), ("b", 6)],  # b's prompt is cut at the budget
        [("a", 1), ("b", 4), ("c", 10)],  # running first (oldest first), then waiting
        [("a", 1), ("b", 1), ("c", 1)],
        [("b", 1), ("c", 1)],
    ]
    assert not sched.has_unfinished_requests()


def test_budget_taken_by_running_requests_holds_back_waiting_ones():
    sched = make_scheduler(max_num_batched_tokens=4)
    sched.add_request(make_request("a", 10, max_tokens=2))
    sched.add_request(make_request("b", 3, max_tokens=1))
    steps = [dict(o.num_scheduled_tokens) for o in run_until_done(sched)]
    assert steps == [{"a": 4}, {"a": 4}, {"a": 2, "b": 2}, {"a": 1, "b": 1}]
    assert all(sum(s.values()) <= 4 for s in steps)


def test_max_num_seqs():
    sched = make_scheduler(max_num_seqs=2)
    for i in range(4):
        sched.add_request(make_request(f"r{i}", 4, max_tokens=2 + i))
    outs = run_until_done(sched)
    assert all(len(o.num_scheduled_tokens) <= 2 for o in outs)
    assert list(outs[0].num_scheduled_tokens) == ["r0", "r1"]
    assert list(outs[2].num_scheduled_tokens) == ["r1", "r2"]  # r0 finished after 2 tokens
    assert [n.req_id for n in outs[2].new_reqs] == ["r2"]


def test_without_chunked_prefill_a_prompt_waits_for_a_budget_that_holds_it():
    sched = make_scheduler(max_num_batched_tokens=16, max_model_len=16, enable_chunked_prefill=False)
    sched.add_request(make_request("a", 10, max_tokens=2))
    sched.add_request(make_request("b", 10, max_tokens=1))
    steps = [dict(o.num_scheduled_tokens) for o in run_until_done(sched)]
    assert steps == [{"a": 10}, {"a": 1, "b": 10}]


# ---- chunked prefill -------------------------------------------------------------------
def test_chunked_prefill_discards_the_sample_of_a_partial_chunk():
    sched = make_scheduler(max_num_batched_tokens=4)
    req = make_request("a", 10, max_tokens=2)
    sched.add_request(req)
    fn = _counter()
    computed, outputs = [], []
    for _ in range(3):
        out, advanced, _ = run_step(sched, fn)
        computed.append((out.num_scheduled_tokens["a"], req.num_computed_tokens))
        outputs.append((list(req.output_token_ids), [r.req_id for r in advanced]))
    assert computed == [(4, 4), (4, 8), (2, 10)]
    # Samples 500 and 501 came from partial chunks and are dropped; 502 is the first token.
    assert outputs == [([], []), ([], []), ([502], ["a"])]
    out, _, finished = run_step(sched, fn)
    assert out.num_scheduled_tokens == {"a": 1} and finished == [req]
    assert req.output_token_ids == [502, 503]


def test_deltas_carry_only_new_blocks():
    sched = make_scheduler(block_size=4, max_num_batched_tokens=4)
    sched.add_request(make_request("a", 10, max_tokens=3))
    outs = run_until_done(sched)
    (new,) = outs[0].new_reqs
    assert new.block_ids == [0] and new.num_computed_tokens == 0 and not outs[0].cached_reqs
    deltas = [(c.new_block_ids, c.num_computed_tokens) for o in outs[1:] for c in o.cached_reqs]
    assert deltas == [([1], 4), ([2], 8), ([], 10), ([], 11)]


# ---- prefix caching --------------------------------------------------------------------
def test_same_prompt_added_together_hits_blocks_computed_in_the_same_step():
    sched = make_scheduler(block_size=4)
    prompt = make_request("p", 10).prompt_token_ids
    reqs = [make_request(f"r{i}", prompt, max_tokens=2) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    out, _, _ = run_step(sched)
    assert out.num_scheduled_tokens == {"r0": 10, "r1": 2, "r2": 2}
    assert [n.num_computed_tokens for n in out.new_reqs] == [0, 8, 8]
    assert [r.num_cached_tokens for r in reqs] == [0, 8, 8]
    blocks = [n.block_ids for n in out.new_reqs]
    assert blocks[0][:2] == blocks[1][:2] == blocks[2][:2]
    assert len({b[2] for b in blocks}) == 3  # the partial last block is private
    run_until_done(sched)
    # A later request with the same prompt still hits (the blocks are cached, not used).
    late = make_request("late", prompt, max_tokens=1)
    sched.add_request(late)
    out, _, _ = run_step(sched)
    assert out.num_scheduled_tokens == {"late": 2} and late.num_cached_tokens == 8


def test_prompt_logprobs_requests_never_hit():
    sched = make_scheduler(block_size=4)
    prompt = make_request("p", 10).prompt_token_ids
    sched.add_request(make_request("a", prompt))
    sched.add_request(make_request("b", prompt, prompt_logprobs=0))
    sched.add_request(make_request("c", prompt))
    out, _, _ = run_step(sched)
    assert out.num_scheduled_tokens == {"a": 10, "b": 10, "c": 2}


def test_no_hits_without_caching():
    sched = make_scheduler(block_size=4, enable_caching=False)
    prompt = make_request("p", 10).prompt_token_ids
    sched.add_request(make_request("a", prompt))
    sched.add_request(make_request("b", prompt))
    out, _, _ = run_step(sched)
    assert out.num_scheduled_tokens == {"a": 10, "b": 10}


def test_kv_from_before_a_prefix_cache_reset_is_never_hit():
    # r is mid-prefill when the cache is reset (a weight update). Its later blocks attend to
    # KV from the old weights, so they must not be registered even though they are computed
    # after the reset: t recomputes the prompt and s must hit t's blocks only.
    sched = make_scheduler(block_size=4, max_num_batched_tokens=8)
    runner = FakeRunner(sched)
    prompt = make_request("p", 13).prompt_token_ids
    r = make_request("r", prompt, max_tokens=8)
    sched.add_request(r)
    run_step(sched, runner=runner)  # r: 8 tokens, blocks 0 and 1 registered
    runner.reset_prefix_cache()
    t = make_request("t", prompt, max_tokens=8)
    sched.add_request(t)
    for _ in range(3):
        run_step(sched, runner=runner)  # r finishes its prompt; t computes all 13 from scratch
    assert t.num_cached_tokens == 0 and t.num_computed_tokens == 13
    s = make_request("s", prompt, max_tokens=1)
    sched.add_request(s)
    out, _, _ = run_step(sched, runner=runner)  # the runner checks what s reads
    assert s.num_cached_tokens == 12
    assert out.new_reqs[0].block_ids[:3] == sched.kv.block_ids("t")[:3]
    run_until_done(sched, runner=runner)


# ---- preemption ------------------------------------------------------------------------
def test_preemption_of_the_youngest_and_resume():
    # 4 blocks of 4: three 4-token prompts take one block each; at 5 tokens each needs a
    # second block, so the youngest (c) is preempted to make room for b.
    sched = make_scheduler(num_blocks=4, block_size=4, enable_caching=False)
    a, b, c = (make_request(r, 4, max_tokens=6) for r in "abc")
    for r in (a, b, c):
        sched.add_request(r)
    out1, _, _ = run_step(sched)
    assert out1.num_scheduled_tokens == {"a": 4, "b": 4, "c": 4}
    d = make_request("d", 1, max_tokens=1)
    sched.add_request(d)  # waiting: [d]
    c_blocks = sched.kv.block_ids("c")
    out2, _, _ = run_step(sched)
    assert out2.num_scheduled_tokens == {"a": 1, "b": 1}
    assert "c" in out2.removed_req_ids and c_blocks[0] in sched.kv.block_ids("b")
    assert c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0
    assert sched.kv.block_ids("c") == [] and c.num_preemptions == 1 and sched.num_preemptions == 1
    assert list(sched.waiting) == [c, d]  # back at the front; nobody admitted after a preemption
    assert c.output_token_ids == [7] and c not in sched.running
    check_block_refs(sched)

    outs = run_until_done(sched)
    resumed = [(i, n) for i, o in enumerate(outs) for n in o.new_reqs if n.req_id == "c"]
    assert len(resumed) == 1
    i, new = resumed[0]
    assert new.token_ids == c.prompt_token_ids + [7] and new.num_computed_tokens == 0
    assert outs[i].num_scheduled_tokens["c"] == 5
    for r in (a, b, c, d):
        assert r.status == RequestStatus.FINISHED_LENGTH
    assert c.num_output_tokens == 6 and sched.kv.pool.counts() == (4, 0, 0)


def test_a_request_that_cannot_grow_preempts_itself_when_youngest():
    sched = make_scheduler(num_blocks=5, block_size=4, enable_caching=False)
    a, b = make_request("a", 8, max_tokens=8), make_request("b", 8, max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched)
    out, _, _ = run_step(sched)  # a takes the last free block; b has none
    assert out.num_scheduled_tokens == {"a": 1} and out.removed_req_ids == {"b"}
    assert b.status == RequestStatus.PREEMPTED and sched.waiting[0] is b
    outs = run_until_done(sched)
    assert a.is_finished and b.is_finished and sched.kv.pool.counts()[2] == 0
    assert all(o.total_num_scheduled_tokens <= 64 for o in outs)


def test_resumed_request_can_hit_its_own_cached_prefix():
    sched = make_scheduler(num_blocks=6, block_size=2, max_num_batched_tokens=64)
    x = make_request("x", 4, max_tokens=3)
    y = make_request("y", 5, max_tokens=8)
    sched.add_request(x)
    sched.add_request(y)
    outs = run_until_done(sched)
    resumed = [n for o in outs for n in o.new_reqs if n.req_id == "y" and y.num_preemptions]
    assert y.num_preemptions >= 1 and len(resumed) == 2
    # y's blocks were freed into the cache; it hits (part of) its prefix when it comes back.
    assert resumed[1].num_computed_tokens > 0
    assert y.is_finished and sched.kv.pool.counts()[2] == 0


# ---- stop conditions -------------------------------------------------------------------
def _generate(req, tokens, **sched_kwargs):
    sched = make_scheduler(**sched_kwargs)
    sched.add_request(req)
    it = iter(tokens)
    run_until_done(sched, lambda r: next(it))
    return req


@pytest.mark.parametrize(
    "kwargs, tokens, status, outputs, stop_reason",
    [
        (dict(max_tokens=3), [5, 5, 5, 5], RequestStatus.FINISHED_LENGTH, [5, 5, 5], None),
        (dict(eos_token_ids=[EOS]), [5, EOS, 5], RequestStatus.FINISHED_STOPPED, [5, EOS], None),
        (dict(max_tokens=3, eos_token_ids=[EOS], ignore_eos=True), [EOS] * 4, RequestStatus.FINISHED_LENGTH, [EOS] * 3, None),
        (dict(stop_token_ids=[9]), [5, 9, 5], RequestStatus.FINISHED_STOPPED, [5, 9], 9),
        (dict(stop_token_ids=[9], eos_token_ids=[EOS], ignore_eos=True), [EOS, 9], RequestStatus.FINISHED_STOPPED, [EOS, 9], 9),
        # min_tokens: EOS and stop ids do not end the request before min_tokens outputs.
        (dict(min_tokens=3, eos_token_ids=[EOS], stop_token_ids=[9]), [EOS, 9, EOS, 5], RequestStatus.FINISHED_STOPPED, [EOS, 9, EOS], None),
        (dict(min_tokens=3, eos_token_ids=[EOS], stop_token_ids=[9]), [9, EOS, 9, 5], RequestStatus.FINISHED_STOPPED, [9, EOS, 9], 9),
        (dict(min_tokens=2, max_tokens=2, eos_token_ids=[EOS]), [EOS, 5, 5], RequestStatus.FINISHED_LENGTH, [EOS, 5], None),
        # An EOS that is also the max_tokens-th token is a stop.
        (dict(max_tokens=2, eos_token_ids=[EOS]), [5, EOS], RequestStatus.FINISHED_STOPPED, [5, EOS], None),
        # The sequence cap (model length / KV capacity): 6 prompt tokens + 2 outputs.
        (dict(max_tokens=None, max_num_tokens=8), [5] * 5, RequestStatus.FINISHED_LENGTH, [5, 5], None),
    ],
)
def test_stop_conditions(kwargs, tokens, status, outputs, stop_reason):
    req = _generate(make_request("a", 6, **kwargs), tokens)
    assert req.status == status and req.output_token_ids == outputs and req.stop_reason == stop_reason
    assert req.status.finish_reason == {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length"}[status]


def test_banned_stop_token_ids():
    # What the runner bans until min_tokens: EOS (unless ignore_eos) and stop ids, deduplicated.
    assert make_request("a", eos_token_ids=[EOS], stop_token_ids=[9, EOS]).stop_token_ids == (EOS, 9)
    assert make_request("a", eos_token_ids=[EOS], stop_token_ids=[9], ignore_eos=True).stop_token_ids == (9,)


def test_finishing_frees_blocks_and_reports_removal_next_step():
    sched = make_scheduler()
    a, b = make_request("a", 6, max_tokens=1), make_request("b", 6, max_tokens=3)
    sched.add_request(a)
    sched.add_request(b)
    out, advanced, finished = run_step(sched)
    assert advanced == [a, b] and finished == [a]
    assert "a" not in sched.requests and a not in sched.running and sched.kv.block_ids("a") == []
    assert "a" not in out.removed_req_ids
    out, _, _ = run_step(sched)
    assert out.removed_req_ids == {"a"} and out.num_scheduled_tokens == {"b": 1}
    out, _, _ = run_step(sched)
    assert out.removed_req_ids == set()


# ---- aborts ----------------------------------------------------------------------------
def test_finish_requests_aborts_waiting_and_running():
    sched = make_scheduler(num_blocks=8, block_size=4, max_num_seqs=2)
    reqs = {r: make_request(r, 6, max_tokens=10) for r in "abc"}
    for r in reqs.values():
        sched.add_request(r)
    run_step(sched)  # a, b running (2 blocks each); c waiting
    assert sched.kv.pool.counts()[2] == 4
    done = sched.finish_requests(["c", "a", "nope"], RequestStatus.FINISHED_ABORTED)
    assert done == [reqs["c"], reqs["a"]]
    assert reqs["a"].status == reqs["c"].status == RequestStatus.FINISHED_ABORTED
    assert reqs["a"].status.finish_reason == "abort"
    assert sched.kv.block_ids("a") == [] and sched.kv.pool.counts()[2] == 2
    assert list(sched.waiting) == [] and sched.running == [reqs["b"]]
    check_block_refs(sched)
    assert sched.finish_requests(["a", "c"], RequestStatus.FINISHED_ABORTED) == []  # already gone
    out, _, _ = run_step(sched)
    assert out.removed_req_ids == {"a", "c"} and out.num_scheduled_tokens == {"b": 1}
    sched.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert not sched.has_unfinished_requests() and sched.kv.pool.counts()[2] == 0


def test_abort_of_a_preempted_request():
    sched = make_scheduler(num_blocks=4, block_size=4, enable_caching=False)
    for r in "abc":
        sched.add_request(make_request(r, 4, max_tokens=6))
    run_step(sched)
    run_step(sched)  # c is preempted (see test_preemption_of_the_youngest_and_resume)
    c = sched.requests["c"]
    assert c.status == RequestStatus.PREEMPTED and sched.waiting[0] is c
    assert sched.finish_requests(["c"], RequestStatus.FINISHED_ABORTED) == [c]
    assert c.status == RequestStatus.FINISHED_ABORTED and not sched.waiting
    run_until_done(sched)
    assert sched.kv.pool.counts() == (4, 0, 0)


# ---- determinism and random workloads -------------------------------------------------
def _random_workload(seed: int, enable_caching: bool = True, num_requests: int = 40, check: bool = True,
                     pipelined: bool = False):
    """Random prompts (with shared prefixes), lengths, arrivals, aborts and prefix-cache
    resets on a pool small enough to preempt. Returns (trace, stats). ``pipelined`` drives
    the scheduler as LLMEngine does: step N+1 is scheduled (and run by the fake runner,
    which samples at once, as the device does) before step N's tokens reach ``update``."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    max_model_len = 48
    # Down to half a sequence: a request may need the whole pool (LLMEngine then caps
    # max_num_tokens at the KV capacity).
    num_blocks = rng.randint(-(-24 // block_size), -(-96 // block_size))
    sched = make_scheduler(
        num_blocks=num_blocks, block_size=block_size, max_num_seqs=rng.choice([2, 4, 8]),
        max_num_batched_tokens=rng.choice([4, 8, 16, 48]), max_model_len=max_model_len,
        enable_caching=enable_caching,
    )
    runner = FakeRunner(sched)
    max_num_tokens = engine_max_num_tokens(sched)
    prefixes = [[rng.randrange(10, 14) for _ in range(rng.randint(0, 24))] for _ in range(3)]
    submitted, aborted, trace = [], set(), []
    in_flight = None  # pipelined: (SchedulerOutput, sampled) of the step not read back yet
    stats = dict(steps=0, preemptions=0, hit_tokens=0)
    sample = lambda req: rng.choice([EOS, 9] + [rng.randrange(10, 14)] * 20)  # noqa: E731
    for _ in range(2000):
        if len(submitted) < num_requests and rng.random() < 0.3:
            for _ in range(min(rng.randint(1, 3), num_requests - len(submitted))):
                prompt_len = rng.randint(1, min(max_model_len - 1, max_num_tokens))
                prompt = (rng.choice(prefixes) + [rng.randrange(10, 14) for _ in range(prompt_len)])[:prompt_len]
                max_tokens = rng.randint(1, 30)
                req = make_request(
                    f"r{len(submitted)}", prompt, max_tokens, min_tokens=rng.choice([0, 0, 0, max_tokens // 2]),
                    eos_token_ids=[EOS], stop_token_ids=rng.choice([[], [9]]), ignore_eos=rng.random() < 0.2,
                    prompt_logprobs=0 if rng.random() < 0.1 else None, max_num_tokens=max_num_tokens,
                )
                submitted.append(req)
                sched.add_request(req)
        if sched.requests and rng.random() < 0.03:
            req_id = rng.choice(sorted(sched.requests))
            aborted.add(req_id)
            assert sched.finish_requests([req_id], RequestStatus.FINISHED_ABORTED)
        if rng.random() < 0.02:
            if in_flight is not None:  # LLMEngine reads the step in flight back first
                sched.update(*in_flight)
                in_flight = None
            runner.reset_prefix_cache()
        if not sched.has_unfinished_requests():
            in_flight = None  # only tokens of finished requests, thrown away
            if len(submitted) == num_requests:
                break
            continue
        out = sched.schedule()
        assert not out.is_empty or in_flight is not None, "no progress with requests pending"
        assert out.total_num_scheduled_tokens <= sched.config.max_num_batched_tokens
        assert len(sched.running) <= sched.config.max_num_seqs
        assert list(out.num_scheduled_tokens)[: len(out.cached_reqs)] == [c.req_id for c in out.cached_reqs]
        sampled = {req_id: sample(sched.requests[req_id]) for req_id in out.num_scheduled_tokens}
        runner.execute(out, sampled)
        if not pipelined:
            sched.update(out, sampled)
        else:
            if in_flight is not None:
                sched.update(*in_flight)
            in_flight = (out, sampled) if not out.is_empty else None
        stats["steps"] += 1
        stats["hit_tokens"] += sum(n.num_computed_tokens for n in out.new_reqs)
        trace.append((
            list(out.num_scheduled_tokens.items()), sorted(out.removed_req_ids),
            [(n.req_id, n.block_ids, n.num_computed_tokens) for n in out.new_reqs],
            [(c.req_id, c.new_block_ids) for c in out.cached_reqs],
        ))
        if check:
            check_block_refs(sched)
            for req in sched.running:  # the runner's mirror matches the scheduler's requests
                row = runner.rows[req.req_id].token_ids
                assert row[: req.num_tokens] == req.all_token_ids
                assert len(row) == req.num_scheduled_end  # plus the tokens in flight
    else:
        raise AssertionError("random workload did not finish in 2000 iterations")
    stats["preemptions"] = sched.num_preemptions
    assert len(submitted) == num_requests and not sched.requests
    for req in submitted:
        assert req.is_finished, req.req_id
        assert (req.status == RequestStatus.FINISHED_ABORTED) == (req.req_id in aborted)
        if req.status == RequestStatus.FINISHED_LENGTH:
            assert req.num_output_tokens == req.sampling_params.max_tokens or req.num_tokens >= max_num_tokens
        elif req.status == RequestStatus.FINISHED_STOPPED:
            assert req.output_token_ids[-1] in req.stop_token_ids
            assert req.num_output_tokens >= req.sampling_params.min_tokens
    sched.kv.pool.check_invariants()
    free, cached, used = sched.kv.pool.counts()
    assert used == 0 and free + cached == num_blocks
    return trace, stats


SEEDS = range(16)


@pytest.mark.parametrize("enable_caching", [True, False])
@pytest.mark.parametrize("seed", SEEDS)
def test_random_workload(seed, enable_caching):
    _random_workload(seed, enable_caching)


@pytest.mark.parametrize("enable_caching", [True, False])
@pytest.mark.parametrize("seed", SEEDS)
def test_random_workload_pipelined(seed, enable_caching):
    _random_workload(seed, enable_caching, pipelined=True)


@pytest.mark.parametrize("pipelined", [False, True])
def test_random_workloads_exercise_preemption_and_prefix_hits(pipelined):
    stats = [_random_workload(seed, check=False, pipelined=pipelined)[1] for seed in SEEDS]
    assert sum(s["preemptions"] > 0 for s in stats) >= len(stats) // 2, stats
    assert sum(s["hit_tokens"] > 0 for s in stats) >= len(stats) // 2, stats
    assert all(50 <= s["steps"] for s in stats), stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_inputs_give_the_same_schedule(seed):
    first, _ = _random_workload(seed, check=False)
    second, _ = _random_workload(seed, check=False)
    assert first == second
