"""KV sizing by memory utilisation runs the largest step once first (on platforms that ask
for it); the run must work for every architecture and leave the engine's state untouched."""

from __future__ import annotations

import pytest

from rollout import LLM, SamplingParams
from rollout.config import CacheConfig
from rollout.engine.worker import kv_blocks_for


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_profile_run_then_generate(model_dirs, arch, monkeypatch):
    llm = LLM(str(model_dirs[arch]), dtype="float32", num_kv_blocks=32, max_num_batched_tokens=64, max_num_seqs=8)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    before = llm.generate([[5, 6, 7]], greedy)[0].outputs[0].token_ids
    calls = []
    runner = llm.worker.runner
    monkeypatch.setattr(runner, "profile_run", lambda orig=runner.profile_run: (calls.append(1), orig())[1])
    monkeypatch.setattr(llm.platform, "profile_before_kv_sizing", True)
    monkeypatch.setattr(llm.platform, "kv_cache_budget", lambda device, util: 32 * runner.kv_bytes_per_block())
    num = kv_blocks_for(CacheConfig(), runner, llm.platform, llm.device)
    assert calls and num == 32
    assert llm.generate([[5, 6, 7]], greedy)[0].outputs[0].token_ids == before
