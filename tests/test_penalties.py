"""Repetition, presence and frequency penalties: the kernel against its reference, and the
engine against HF transformers (repetition: ``generate``'s processor; presence/frequency:
an explicit greedy loop over HF logits with the OpenAI formula), including the cases where
the history is easy to get wrong: the token sampled by the step still in flight, preemption
and recompute, chunked prefill, prefix-cache hits, n > 1 samples and mixed batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rollout import LLM, SamplingParams
from rollout.kernels.penalties import apply_penalties_ref
from tests.helpers.engine_state import LOGPROB_TOL
from tests.helpers.hf_oracle import random_prompt

# Compares numbers across computations: run again with another thread count (.ci/run).
pytestmark = pytest.mark.numerics

EOS = 2


def _llm(path, **kwargs) -> LLM:
    kwargs.setdefault("num_kv_blocks", 128)  # the CPU default would allocate up to 2 GiB
    return LLM(str(path), dtype="float32", **kwargs)


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return _llm(llama_dir)


@pytest.fixture(scope="module")
def hf(hf_oracles):
    return hf_oracles["llama"].model


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=kw.pop("max_tokens", 16), ignore_eos=True, **kw)


def _penalised(logits: torch.Tensor, prompt: list[int], output: list[int], rep=1.0, pres=0.0, freq=0.0) -> torch.Tensor:
    """The OpenAI/vLLM formula on one fp32 row, written out per token: repetition on every
    token of the prompt or the output, then ``- freq * count - pres * (count > 0)``."""
    x = logits.clone()
    counts = torch.bincount(torch.tensor(output, dtype=torch.int64), minlength=x.shape[0])
    for t in set(prompt) | set(output):
        x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    x = x - freq * counts.float()
    return x - pres * (counts > 0).float()


def _reference(hf, prompt: list[int], num_tokens: int, **pen) -> tuple[list[int], list[float]]:
    """Greedy decoding over HF fp32 logits (one full forward per token) with the penalties
    applied by ``_penalised``: (tokens, log_softmax of the penalised logits at each token)."""
    out, lps = [], []
    with torch.no_grad():
        for _ in range(num_tokens):
            logits = hf(torch.tensor([prompt + out])).logits[0, -1].float()
            x = _penalised(logits, prompt, out, **pen)
            tok = int(x.argmax())
            lps.append(float(x.log_softmax(-1)[tok]))
            out.append(tok)
    return out, lps


# ---- the kernels ---------------------------------------------------------------------------
def _kernel_case(seed: int, num_reqs: int = 5, vocab: int = 1500, max_rows: int = 7):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_reqs, vocab, generator=gen) * 3
    logits[:, :10] = 0.0  # zero logits: divided or multiplied, still zero
    logits[0, 20] = float("-inf")  # a banned-looking entry stays -inf
    counts = torch.randint(0, 4, (max_rows, vocab), generator=gen, dtype=torch.int32)
    counts[torch.rand(max_rows, vocab, generator=gen) < 0.7] = 0
    prompt_mask = torch.rand(max_rows, vocab, generator=gen) < 0.2
    idx = torch.tensor([0, 2, 4])
    rows = torch.tensor([6, 1, 3])
    values = torch.tensor([[1.3, 0.7, 1.0], [0.5, -2.0, 0.0], [1.0, 0.25, -1.5]])  # rep, pres, freq
    return logits, idx, rows, values, counts, prompt_mask


def test_reference_is_the_formula():
    logits, idx, rows, values, counts, prompt_mask = _kernel_case(0)
    got = logits.clone()
    apply_penalties_ref(got, idx, rows, values, counts, prompt_mask)
    for j, (i, r) in enumerate(zip(idx.tolist(), rows.tolist())):
        x = logits[i].clone()
        seen = (counts[r] > 0) | prompt_mask[r]
        rep, pres, freq = values[:, j].tolist()
        for t in seen.nonzero().flatten().tolist():
            x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
        x = x - freq * counts[r].float() - pres * (counts[r] > 0).float()
        torch.testing.assert_close(got[i], x, rtol=1e-6, atol=1e-6)
    untouched = [i for i in range(logits.shape[0]) if i not in idx.tolist()]
    assert torch.equal(got[untouched], logits[untouched])


def _interpreted() -> bool:
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(tl.sum, InterpretedFunction)


# Triton reads TRITON_INTERPRET when it is imported (see tests/test_triton_kernels.py): on a
# machine with a GPU this process compiles, so the interpreter cases run in a child process.
interpreted = pytest.mark.skipif(not _interpreted(), reason="runs in the interpreter child (test_kernel_in_interpreter)")


@interpreted
@pytest.mark.parametrize("seed", [0, 1])
def test_triton_kernel_matches_reference_interp(seed):
    from rollout.kernels.triton_penalties import apply_penalties

    logits, idx, rows, values, counts, prompt_mask = _kernel_case(seed)
    want = logits.clone()
    apply_penalties_ref(want, idx, rows, values, counts, prompt_mask)
    got = logits.clone()
    apply_penalties(got, idx, rows, values, counts, prompt_mask)
    # Bitwise: the same fp32 operations in the same order, no fused multiply-add.
    assert torch.equal(got, want)
    # No penalised row: nothing launched, nothing changed.
    empty = logits.clone()
    apply_penalties(empty, idx[:0], rows[:0], values[:, :0], counts, prompt_mask)
    assert torch.equal(empty, logits)


@interpreted
def test_fused_sampler_path_with_penalties_interp():
    """The one-pass sampler path (Triton sampling and penalty kernels) against the torch
    path on the same penalised step: the same tokens, logprobs within fp32 rounding."""
    from rollout.engine.sampler import PenaltyMetadata, Sampler, SamplingMetadata
    from rollout.kernels.triton_penalties import apply_penalties
    from rollout.kernels.triton_sampling import rank_tokens, sample_tokens

    logits, idx, rows, values, counts, prompt_mask = _kernel_case(2)
    md = SamplingMetadata(
        temperature=torch.zeros(logits.shape[0]), top_k=None, top_p=None, min_p=None, generators={},
        default_generator=None, all_greedy=True, max_num_logprobs=0, banned_token_ids={1: [5]},
        penalties=PenaltyMetadata(idx, rows, torch.ones_like(idx), values, counts, prompt_mask),
    )
    fused = Sampler(sample_tokens, rank_tokens, apply_penalties)(logits, md)
    torch_path = Sampler()._torch(logits, md)
    unpenalised = Sampler()._torch(logits, SamplingMetadata(**{**md.__dict__, "penalties": None}))
    assert torch.equal(fused.sampled_token_ids, torch_path.sampled_token_ids)
    assert not torch.equal(torch_path.sampled_token_ids, unpenalised.sampled_token_ids)
    torch.testing.assert_close(fused.sampled_logprobs, torch_path.sampled_logprobs, atol=1e-5, rtol=0)
    assert torch.equal(fused.sampled_ranks, torch_path.sampled_ranks)


def test_kernel_in_interpreter():
    """The interpreter cases, in a fresh process with TRITON_INTERPRET=1 (when this one is not)."""
    pytest.importorskip("triton")
    if _interpreted():
        pytest.skip("this process already runs them")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-k", "interp and not test_kernel_in",
           "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.strip().splitlines()[-1], proc.stdout[-3000:]


# ---- the engine against HF -----------------------------------------------------------------
PROMPTS = [random_prompt(12, seed=s) for s in (1, 2, 3)]


def _hf_generate(hf, prompt: list[int], num_tokens: int, rep: float) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
            max_new_tokens=num_tokens, do_sample=False, repetition_penalty=rep, pad_token_id=0,
            eos_token_id=EOS,
        )
    ids = out[0, len(prompt) :].tolist()
    return ids[: ids.index(EOS) + 1] if EOS in ids else ids


@pytest.mark.parametrize("rep", [1.5, 0.8])
def test_repetition_penalty_matches_hf_generate(llm, hf, rep):
    sp = SamplingParams(temperature=0.0, max_tokens=24, repetition_penalty=rep)
    outs = llm.generate(PROMPTS, sp)
    plain = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24))
    for prompt, out, base in zip(PROMPTS, outs, plain):
        got = out.outputs[0].token_ids
        assert got == _hf_generate(hf, prompt, 24, rep)
        assert _hf_generate(hf, prompt, 24, 1.0) == base.outputs[0].token_ids
    # The penalty changes what greedy picks, so the comparison above can fail.
    assert all(o.outputs[0].token_ids != b.outputs[0].token_ids for o, b in zip(outs, plain))


@pytest.mark.parametrize("pen", [
    dict(pres=1.0), dict(freq=0.7), dict(pres=-0.5, freq=1.5), dict(rep=1.3, pres=0.4, freq=0.6),
], ids=["presence", "frequency", "both", "all_three"])
def test_presence_frequency_match_reference(llm, hf, pen):
    sp = _greedy(max_tokens=20, logprobs=0, repetition_penalty=pen.get("rep", 1.0),
                 presence_penalty=pen.get("pres", 0.0), frequency_penalty=pen.get("freq", 0.0))
    outs = llm.generate(PROMPTS, sp)
    plain = llm.generate(PROMPTS, _greedy(max_tokens=20))
    for prompt, out in zip(PROMPTS, outs):
        want_ids, want_lps = _reference(hf, prompt, 20, **pen)
        comp = out.outputs[0]
        assert comp.token_ids == want_ids
        # The processed logprobs are log_softmax of the penalised logits. Engine and HF fp32
        # logits differ by reduction order (~1e-5, see test_e2e_hf's 1e-4); the penalties
        # scale a logit by at most 1.3 and subtract exactly the same amounts on both sides,
        # so the difference stays of that order: the same 1e-4 as the unpenalised checks.
        torch.testing.assert_close(torch.tensor(comp.token_logprobs), torch.tensor(want_lps), atol=1e-4, rtol=0)
    assert any(o.outputs[0].token_ids != b.outputs[0].token_ids for o, b in zip(outs, plain))


def test_scaled_and_raw_logprobs_carry_no_penalty(llm, hf):
    prompt = PROMPTS[0]
    pen = dict(rep=1.5, pres=1.0, freq=1.0)
    want_ids, _ = _reference(hf, prompt, 12, **pen)
    for mode in ("raw", "scaled"):
        sp = _greedy(max_tokens=12, logprobs=0, logprobs_mode=mode, repetition_penalty=1.5,
                     presence_penalty=1.0, frequency_penalty=1.0)
        (out,) = llm.generate([prompt], sp)
        comp = out.outputs[0]
        assert comp.token_ids == want_ids  # still drawn from the penalised distribution
        lp = hf(torch.tensor([prompt + want_ids])).logits[0].float().log_softmax(-1).detach()
        n = len(prompt)
        raw = lp[n - 1 : n - 1 + len(want_ids)].gather(-1, torch.tensor(want_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(comp.token_logprobs), raw, atol=1e-4, rtol=0)


# ---- the history: in flight, mixed batches, preemption, prefix hits, n > 1 -------------------
def _reacts_to_previous_token(hf, prompt: list[int], num_tokens: int, pen: dict) -> list[int]:
    """Steps j of the penalised reference whose token would have been the previous step's
    token, new to the history, had that token not been counted: only a penalty that sees
    the token sampled by the step right before picks correctly there."""
    out, _ = _reference(hf, prompt, num_tokens, **pen)
    steps = []
    with torch.no_grad():
        for j in range(1, num_tokens):
            prev = out[j - 1]
            if prev in prompt or prev in out[: j - 1]:
                continue
            logits = hf(torch.tensor([prompt + out[:j]])).logits[0, -1].float()
            if int(_penalised(logits, prompt, out[: j - 1], **pen).argmax()) == prev:
                steps.append(j)
    return steps


def test_penalty_sees_the_token_still_in_flight(llama_dir, hf):
    """Step N+1's sampling metadata is built before step N's token is read back: the
    penalty must still count that token. The prompt is chosen so that some step's greedy
    token would repeat the previous one unless that previous token is penalised."""
    pen = dict(rep=3.0)
    prompt = next(p for p in (random_prompt(6, seed=200 + s) for s in range(40))
                  if _reacts_to_previous_token(hf, p, 16, pen))
    engine = _llm(llama_dir)
    runner = engine.worker.runner
    in_flight = []  # per step with penalised rows: did each have a token in flight?
    host_inputs = runner.penalties.host_inputs

    def spy(rows, params, completes):
        sent = host_inputs(rows, params, completes)
        if sent:
            in_flight.append(bool((runner.batch.pending_idx_cpu[sent["penalty_rows"][1]] >= 0).all()))
        return sent

    runner.penalties.host_inputs = spy
    (out,) = engine.generate([prompt], _greedy(max_tokens=16, repetition_penalty=pen["rep"]))
    assert out.outputs[0].token_ids == _reference(hf, prompt, 16, **pen)[0]
    # Every decode step (all but the prompt's) ran while its input token was in flight.
    assert len(in_flight) == 16 and not in_flight[0] and all(in_flight[1:])


MIXED = [
    _greedy(logprobs=0, repetition_penalty=1.4),
    _greedy(logprobs=0),
    SamplingParams(temperature=1.0, seed=11, max_tokens=16, ignore_eos=True, logprobs=0, presence_penalty=1.5,
                   frequency_penalty=0.5),
    SamplingParams(temperature=0.8, seed=12, max_tokens=16, ignore_eos=True, logprobs=0),
    _greedy(logprobs=0, frequency_penalty=-1.0, top_k=5),
    SamplingParams(temperature=1.0, seed=13, max_tokens=16, ignore_eos=True, logprobs=0, repetition_penalty=0.9,
                   top_p=0.9),
]


def test_mixed_batch_equals_each_row_alone(llm):
    prompts = [random_prompt(5 + 3 * i, seed=30 + i) for i in range(len(MIXED))]
    batch = llm.generate(prompts, MIXED)
    for prompt, sp, got in zip(prompts, MIXED, batch):
        (alone,) = llm.generate([prompt], sp)
        assert got.outputs[0].token_ids == alone.outputs[0].token_ids
        assert got.outputs[0].token_logprobs == pytest.approx(alone.outputs[0].token_logprobs, abs=LOGPROB_TOL)


def test_no_penalties_cost_nothing(llama_dir):
    engine = _llm(llama_dir)
    runner = engine.worker.runner
    calls, staged = [], set()
    apply, send = runner.sampler.apply_penalties, runner.staging.send
    runner.sampler.apply_penalties = lambda *a: (calls.append(1), apply(*a))[1]
    runner.staging.send = lambda tensors: (staged.update(tensors), send(tensors))[1]
    engine.generate(PROMPTS, [_greedy(), SamplingParams(temperature=1.0, max_tokens=8, seed=3), _greedy(top_k=3)])
    # No table, nothing staged, no launch.
    assert not calls and runner.penalties.output_counts is None and not staged & {"penalty_rows", "penalty_values"}
    engine.generate(PROMPTS, [_greedy(), _greedy(presence_penalty=0.5), _greedy()])
    assert len(calls) == 16  # one per step, on the penalised row only


def test_preemption_and_chunked_prefill_keep_the_history(llm, llama_dir):
    """Requests preempted after 20-30 outputs are recomputed in 16-token chunks: their
    outputs must come back as outputs (counted), not as prompt. Tokens alone rarely show a
    lost history on this model (a repeat must be the argmax), so the processed logprobs are
    compared too: their normaliser sums over every penalised token, and a history that
    loses outputs moves it by 0.06-3 here, against a layout drift of ~6e-6 (LOGPROB_TOL)."""
    prompts = [random_prompt(8, seed=60 + i) for i in range(3)]
    sps = [_greedy(max_tokens=40, logprobs=0, frequency_penalty=2.0, presence_penalty=2.0),
           SamplingParams(temperature=1.0, seed=5, max_tokens=40, ignore_eos=True, logprobs=0,
                          presence_penalty=2.0, frequency_penalty=2.0),
           _greedy(max_tokens=40, logprobs=0, repetition_penalty=1.3, presence_penalty=1.0)]
    want = llm.generate(prompts, sps)
    for num_blocks in (18, 24):  # 4-token blocks: 72 or 96 slots for three sequences of 48
        tight = _llm(llama_dir, block_size=4, num_kv_blocks=num_blocks, max_num_batched_tokens=16,
                     enable_prefix_caching=False)
        penalties = tight.worker.runner.penalties
        resumed = []  # outputs of each row re-added with outputs already (after preemption)
        add_rows = penalties.add_rows

        def spy(batch, rows):
            resumed.extend(int(batch.num_tokens_cpu[r]) - batch.states[r].num_prompt_tokens for r in rows)
            add_rows(batch, rows)

        penalties.add_rows = spy
        got = tight.generate(prompts, sps)
        assert tight.stats().num_preemptions > 0 and max(resumed) >= 20
        for g, w in zip(got, want):
            assert g.outputs[0].token_ids == w.outputs[0].token_ids
            assert g.outputs[0].token_logprobs == pytest.approx(w.outputs[0].token_logprobs, abs=LOGPROB_TOL)


def test_prefix_cache_hits_and_n_samples(llama_dir, hf):
    engine = _llm(llama_dir)
    prompt = random_prompt(40, seed=50)  # spans several 16-token blocks
    sp = SamplingParams(n=3, temperature=1.0, seed=21, max_tokens=16, ignore_eos=True, logprobs=0,
                        repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5)
    (first,) = engine.generate([prompt], sp)  # the samples share the prompt's blocks
    hits = engine.stats().prefix_cache_hit_blocks
    (again,) = engine.generate([prompt], sp)  # now the prompt's blocks come from the cache
    assert engine.stats().prefix_cache_hit_blocks > hits
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in first.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) == 3
    for i, comp in enumerate(first.outputs):
        (alone,) = _llm(llama_dir).generate([prompt], sp.for_sample(i))  # no cache, n=1
        assert comp.token_ids == alone.outputs[0].token_ids
        assert comp.token_logprobs == pytest.approx(alone.outputs[0].token_logprobs, abs=LOGPROB_TOL)
    # Greedy samples with penalties, served from the cache: each one the reference.
    pen = dict(pres=1.0, freq=0.5)
    (greedy,) = engine.generate([prompt], _greedy(n=2, presence_penalty=1.0, frequency_penalty=0.5))
    want = _reference(hf, prompt, 16, **pen)[0]
    assert [c.token_ids for c in greedy.outputs] == [want, want]
