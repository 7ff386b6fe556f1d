"""Logprob semantics on CPU: ``SamplingParams.logprobs_mode`` ("processed", "scaled",
"raw") and ``LLM.score`` (teacher-forced logprobs reusing cached prefixes), against the
logprobs returned while generating and against HF fp32 logits."""

from __future__ import annotations

import math

import pytest
import torch

from rollout import LLM, SamplingParams
from rollout.engine.sampler import LOGPROBS_MODE_IDS, Sampler, SamplingMetadata
from rollout.errors import InvalidRequestError
from tests.helpers.hf_oracle import processed_logprobs, random_prompt

# Compares numbers across computations: run again with another thread count (.ci/run).
pytestmark = pytest.mark.numerics

MAX_MODEL_LEN = 96


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(str(llama_dir), dtype="float32", num_kv_blocks=128, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def oracle(hf_oracles):
    return hf_oracles["llama"]


def test_score_of_a_generated_sequence_equals_its_logprobs(llm):
    prompt = random_prompt(37, seed=1)
    sp = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=12, logprobs=0, ignore_eos=True)
    (out,) = llm.generate(prompt, sp)
    seqs = [prompt + c.token_ids for c in out.outputs]
    before = llm.stats().prefix_cache_hit_blocks
    scores = llm.score(seqs, prompt_lens=[len(prompt)] * 2)
    # The prompt's full blocks (up to the last prompt token, whose logits are needed) were
    # cached by the generation and reused; the positions scored were computed.
    assert llm.stats().prefix_cache_hit_blocks - before == 2 * ((len(prompt) - 1) // 16)
    for c, s in zip(out.outputs, scores):
        assert len(s) == 12
        assert s == pytest.approx(c.token_logprobs, abs=1e-5)
    # The whole sequence from position 1, with no cached prefix usable: the same tail.
    (full,) = llm.score(seqs[:1])
    assert len(full) == len(seqs[0]) - 1
    assert full[len(prompt) - 1 :] == pytest.approx(scores[0], abs=1e-5)


@pytest.mark.parametrize("mode", ["raw", "scaled", "processed"])
def test_logprobs_modes_match_hf(llm, oracle, mode):
    prompt = random_prompt(20, seed=2)
    t, k = 0.7, 5
    base = dict(temperature=t, top_k=k, seed=3, max_tokens=8, ignore_eos=True, logprobs=3)
    (ref,) = llm.generate(prompt, SamplingParams(**base))  # default mode: processed
    (out,) = llm.generate(prompt, SamplingParams(**base, logprobs_mode=mode))
    c = out.outputs[0]
    assert c.token_ids == ref.outputs[0].token_ids  # the mode never changes what is sampled
    logits = oracle.logits(prompt + c.token_ids)  # row j predicts token j + 1
    for i, (tok, lp) in enumerate(zip(c.token_ids, c.token_logprobs)):
        row = logits[len(prompt) - 1 + i]
        if mode == "raw":
            want = row.double().log_softmax(-1)
        elif mode == "scaled":
            want = (row.double() / t).log_softmax(-1)
        else:
            want, ambiguous = processed_logprobs(row, t, top_k=k)
            assert not ambiguous
        assert lp == pytest.approx(float(want[tok]), abs=1e-4)
        # Rank and top-k come from the same distribution.
        assert c.logprobs[i][tok].rank == int((want > want[tok]).sum()) + 1
        top = sorted((e.logprob for e in c.logprobs[i].values() if e.rank <= 3), reverse=True)
        assert top == pytest.approx(want.topk(3).values.tolist(), abs=1e-4)


def test_score_raw_and_scaled_match_hf(llm, oracle, llama_dir):
    seqs = [random_prompt(n, seed=10 + n) for n in (5, 30, 47, MAX_MODEL_LEN)]
    prompt_lens = [1, 10, 47, 60]
    raw = llm.score(seqs, prompt_lens)
    scaled = llm.score(seqs, prompt_lens, temperature=0.7)
    assert raw[2] == [] == scaled[2]  # nothing after the prompt
    for seq, p, r, s in zip(seqs, prompt_lens, raw, scaled):
        logits = oracle.logits(seq).double()
        targets = torch.tensor(seq[p:])
        want_raw = logits[p - 1 : -1].log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        want_scaled = (logits[p - 1 : -1] / 0.7).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        assert r == pytest.approx(want_raw.tolist(), abs=1e-4)
        assert s == pytest.approx(want_scaled.tolist(), abs=1e-4)
    # Chunked prefill and small blocks: the same numbers.
    small = LLM(str(llama_dir), dtype="float32", num_kv_blocks=128, block_size=4, max_num_batched_tokens=16, max_model_len=MAX_MODEL_LEN)
    again = small.score(seqs, prompt_lens)
    for a, b in zip(again, raw):
        assert a == pytest.approx(b, abs=1e-5)


def test_sampler_reports_the_mode_asked_for():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen) * 3
    temperature = torch.tensor([0.5, 0.0, 2.0, 0.8])
    md = dict(
        temperature=temperature, top_k=torch.tensor([3, 3, 3, 0]), top_p=None, min_p=None,
        generators={i: torch.Generator().manual_seed(i) for i in range(4)}, default_generator=None,
        all_greedy=False, max_num_logprobs=2, banned_token_ids={3: [int(logits[3].argmax())]},
    )
    base = Sampler()(logits, SamplingMetadata(**md))
    md["generators"] = {i: torch.Generator().manual_seed(i) for i in range(4)}
    modes = ["raw", "scaled", "scaled", "scaled"]
    out = Sampler()(logits, SamplingMetadata(**md, logprobs_mode=torch.tensor([LOGPROBS_MODE_IDS[m] for m in modes])))
    assert torch.equal(out.sampled_token_ids, base.sampled_token_ids)
    tok = out.sampled_token_ids
    want = [
        logits[0].log_softmax(-1),  # raw
        logits[1].log_softmax(-1),  # greedy: untempered
        (logits[2] / 2.0).log_softmax(-1),  # temperature only: no top-k
        (logits[3] / 0.8).log_softmax(-1),  # no ban either
    ]
    for i in range(4):
        assert float(out.sampled_logprobs[i]) == pytest.approx(float(want[i][tok[i]]), abs=1e-5)
        assert out.topk_logprobs[i].tolist() == pytest.approx(want[i].topk(2).values.tolist(), abs=1e-5)


def test_score_and_mode_bad_input(llm):
    ok = random_prompt(10, seed=5)
    cases = [
        (([],), "sequences"),
        (([[]],), r"sequences\[0\]"),
        ((ok,), "sequences"),  # one flat sequence: must be wrapped
        (([ok, [5] * (MAX_MODEL_LEN + 1)],), r"sequences\[1\]"),
        (([[5, 1000]],), r"sequences\[0\]"),
        (([ok], [0]), r"prompt_lens\[0\]"),
        (([ok], [11]), r"prompt_lens\[0\]"),
        (([ok], [1, 2]), "prompt_lens"),
        (([ok], None, 0.0), "temperature"),
        (([ok], None, math.nan), "temperature"),
        (([ok], None, True), "temperature"),
    ]
    for args, field in cases:
        with pytest.raises(InvalidRequestError, match=field):
            llm.score(*args)
    with pytest.raises(InvalidRequestError, match="logprobs_mode"):
        SamplingParams(logprobs_mode="logits")
    with pytest.raises(InvalidRequestError, match="output_kind"):
        SamplingParams(output_kind="sometimes")
    assert not llm.has_unfinished_requests()
    assert len(llm.score([ok])[0]) == 9  # still works
