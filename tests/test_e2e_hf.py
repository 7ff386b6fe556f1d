"""End to end against HF transformers: greedy tokens and logprobs, whatever the schedule.

Every architecture, fp32, CPU. The oracle is ``generate`` run per prompt (no padding) and
one full forward for logprobs; rollout must match it token for token under any block
size, chunking, prefix caching or preemption.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from rollout import LLM, SamplingParams
from tests.helpers.hf_oracle import HFOracle, random_prompt
from tests.helpers.models import VARIANTS

# Compares numbers across computations: run again with another thread count (.ci/run).
pytestmark = pytest.mark.numerics

ARCHS = list(VARIANTS)
NUM_TOKENS = 10
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)


def _llm(path, **kwargs) -> LLM:
    kwargs.setdefault("num_kv_blocks", 256)  # the CPU default would allocate up to 2 GiB
    return LLM(str(path), dtype="float32", **kwargs)


def _ragged_prompts(block_size: int) -> list[list[int]]:
    """Lengths 1, bs - 1, bs, bs + 1, a long prompt, one sharing its first 40 tokens and a
    copy of it (which can hit blocks the first is still prefilling)."""
    lengths = [1, block_size - 1, block_size, block_size + 1, 100]
    prompts = [random_prompt(n, seed=1000 + n) for n in lengths]
    prompts.append(prompts[-1][:40] + random_prompt(9, seed=7))
    prompts.append(list(prompts[4]))
    return prompts


def _check_greedy(oracle: HFOracle, prompts, outs, num_tokens: int = NUM_TOKENS) -> None:
    assert [o.prompt_token_ids for o in outs] == prompts
    for prompt, out in zip(prompts, outs):
        (comp,) = out.outputs
        assert comp.token_ids == oracle.greedy(prompt, num_tokens), f"prompt of {len(prompt)} tokens"
        assert comp.finish_reason == "length"


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_ragged_batch(arch, block_size, model_dirs, hf_oracles):
    prompts = _ragged_prompts(block_size)
    llm = _llm(model_dirs[arch], block_size=block_size, max_num_batched_tokens=32)
    _check_greedy(hf_oracles[arch], prompts, llm.generate(prompts, GREEDY))


# Schedules that must not change a single token: chunk sizes, prefix caching, preemption.
SCHEDULES = {
    "nocache-8192": dict(enable_prefix_caching=False),
    "nocache-16": dict(enable_prefix_caching=False, max_num_batched_tokens=16),
    "cache-7": dict(max_num_batched_tokens=7),
    "cache-33": dict(max_num_batched_tokens=33),
    "cache-8192": dict(max_num_batched_tokens=8192),
    "cache-bs8-7": dict(block_size=8, max_num_batched_tokens=7),
    # KV for about one long sequence (100 + 10 tokens); chunked admission lets several
    # prompts in at once, and their growth can only be served by preempting.
    "preempt-cache": dict(num_kv_blocks=8, max_num_batched_tokens=33),
    "preempt-nocache": dict(num_kv_blocks=8, enable_prefix_caching=False, max_num_batched_tokens=16),
    "preempt-bs4": dict(block_size=4, num_kv_blocks=40, max_num_batched_tokens=16),
}


# Scheduling is architecture-blind: every schedule on an untied Llama and on Qwen3 (qk-norm,
# wider heads); a chunked, a cached and a preempting one on the tied Llama3 and Qwen2.
_SCHEDULE_CASES = [(arch, s) for arch in ("llama", "qwen3") for s in SCHEDULES] + [
    (arch, s) for arch in ("llama3_tied", "qwen2") for s in ("nocache-16", "cache-7", "preempt-cache")
]


@pytest.mark.parametrize("arch, schedule", _SCHEDULE_CASES)
def test_greedy_any_schedule(arch, schedule, model_dirs, hf_oracles):
    kwargs = SCHEDULES[schedule]
    prompts = _ragged_prompts(kwargs.get("block_size", 16))
    llm = _llm(model_dirs[arch], **kwargs)
    # Twice: with caching on, the second pass reads every prompt's prefix from the cache.
    for _ in range(2):
        _check_greedy(hf_oracles[arch], prompts, llm.generate(prompts, GREEDY))
    hit_blocks = llm.stats().prefix_cache_hit_blocks
    if kwargs.get("enable_prefix_caching", True):
        assert hit_blocks > 0
    else:
        assert hit_blocks == 0
    if schedule.startswith("preempt"):
        assert llm.stats().num_preemptions > 0
    llm.worker.check_invariants()
    assert llm.stats().num_used_blocks == 0  # no block still held after the batch


def _check_logprobs(oracle: HFOracle, prompt, out, k: int, prompt_k: int | None) -> None:
    (comp,) = out.outputs
    assert comp.token_ids == oracle.greedy(prompt, NUM_TOKENS)
    lp = oracle.logprobs(prompt + comp.token_ids)  # [len, vocab]; row j predicts token j + 1
    n = len(prompt)
    ref = lp[n - 1 : n - 1 + len(comp.token_ids)]
    expected = ref.gather(-1, torch.tensor(comp.token_ids)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(comp.token_logprobs), expected, atol=1e-4, rtol=0)
    assert comp.cumulative_logprob == pytest.approx(sum(comp.token_logprobs), abs=1e-4)
    assert len(comp.logprobs) == len(comp.token_ids)
    for tok, step, row in zip(comp.token_ids, comp.logprobs, ref):
        assert step[tok].rank == 1  # greedy
        top = row.topk(k)
        assert set(step) == set(top.indices.tolist())
        for tid, val in zip(top.indices.tolist(), top.values.tolist()):
            assert step[tid].logprob == pytest.approx(val, abs=1e-4)
    if prompt_k is None:
        assert out.prompt_logprobs is None
        return
    assert len(out.prompt_logprobs) == n
    assert out.prompt_logprobs[0] is None
    for j in range(1, n):
        entry, row = out.prompt_logprobs[j], lp[j - 1]
        tok = prompt[j]
        assert entry[tok].logprob == pytest.approx(float(row[tok]), abs=1e-4), f"prompt position {j}"
        assert entry[tok].rank == int((row > row[tok]).sum()) + 1
        top_ids = row.topk(prompt_k).indices.tolist()
        assert set(entry) == {tok, *top_ids}


@pytest.mark.parametrize("arch", ARCHS)
def test_logprobs_match_hf(arch, model_dirs, hf_oracles):
    oracle = hf_oracles[arch]
    prompts = [random_prompt(n, seed=2000 + n) for n in (1, 17, 100)]
    # Chunked: the 100-token prompt's prompt logprobs come from four chunks.
    llm = _llm(model_dirs[arch], max_num_batched_tokens=32)
    sp = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    for prompt, out in zip(prompts, llm.generate(prompts, sp)):
        _check_logprobs(oracle, prompt, out, k=3, prompt_k=2)
    # Now cached: a prompt without prompt logprobs hits the cache, one with them is recomputed.
    plain = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=3)
    for prompt, out in zip(prompts, llm.generate(prompts, plain)):
        _check_logprobs(oracle, prompt, out, k=3, prompt_k=None)
    assert llm.generate(prompts[2], plain)[0].num_cached_tokens == 96
    for prompt, out in zip(prompts, llm.generate(prompts, sp)):
        assert out.num_cached_tokens == 0
        _check_logprobs(oracle, prompt, out, k=3, prompt_k=2)


def test_prompt_logprobs_under_preemption(model_dirs, hf_oracles):
    """A prompt preempted mid-prefill is recomputed with other chunk boundaries; its prompt
    logprobs must still cover every position exactly once."""
    arch = "llama"
    prompts = [random_prompt(n, seed=3000 + n) for n in (60, 45, 30, 50)]
    llm = _llm(model_dirs[arch], block_size=4, num_kv_blocks=30, max_num_batched_tokens=13)
    sp = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    outs = llm.generate(prompts, sp)
    assert llm.stats().num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        _check_logprobs(hf_oracles[arch], prompt, out, k=3, prompt_k=2)


def test_string_prompts_and_text(model_dirs, hf_oracles, tokenizer_dir):
    arch = "llama"
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = ["The quick brown fox", "héllo wörld! 世界 🎉", "def add(a, b):\n    return"]
    llm = _llm(model_dirs[arch])
    outs = llm.generate(texts, GREEDY)
    num_exact = 0
    for text, out in zip(texts, outs):
        ids = tok(text).input_ids
        assert out.prompt == text
        assert out.prompt_token_ids == ids
        (comp,) = out.outputs
        assert comp.token_ids == hf_oracles[arch].greedy(ids, NUM_TOKENS)
        # generate's outputs are final-only with no stop strings: the text is decoded once at
        # the end, exactly as the tokenizer decodes the ids (even mid-character).
        assert comp.text == tok.decode(comp.token_ids, skip_special_tokens=True)
        num_exact += 1
    assert num_exact == len(texts)


@pytest.mark.parametrize("arch", ARCHS)
def test_live_module_equals_directory(arch, model_dirs, tokenizer_dir):
    hf = HFOracle(model_dirs[arch]).model  # a private copy: LLM must not need the oracle's
    prompts = _ragged_prompts(16)
    sp = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=2)
    from_dir = _llm(model_dirs[arch]).generate(prompts, sp)
    from_module = LLM(hf, tokenizer=str(tokenizer_dir), dtype="float32", num_kv_blocks=256).generate(prompts, sp)
    for a, b in zip(from_dir, from_module):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].token_logprobs == pytest.approx(b.outputs[0].token_logprobs, abs=1e-6)
        assert a.outputs[0].text == b.outputs[0].text


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_logprobs_close_to_hf_bf16(arch, model_dirs):
    hf = HFOracle(model_dirs[arch], dtype=torch.bfloat16)
    prompts = [random_prompt(n, seed=4000 + n) for n in (5, 17, 40)]
    llm = LLM(str(model_dirs[arch]), dtype="bfloat16", num_kv_blocks=64)
    assert next(llm.model.parameters()).dtype == torch.bfloat16
    sp = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=0)
    diffs = []
    for prompt, out in zip(prompts, llm.generate(prompts, sp)):
        (comp,) = out.outputs
        lp = hf.logprobs(prompt + comp.token_ids)[len(prompt) - 1 : -1]  # along rollout's tokens
        ref = lp.gather(-1, torch.tensor(comp.token_ids)[:, None]).squeeze(-1)
        diffs.append((torch.tensor(comp.token_logprobs) - ref).abs())
    diffs = torch.cat(diffs)
    assert diffs.mean() < 2e-2, diffs
