"""LLM.shutdown on CPU: requests in flight end with "abort", memory is released, every later
call but shutdown/sleep raises EngineStateError, and the context manager shuts down."""

from __future__ import annotations

import asyncio

import pytest
from safetensors.torch import load_file

from rollout import SamplingParams
from rollout.errors import EngineStateError
from tests.helpers.engine_state import GREEDY, PROMPTS, greedy, make_llm

LONG = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def test_shutdown_aborts_requests_and_releases_memory(a_dir):
    llm = make_llm(a_dir)
    rid = llm.add_request(PROMPTS[0], LONG)
    streamed = []
    for _ in range(3):
        streamed += llm.step()
    aborted = llm.shutdown()
    assert llm.memory_usage() == {"weights": {"device": 0, "host": 0}, "kv_cache": {"device": 0, "host": 0}}
    assert not llm.has_unfinished_requests()
    assert llm.worker.runner.graphs is None
    # The aborted request's final output goes to the caller: the tokens it had, "abort".
    (final,) = aborted
    assert final.request_id == rid and final.finished and final.outputs[0].finish_reason == "abort"
    assert streamed and streamed[-1].outputs[0].token_ids == final.outputs[0].token_ids[: len(streamed[-1].outputs[0].token_ids)]
    assert 0 < len(final.outputs[0].token_ids) < LONG.max_tokens
    assert llm.shutdown() == []


def test_shutdown_ends_an_async_stream_with_abort(a_dir):
    llm = make_llm(a_dir)

    async def main():
        outs = []
        async for out in llm.generate_stream(PROMPTS[0], LONG):
            outs.append(out)
            if len(outs) == 2:
                llm.shutdown()
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"


def _after_shutdown_calls(a_dir):
    sd = load_file(str(a_dir / "model.safetensors"))
    return {
        "generate": lambda llm: llm.generate(PROMPTS, GREEDY),
        "score": lambda llm: llm.score([PROMPTS[0]]),
        "add_request": lambda llm: llm.add_request(PROMPTS[0], GREEDY),
        "update_weights": lambda llm: llm.update_weights(sd),
        "load_weights": lambda llm: llm.load_weights(str(a_dir)),
        "wake_up": lambda llm: llm.wake_up(),
    }


@pytest.mark.parametrize("call", ["generate", "score", "add_request", "update_weights", "load_weights", "wake_up"])
def test_calls_after_shutdown_raise(call, a_dir):
    llm = make_llm(a_dir)
    llm.shutdown()
    with pytest.raises(EngineStateError, match="shutdown"):
        _after_shutdown_calls(a_dir)[call](llm)
    llm.shutdown()  # no-ops
    llm.sleep(1)
    assert llm.step() == [] and not llm.has_unfinished_requests()


def test_shutdown_while_asleep_and_context_manager(a_dir, a_out):
    with make_llm(a_dir) as llm:
        assert greedy(llm) == a_out
        llm.sleep(1)
    assert llm.memory_usage()["weights"] == {"device": 0, "host": 0}
    with pytest.raises(EngineStateError):
        llm.generate(PROMPTS, GREEDY)
    # A new engine in the same process is unaffected.
    with make_llm(a_dir) as again:
        assert greedy(again) == a_out
