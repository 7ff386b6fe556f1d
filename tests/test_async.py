"""asyncio on CPU: many coroutines share one engine loop (continuous batching across them),
multi-turn tool-calling conversations reuse their KV, streams are cancelled and aborted,
and pause -> update -> resume idles the loop. fp32 greedy, so token lists compare exactly."""

from __future__ import annotations

import asyncio

import pytest
from safetensors.torch import load_file

from rollout import LLM, SamplingParams
from tests.helpers.hf_oracle import random_prompt
from tests.helpers.models import build_model_dir

# Compares numbers across computations: run again with another thread count (.ci/run).
pytestmark = pytest.mark.numerics

BLOCK = 8
TURNS = 3
NUM_CONVERSATIONS = 64
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _llm(path, **kwargs) -> LLM:
    kwargs.setdefault("num_kv_blocks", 2048)  # no eviction: every turn can hit
    return LLM(str(path), dtype="float32", block_size=BLOCK, **kwargs)


def _tool_result(output: list[int], conv: int, turn: int) -> list[int]:
    """A deterministic 'tool call' on what the model said: 4 token ids (never 0..2)."""
    return [3 + (sum(output) + 31 * j + 7 * conv + turn) % 381 for j in range(4)]


async def _conversation(llm: LLM, conv: int, prompt: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """TURNS turns of generate -> tool -> append; returns the final token list and, per
    turn, (prompt length, prefix-cache hit)."""
    tokens, stats = list(prompt), []
    for turn in range(TURNS):
        out = await llm.generate_async(tokens, GREEDY)
        stats.append((len(tokens), out.num_cached_tokens))
        generated = out.outputs[0].token_ids
        await asyncio.sleep(0.001 * (conv % 4))  # the tool takes a while; others keep decoding
        tokens = tokens + generated + _tool_result(generated, conv, turn)
    return tokens, stats


def _conversation_alone(llm: LLM, conv: int, prompt: list[int]) -> list[int]:
    tokens = list(prompt)
    for turn in range(TURNS):
        generated = llm.generate(tokens, GREEDY)[0].outputs[0].token_ids
        tokens = tokens + generated + _tool_result(generated, conv, turn)
    return tokens


@pytest.fixture(scope="module")
def b_dir(tmp_path_factory, tokenizer_dir):
    return build_model_dir("llama", tmp_path_factory.mktemp("llama_b"), tokenizer_dir, seed=1)


def test_64_agents_three_turns_equal_running_alone(llama_dir):
    llm = _llm(llama_dir)
    prompts = [random_prompt(12 + conv % 9, seed=100 + conv) for conv in range(NUM_CONVERSATIONS)]
    max_batch = 0

    async def main():
        nonlocal max_batch
        tasks = [asyncio.create_task(_conversation(llm, c, p)) for c, p in enumerate(prompts)]
        while not all(t.done() for t in tasks):
            max_batch = max(max_batch, llm.stats().num_running)
            await asyncio.sleep(0)
        return [t.result() for t in tasks]

    results = asyncio.run(main())
    assert max_batch >= NUM_CONVERSATIONS // 2  # the agents really shared steps
    hit_blocks = llm.stats().prefix_cache_hit_blocks
    num_output_hits = 0
    for conv, (tokens, stats) in enumerate(results):
        assert stats[0][1] == 0
        prev_len = stats[0][0]
        for turn in range(1, TURNS):
            prompt_len, hit = stats[turn]
            # Every full block of the previous turn's prompt + output (its last token is
            # never computed) is served by the prefix cache, output blocks included.
            computed = prev_len + GREEDY.max_tokens - 1
            assert hit == min(computed // BLOCK, (prompt_len - 1) // BLOCK) * BLOCK, (conv, turn)
            num_output_hits += hit > prev_len  # blocks of generated tokens were reused
            prev_len = prompt_len
    assert num_output_hits >= NUM_CONVERSATIONS // 2
    assert hit_blocks >= NUM_CONVERSATIONS * (TURNS - 1)
    llm.worker.check_invariants()

    alone = _llm(llama_dir)
    for conv in range(0, NUM_CONVERSATIONS):
        assert results[conv][0] == _conversation_alone(alone, conv, prompts[conv]), conv


def test_stream_yields_snapshots_and_cancel_aborts(llama_dir):
    llm = _llm(llama_dir)
    prompt = random_prompt(20, seed=1)
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=0)

    async def main():
        seen = []
        async for out in llm.generate_stream(prompt, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)):
            seen.append(out)
        assert [len(o.outputs[0].token_ids) for o in seen] == [1, 2, 3, 4, 5] and seen[-1].finished

        got = []

        async def consume():
            async for out in llm.generate_stream(prompt, sp, request_id="long"):
                got.append(out)

        task = asyncio.create_task(consume())
        while len(got) < 3:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not llm.has_unfinished_requests()  # the cancelled stream aborted its request
        # A stream closed early aborts too.
        stream = llm.generate_stream(prompt, sp)
        first = await stream.__anext__()
        await stream.aclose()
        assert len(first.outputs[0].token_ids) == 1 and not llm.has_unfinished_requests()
        return seen

    seen = asyncio.run(main())
    llm.worker.check_invariants()
    assert llm.stats().num_used_blocks == 0
    # The loop is started again on a new event loop.
    again = asyncio.run(llm.generate_async(prompt, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)))
    assert again.outputs[0].token_ids == seen[-1].outputs[0].token_ids


def test_abort_from_another_coroutine_ends_the_stream(llama_dir):
    llm = _llm(llama_dir)
    sp = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)

    async def main():
        outs = []
        async for out in llm.generate_stream(random_prompt(9, seed=2), sp, request_id="r"):
            outs.append(out)
            if len(outs) == 4:
                (aborted,) = llm.abort("r")
                assert aborted.outputs[0].finish_reason == "abort"
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs[-1].outputs[0].token_ids) == 4
    assert llm.stats().num_used_blocks == 0


def test_pause_idles_the_loop_update_then_resume(llama_dir, b_dir):
    llm = _llm(llama_dir)
    prompt = random_prompt(25, seed=3)
    sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    sd_b = load_file(b_dir / "model.safetensors")

    async def trainer(agent_task):
        while not llm.stats().num_generated_tokens >= 4:
            await asyncio.sleep(0)
        llm.pause()
        steps = llm.stats().num_steps
        for _ in range(20):  # the loop idles while paused; agents may still submit
            await asyncio.sleep(0)
        assert llm.stats().num_steps == steps and not agent_task.done()
        llm.update_weights(sd_b.items())
        llm.resume()

    async def main():
        agent = asyncio.create_task(llm.generate_async(prompt, sp))
        await trainer(agent)
        return await agent

    out = asyncio.run(main())
    versions = out.outputs[0].token_weight_versions
    k = versions.count(0)
    assert k >= 4 and versions == [0] * k + [1] * (10 - k)
    b = _llm(b_dir)
    ref = b.generate(prompt + out.outputs[0].token_ids[:k], SamplingParams(temperature=0.0, max_tokens=10 - k, ignore_eos=True))
    assert out.outputs[0].token_ids[k:] == ref[0].outputs[0].token_ids


def test_a_failed_step_reaches_every_waiting_coroutine(llama_dir, monkeypatch):
    llm = _llm(llama_dir)
    launch, calls = llm.worker.runner.launch, []

    def flaky(sched):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return launch(sched)

    monkeypatch.setattr(llm.worker.runner, "launch", flaky)
    prompts = [random_prompt(10, seed=i) for i in range(3)]

    async def main():
        return await asyncio.gather(*(llm.generate_async(p, GREEDY) for p in prompts), return_exceptions=True)

    outs = asyncio.run(main())
    assert all(isinstance(o, RuntimeError) and "device lost" in str(o) for o in outs), outs
    assert not llm.has_unfinished_requests()  # their requests were aborted
    assert llm.stats().num_used_blocks == 0
    # The engine keeps working.
    again = asyncio.run(llm.generate_async(prompts[0], GREEDY))
    assert again.outputs[0].token_ids == llm.generate(prompts[0], GREEDY)[0].outputs[0].token_ids
