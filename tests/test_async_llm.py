"""AsyncLLM (vLLM's AsyncLLM calls over an in-process LLM), driven the way verl and OpenRLHF
drive vLLM's, against fresh ``LLM.generate`` references: fp32 greedy tokens exact, logprobs
within LOGPROB_TOL (batch composition and recomputation change the reduction order).

The call shapes replayed here, as their sources write them:

verl, volcengine/verl @ b178a3cd56f58b2d502255daba591e92833930a7
- verl/workers/rollout/vllm_rollout/vllm_async_server.py, ``vLLMHttpServer.generate``:
  ``SamplingParams(max_tokens=..., logprobs=0 | None, repetition_penalty=..., **params)``,
  ``engine.generate(prompt=TokensPrompt(prompt_token_ids=ids, multi_modal_data={}),
  sampling_params=..., request_id=..., lora_request=None, priority=0)``, iterated to the last
  output; reads ``outputs[0].token_ids``, ``outputs[0].logprobs[i][token_ids[i]].logprob``,
  ``finish_reason`` ("abort" -> "aborted", "stop"/"length" -> "completed"). Sleep/wake:
  colocated ``engine.sleep(level=1)``, ``engine.wake_up(tags=["kv_cache", "weights"])`` then
  ``engine.reset_prefix_cache()``; hybrid ``engine.collective_rpc("sleep", kwargs={"level":
  2})``; ``collective_rpc(method=, timeout=, args=, kwargs=)`` passed through;
  ``wait_for_requests_to_drain()``, ``reset_mm_cache()``, ``start_profile``/``stop_profile``,
  ``list_loras()`` (LoRA only); abort through vLLM internals (``output_processor``,
  ``engine_core.abort_requests_async``), for which ``abort(request_id)`` stands here.
- verl/experimental/agent_loop/agent_loop.py, ``AsyncLLMServerManager.generate``: a fresh
  ``uuid4().hex`` request id per turn; tool_agent_loop.py: ``prompt_ids += response_ids``,
  then the tool response's ids, and the next turn generates from the whole list.
- verl/experimental/fully_async_policy/vllm_rollout/vllm_async_server.py: ``engine.generate(
  prompt=TokensPrompt(prompt_token_ids=ids, multi_modal_data=None), sampling_params=
  SamplingParams(max_tokens=max_model_len - len(ids), logprobs=1), request_id=...)`` in a
  task that ``cancel()`` cancels (partial rollout), keeping the last cumulative snapshot.

OpenRLHF, OpenRLHF/OpenRLHF @ 3c3be6234e0cb353e76bb8019947db9dfe99fca7
- openrlhf/trainer/ray/vllm_engine.py: ``AsyncLLMEngine.from_engine_args(AsyncEngineArgs(
  *args, **kwargs))``, ``await llm.is_sleeping()``, ``collective_rpc("init_process_group" |
  "update_weight" | "update_weight_cuda_ipc", args=(...))``, ``reset_prefix_cache()``,
  ``pause_generation(mode="keep")``, ``resume_generation()``, ``sleep(level=level)``,
  ``wake_up(tags=[tag])`` one tag at a time, ``generate(TokensPrompt(prompt_token_ids=ids),
  deepcopy(sampling_params), request_id=random_uuid())`` iterated to the last output,
  ``llm.output_processor.get_num_unfinished_requests()`` (vLLM internals, not served).
- openrlhf/utils/agent.py: per turn ``sampling_params.max_tokens = max_length -
  len(obs)``, ``obs = obs + action_tokens + feedback_tokens``, logprobs as
  ``logprob[action_tokens[i]].logprob``.
- openrlhf/trainer/ppo_trainer_async.py ``broadcast_to_vllm``: ``pause_generation`` ->
  weights -> ``resume_generation`` while agents keep their requests.
"""

from __future__ import annotations

import asyncio
import uuid
from copy import deepcopy

import pytest

from rollout import LLM, SamplingParams
from rollout.entrypoints.async_llm import AsyncEngineArgs, AsyncLLM
from rollout.errors import EngineStateError, UnsupportedFeatureError
from rollout.sampling_params import RequestOutputKind
from tests.helpers.engine_state import LOGPROB_TOL
from tests.helpers.hf_oracle import random_prompt

BLOCK = 8
TURNS = 3


def _llm(path, **kwargs) -> LLM:
    kwargs.setdefault("num_kv_blocks", 512)
    return LLM(str(path), dtype="float32", block_size=BLOCK, **kwargs)


def _tool_ids(response: list[int], turn: int) -> list[int]:
    """A deterministic tool/environment answer: 3 token ids (never the specials 0..2)."""
    return [3 + (sum(response) + 17 * j + 5 * turn) % 381 for j in range(3)]


def _reference(ref: LLM, prompt: list[int], params) -> list[tuple[list[int], list[float]]]:
    """Per turn (tokens, logprobs) of the same conversation run alone on a fresh engine;
    ``params(prompt_len)`` gives each turn's SamplingParams (None: no budget left, stop)."""
    ids, turns = list(prompt), []
    for turn in range(TURNS):
        sp = params(len(ids))
        if sp is None:
            break
        out = ref.generate(ids, sp)[0].outputs[0]
        turns.append((out.token_ids, out.token_logprobs))
        ids = ids + out.token_ids + _tool_ids(out.token_ids, turn)
    return turns


def _assert_turns(got, want) -> None:
    assert len(got) == len(want)
    for (got_ids, got_lp), (want_ids, want_lp) in zip(got, want):
        assert list(got_ids) == list(want_ids)
        assert list(got_lp) == pytest.approx(list(want_lp), abs=LOGPROB_TOL)


# ---- verl -----------------------------------------------------------------------------------
async def _verl_server_generate(engine: AsyncLLM, prompt_ids: list[int], sampling_params: dict, request_id: str):
    """vLLMHttpServer.generate's calls on the engine (token in, token out)."""
    sampling_params = dict(sampling_params)
    max_tokens = sampling_params.pop("max_tokens")
    sampling_params["logprobs"] = 0 if sampling_params.pop("logprobs", False) else None
    sampling_params = SamplingParams(max_tokens=max_tokens, **sampling_params)
    prompt = {"prompt_token_ids": prompt_ids, "multi_modal_data": {}}  # vllm.inputs.TokensPrompt
    generator = engine.generate(
        prompt=prompt, sampling_params=sampling_params, request_id=request_id, lora_request=None, priority=0
    )
    final_res = None
    async for output in generator:
        final_res = output
    assert final_res is not None
    token_ids = final_res.outputs[0].token_ids
    log_probs = [lps[token_ids[i]].logprob for i, lps in enumerate(final_res.outputs[0].logprobs)]
    stop_reason = "aborted" if final_res.outputs[0].finish_reason == "abort" else "completed"
    return token_ids, log_probs, stop_reason


async def _verl_tool_agent(engine: AsyncLLM, conv: int, prompt_ids: list[int], max_tokens: int):
    """ToolAgentLoop: generate, append the response and the tool's answer, generate again."""
    prompt_ids, turns = list(prompt_ids), []
    for turn in range(TURNS):
        sampling_params = {"temperature": 0.0, "logprobs": True, "max_tokens": max_tokens}
        token_ids, log_probs, stop_reason = await _verl_server_generate(
            engine, prompt_ids, sampling_params, uuid.uuid4().hex  # a new request id each turn
        )
        assert stop_reason == "completed"
        turns.append((token_ids, log_probs))
        await asyncio.sleep(0.001 * (conv % 3))  # the tool takes a while; the others decode
        prompt_ids += token_ids
        prompt_ids += _tool_ids(token_ids, turn)
    return turns


@pytest.mark.numerics
def test_verl_agent_loop_rounds_with_sleep_wake_equal_running_alone(llama_dir, sd_a):
    engine = AsyncLLM(_llm(llama_dir))
    max_tokens = 5
    rounds = [[random_prompt(9 + c % 5, seed=300 * r + c) for c in range(6)] for r in range(3)]

    async def agent_round(prompts):
        return await asyncio.gather(*(_verl_tool_agent(engine, c, p, max_tokens) for c, p in enumerate(prompts)))

    async def main():
        got = [await agent_round(rounds[0])]
        # Colocated mode between rounds: sleep(level=1), wake both, reset the prefix cache.
        await engine.sleep(level=1)
        assert await engine.is_sleeping()
        await engine.wake_up(tags=["kv_cache", "weights"])
        assert await engine.reset_prefix_cache() is True
        got.append(await agent_round(rounds[1]))
        # Hybrid mode: sleep(level=2) through collective_rpc, weights woken and synced, then KV.
        assert await engine.collective_rpc("sleep", kwargs={"level": 2}) == [None]
        await engine.collective_rpc(method="wake_up", timeout=None, args=(), kwargs={"tags": ["weights"]})
        engine.llm.update_weights(sd_a.items())  # the trainer's weights (here: the same ones)
        await engine.collective_rpc("wake_up", kwargs={"tags": ["kv_cache"]})
        assert not await engine.is_sleeping()
        got.append(await agent_round(rounds[2]))
        await engine.wait_for_requests_to_drain()
        return got

    got = asyncio.run(main())
    assert engine.llm.weight_version == 1 and not engine.llm.has_unfinished_requests()
    engine.llm.worker.check_invariants()
    ref = _llm(llama_dir)
    for r, prompts in enumerate(rounds):
        for c, prompt in enumerate(prompts):
            greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0)
            _assert_turns(got[r][c], _reference(ref, prompt, lambda n: greedy))


@pytest.mark.numerics
def test_verl_partial_rollout_cancel_aborts_and_keeps_the_snapshot(llama_dir):
    engine = AsyncLLM(_llm(llama_dir))
    prompts = [random_prompt(11, seed=40 + i) for i in range(3)]
    max_model_len = 60
    req_output: dict[str, object] = {}

    async def generate_step(prompt_ids, request_id):  # vLLMHttpServerForPartial._generate_step
        sampling_params = SamplingParams(temperature=0.0, max_tokens=max_model_len - len(prompt_ids), logprobs=1)
        prompt = {"prompt_token_ids": prompt_ids, "multi_modal_data": None}
        async for output in engine.generate(prompt=prompt, sampling_params=sampling_params, request_id=request_id):
            req_output[request_id] = output

    async def main():
        tasks = {f"p{i}": asyncio.create_task(generate_step(p, f"p{i}")) for i, p in enumerate(prompts)}
        while len(req_output) < 3 or min(len(o.outputs[0].token_ids) for o in req_output.values()) < 4:
            await asyncio.sleep(0)
        for task in tasks.values():  # cancel(): every partial rollout stops where it is
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        assert not engine.llm.has_unfinished_requests()  # the cancelled streams aborted

    asyncio.run(main())
    assert engine.llm.stats().num_used_blocks == 0
    ref = _llm(llama_dir)
    for i, prompt in enumerate(prompts):
        snap = req_output[f"p{i}"].outputs[0]
        assert 4 <= len(snap.token_ids) < max_model_len - len(prompt) and snap.finish_reason is None
        want = ref.generate(prompt, SamplingParams(temperature=0.0, max_tokens=len(snap.token_ids), logprobs=1))
        want = want[0].outputs[0]
        assert snap.token_ids == want.token_ids  # cumulative: everything up to the cancel
        got_lp = [lps[t].logprob for lps, t in zip(snap.logprobs, snap.token_ids)]
        assert got_lp == pytest.approx(want.token_logprobs, abs=LOGPROB_TOL)


# ---- OpenRLHF -------------------------------------------------------------------------------
class _OpenRLHFEngine:
    """The LLMRayActor of openrlhf/trainer/ray/vllm_engine.py, minus Ray."""

    def __init__(self, **kwargs) -> None:
        engine_args = AsyncEngineArgs(**kwargs)
        self.llm = AsyncLLM.from_engine_args(engine_args)

    async def generate(self, prompt_token_ids, sampling_params):
        prompt = {"prompt_token_ids": prompt_token_ids}  # TokensPrompt(prompt_token_ids=...)
        generator = self.llm.generate(prompt, deepcopy(sampling_params), request_id=uuid.uuid4().hex)
        final_output = None
        async for request_output in generator:
            final_output = request_output
        return final_output

    async def wake_up(self, tags=None):
        for tag in tags or ["weights", "kv_cache"]:
            await self.llm.wake_up(tags=[tag])


async def _openrlhf_agent(actor: _OpenRLHFEngine, conv: int, obs: list[int], sampling_params, max_length: int):
    """MultiTurnAgentExecutor.execute's loop on token ids."""
    obs, turns = list(obs), []
    for turn in range(TURNS):
        sampling_params.max_tokens = max_length - len(obs)
        if sampling_params.max_tokens <= 0:
            break
        request_output = await actor.generate(obs, deepcopy(sampling_params))
        action_tokens = request_output.outputs[0].token_ids
        logprobs = [lp[action_tokens[i]].logprob for i, lp in enumerate(request_output.outputs[0].logprobs)]
        turns.append((action_tokens, logprobs))
        obs = obs + action_tokens + _tool_ids(action_tokens, turn)
    return turns


@pytest.mark.numerics
def test_openrlhf_agents_through_pause_keep_update_and_sleep_equal_running_alone(llama_dir, sd_a):
    actor = _OpenRLHFEngine(
        model=str(llama_dir), dtype="float32", block_size=BLOCK, num_kv_blocks=512, enable_sleep_mode=True
    )
    engine = actor.llm
    max_length = 64
    prompts = [random_prompt(10 + i, seed=500 + i) for i in range(8)]
    # An action ends at a stop token (about 1 token in 10 here) or when max_length is reached.
    stop_token_ids = list(range(3, 384, 10))
    sampling_params = SamplingParams(temperature=0.0, logprobs=0, stop_token_ids=stop_token_ids)
    paused_with = []

    async def broadcast_to_vllm():  # the async trainer's weight sync while agents run
        while engine.llm.stats().num_generated_tokens < 20:
            await asyncio.sleep(0)
        await engine.pause_generation(mode="keep")
        paused_with.append(engine.llm.has_unfinished_requests())
        steps = engine.llm.stats().num_steps
        for _ in range(10):
            await asyncio.sleep(0)
        assert engine.llm.stats().num_steps == steps  # the engine loop idles while paused
        engine.llm.update_weights(sd_a.items())  # same weights: outputs must not move
        await engine.reset_prefix_cache()
        await engine.resume_generation()

    async def batch(ps, trainer=None):
        agents = [_openrlhf_agent(actor, c, p, deepcopy(sampling_params), max_length) for c, p in enumerate(ps)]
        results = await asyncio.gather(*agents, *([trainer] if trainer else []))
        return results[: len(ps)]

    async def main():
        assert await engine.is_sleeping() is False
        first = await batch(prompts[:4], broadcast_to_vllm())
        await engine.sleep(level=1)
        await actor.wake_up()  # OpenRLHF wakes one tag at a time
        second = await batch(prompts[4:])
        return first + second

    got = asyncio.run(main())
    num_turns = []
    assert paused_with == [True] and engine.llm.weight_version == 1
    ref = _llm(llama_dir)
    for c, prompt in enumerate(prompts):
        want = _reference(ref, prompt, lambda n: SamplingParams(
            temperature=0.0, logprobs=0, stop_token_ids=stop_token_ids, max_tokens=max_length - n
        ) if n < max_length else None)
        _assert_turns(got[c], want)
        num_turns.append(len(want))
    assert min(num_turns) >= 2  # every agent really took several turns
    engine.shutdown()
    assert engine.errored


# ---- abort, sleep in flight, output kinds ---------------------------------------------------
@pytest.mark.numerics
def test_abort_one_mid_stream_the_others_run_on(llama_dir):
    engine = AsyncLLM(_llm(llama_dir))
    prompts = {f"r{i}": random_prompt(8 + i, seed=60 + i) for i in range(4)}
    sp = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0)
    outs: dict[str, list] = {rid: [] for rid in prompts}

    async def consume(rid):
        async for out in engine.generate({"prompt_token_ids": prompts[rid]}, sp, rid):
            outs[rid].append(out)
            if rid == "r1" and len(outs[rid]) == 3:
                await engine.abort("r1")

    async def main():
        await asyncio.gather(*(consume(rid) for rid in prompts))

    asyncio.run(main())
    assert engine.llm.stats().num_used_blocks == 0
    ref = _llm(llama_dir)
    for rid, prompt in prompts.items():
        last = outs[rid][-1]
        assert last.finished
        got = last.outputs[0]
        n = 3 if rid == "r1" else 12
        assert got.finish_reason == ("abort" if rid == "r1" else "length") and len(got.token_ids) == n
        want = ref.generate(prompt, SamplingParams(temperature=0.0, max_tokens=n, logprobs=0))[0].outputs[0]
        assert got.token_ids == want.token_ids
        assert got.token_logprobs == pytest.approx(want.token_logprobs, abs=LOGPROB_TOL)


@pytest.mark.numerics
@pytest.mark.parametrize("via", ["methods", "collective_rpc"])
def test_sleep_and_wake_with_requests_in_flight_recompute(llama_dir, via):
    engine = AsyncLLM(_llm(llama_dir))
    prompts = [random_prompt(13 + i, seed=70 + i) for i in range(3)]
    sp = SamplingParams(temperature=0.0, max_tokens=10, logprobs=0)

    async def final(i, prompt):
        last = None
        async for last in engine.generate(prompt, sp, f"s{i}"):
            pass
        return last

    async def trainer():
        while engine.llm.stats().num_generated_tokens < 9:
            await asyncio.sleep(0)
        if via == "methods":
            await engine.sleep(level=1)
        else:
            assert await engine.collective_rpc("sleep", kwargs={"level": 1}) == [None]
        assert await engine.is_sleeping() and engine.llm.has_unfinished_requests()
        steps = engine.llm.stats().num_steps
        for _ in range(10):
            await asyncio.sleep(0)
        assert engine.llm.stats().num_steps == steps  # the loop idles; nothing deadlocks
        if via == "methods":
            await engine.wake_up()
        else:
            await engine.collective_rpc("wake_up")

    async def main():
        *outs, _ = await asyncio.gather(*(final(i, p) for i, p in enumerate(prompts)), trainer())
        return outs

    outs = asyncio.run(main())
    assert engine.llm.stats().num_preemptions >= 1  # they lost their KV and recomputed
    ref = _llm(llama_dir)
    for prompt, out in zip(prompts, outs):
        want = ref.generate(prompt, sp)[0].outputs[0]
        assert out.outputs[0].token_ids == want.token_ids
        assert out.outputs[0].token_logprobs == pytest.approx(want.token_logprobs, abs=LOGPROB_TOL)


@pytest.mark.numerics
def test_output_kinds_and_prompt_forms(llama_dir):
    engine = AsyncLLM(_llm(llama_dir))
    prompt = random_prompt(10, seed=80)

    async def collect(p, sp, rid, **kwargs):
        return [out async for out in engine.generate(p, sp, rid, **kwargs)]

    async def main():
        base = dict(temperature=0.0, max_tokens=5, ignore_eos=True)
        cumulative = await collect({"prompt_token_ids": prompt}, SamplingParams(**base), "c", prompt_text="hi")
        delta = await collect(prompt, SamplingParams(**base, output_kind=RequestOutputKind.DELTA), "d")
        final = await collect(prompt, SamplingParams(**base, output_kind=RequestOutputKind.FINAL_ONLY), "f")
        text = await collect("hello world", SamplingParams(**base), "t")
        return cumulative, delta, final, text

    cumulative, delta, final, text = asyncio.run(main())
    ref = _llm(llama_dir)
    want = ref.generate(prompt, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0].outputs[0].token_ids
    assert [len(o.outputs[0].token_ids) for o in cumulative] == [1, 2, 3, 4, 5]  # vLLM's default
    assert cumulative[-1].outputs[0].token_ids == want and cumulative[-1].prompt == "hi"
    assert [t for o in delta for t in o.outputs[0].token_ids] == want and len(delta) == 5
    assert len(final) == 1 and final[0].finished and final[0].outputs[0].token_ids == want
    want_text = ref.generate("hello world", SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    assert text[-1].prompt_token_ids == want_text.prompt_token_ids
    assert text[-1].outputs[0].token_ids == want_text.outputs[0].token_ids


# ---- what is refused, pause modes, health and lifetime -----------------------------------------
def test_unsupported_calls_raise_not_implemented_and_leave_the_engine_as_it_was(llama_dir):
    engine = AsyncLLM(_llm(llama_dir))
    prompt = {"prompt_token_ids": random_prompt(6, seed=1)}
    sp = SamplingParams(temperature=0.0, max_tokens=3)

    async def first(gen):
        return await gen.__anext__()

    async def main():
        for kwargs in ({"lora_request": object()}, {"priority": 1}, {"data_parallel_rank": 0},
                       {"tokenization_kwargs": {"truncation": True}}):
            with pytest.raises(UnsupportedFeatureError) as info:
                await first(engine.generate(prompt, sp, "x", **kwargs))
            assert isinstance(info.value, NotImplementedError)
        with pytest.raises(NotImplementedError):
            await first(engine.generate({**prompt, "multi_modal_data": {"image": [1]}}, sp, "x"))
        with pytest.raises(TypeError):
            engine.generate(prompt, sp)  # request_id is required, as in vLLM
        # OpenRLHF's weight-sync RPCs have no counterpart: NotImplementedError, as vLLM's callers expect.
        with pytest.raises(NotImplementedError):
            await engine.collective_rpc("update_weight", args=("model.norm.weight", "float32", [64], False))
        with pytest.raises(NotImplementedError):
            await engine.collective_rpc("init_process_group", args=("127.0.0.1", 1, 0, 2, "g", "nccl", False))
        with pytest.raises(NotImplementedError):
            await engine.reset_prefix_cache(reset_running_requests=True)
        assert not engine.llm.has_unfinished_requests() and not await engine.is_paused()
        # An id in use is refused (InvalidRequestError, a ValueError); the first stream goes on
        # and pause_generation's default mode still aborts it.
        long = engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=50), "dup")
        await first(long)
        with pytest.raises(ValueError):
            await first(engine.generate(prompt, sp, "dup"))
        await engine.pause_generation()
        rest = [out async for out in long]
        assert rest[-1].outputs[0].finish_reason == "abort"
        await engine.resume_generation()
        return [out async for out in engine.generate(prompt, sp, "x")]

    outs = asyncio.run(main())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
    with pytest.raises(TypeError):
        AsyncEngineArgs(model=str(llama_dir), worker_extension_cls="my.Worker")  # a vLLM keyword LLM lacks


def test_pause_modes_drain_health_and_shutdown(llama_dir):
    engine = AsyncLLM(_llm(llama_dir))
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    prompts = [random_prompt(7 + i, seed=90 + i) for i in range(3)]

    async def final(i, rid):
        last = None
        async for last in engine.generate(prompts[i], sp, rid):
            pass
        return last

    async def main():
        await engine.check_health()
        assert engine.get_tokenizer() is engine.llm.get_tokenizer() is engine.tokenizer
        assert (await engine.get_model_config()).max_model_len == engine.model_config.max_model_len == 512
        # mode="abort" (vLLM's default) ends the streams in flight, then pauses.
        tasks = [asyncio.create_task(final(i, f"a{i}")) for i in range(2)]
        while engine.llm.stats().num_generated_tokens < 4:
            await asyncio.sleep(0)
        await engine.pause_generation()
        aborted = await asyncio.gather(*tasks)
        assert [o.outputs[0].finish_reason for o in aborted] == ["abort", "abort"] and await engine.is_paused()
        # A request submitted while paused waits; draining it while paused is refused, not a hang.
        waiting = asyncio.create_task(final(2, "w"))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.done()
        with pytest.raises(EngineStateError):
            await engine.wait_for_requests_to_drain()
        await engine.resume_generation()
        await engine.resume_generation()  # a no-op when not paused, as in vLLM
        # mode="wait" lets it finish first.
        await engine.pause_generation(mode="wait")
        assert not engine.llm.has_unfinished_requests() and await engine.is_paused()
        assert (await waiting).outputs[0].finish_reason == "length"
        await engine.resume_generation()
        # wait_for_requests_to_drain returns once the work is done.
        tasks = [asyncio.create_task(final(i, f"d{i}")) for i in range(3)]
        await asyncio.sleep(0)
        await engine.wait_for_requests_to_drain(drain_timeout=60)
        assert not engine.llm.has_unfinished_requests()
        return await asyncio.gather(*tasks)

    drained = asyncio.run(main())
    assert all(o.outputs[0].finish_reason == "length" for o in drained)
    engine.shutdown()
    assert engine.errored and engine.is_stopped and not engine.is_running

    async def after():
        with pytest.raises(EngineStateError):
            await engine.check_health()
        with pytest.raises(EngineStateError):
            await engine.generate(prompts[0], sp, "late").__anext__()

    asyncio.run(after())
