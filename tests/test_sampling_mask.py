"""Truncation replay: ``SamplingParams(return_sampling_mask=True)`` and the trainer's side.

- Each generated token's ``SamplingMask`` is the kept set of temperature + min-p + top-k +
  top-p, checked against those filters applied to HF's fp32 logits (the fast engine and HF
  differ by reduction order, so positions within 1e-6 of a filter's threshold are skipped
  and the smallest kept logit is compared within 1e-5); the sampled token is always kept.
- In exact mode the trainer's ``ExactForward.token_logprobs(..., sampling_masks=...)``
  equals the engine's processed logprobs bitwise (and without the masks it does not: the
  bias the replay removes), with gradients.
- Masks travel like logprobs: n > 1, DELTA outputs, preemption and recompute.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from rollout import LLM, RequestOutputKind, SamplingMask, SamplingParams
from rollout.engine.sampler import Sampler, SamplingMetadata
from rollout.errors import InvalidRequestError
from rollout.outputs import MAX_KEPT_IDS
from tests.helpers.hf_oracle import processed_logprobs, random_prompt
from trainers_integration.exact import ExactForward

pytestmark = pytest.mark.numerics

# One per filter and mixes; the last keeps more than MAX_KEPT_IDS tokens of the 384.
FILTERS = [
    dict(temperature=0.8, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.7, min_p=0.05, top_k=20, top_p=0.9),
    dict(temperature=2.0, top_k=50, top_p=0.5),
    dict(temperature=0, top_k=3, top_p=0.9),  # greedy: its maximum only
    dict(temperature=3.0, top_p=0.995),
]
# How close (absolute) HF's and the fast engine's scaled fp32 logits are: reduction order only.
LOGIT_TOL = 1e-5


@pytest.fixture(scope="module")
def llm(model_dirs):
    return LLM(str(model_dirs["llama"]), dtype="float32", num_kv_blocks=128)


def _kept_ref(row: torch.Tensor, sp: SamplingParams) -> tuple[set[int], bool]:
    """The kept set of the filters on HF's logits ``row`` [vocab] and whether a token sits
    within fp32 noise of a threshold."""
    ref, ambiguous = processed_logprobs(row, sp.temperature, sp.min_p, sp.top_k, sp.top_p)
    return set(torch.nonzero(ref > float("-inf")).squeeze(1).tolist()), ambiguous


def test_masks_match_the_filters_on_hf_logits(llm, hf_oracles):
    oracle = hf_oracles["llama"]
    prompts = [random_prompt(n, seed=200 + n) for n in (6, 21, 34)]
    batch, params = [], []
    for i, kw in enumerate(FILTERS):
        for j, prompt in enumerate(prompts):
            batch.append(prompt)
            params.append(SamplingParams(**kw, seed=10 * i + j, max_tokens=8, ignore_eos=True, return_sampling_mask=True))
    # A row that does not ask, in the same batch: nothing for it.
    outs = llm.generate(batch + [prompts[0]], params + [SamplingParams(top_k=5, max_tokens=4, seed=1)])
    assert outs[-1].outputs[0].sampling_masks is None
    num_checked = num_steps = num_large = 0
    for prompt, sp, out in zip(batch, params, outs):
        (comp,) = out.outputs
        assert len(comp.sampling_masks) == len(comp.token_ids) == 8
        logits = oracle.logits(prompt + comp.token_ids)[len(prompt) - 1 : -1]  # [8, vocab]
        for tok, mask, row in zip(comp.token_ids, comp.sampling_masks, logits):
            assert isinstance(mask, SamplingMask)
            assert (mask.kept_token_ids is None) == (mask.num_kept > MAX_KEPT_IDS)
            if mask.kept_token_ids is not None:
                assert len(set(mask.kept_token_ids)) == mask.num_kept and tok in mask.kept_token_ids
            num_steps += 1
            if sp.temperature == 0:  # greedy: the maximum (HF's logits have no exact tie here)
                assert mask.num_kept == 1 and mask.kept_token_ids == [tok] == [int(row.argmax())]
                assert mask.min_kept_logit == pytest.approx(float(row.max()), abs=LOGIT_TOL)
                continue
            scaled = row / sp.temperature  # [vocab] fp32
            assert float(scaled[tok]) >= mask.min_kept_logit - LOGIT_TOL, "sampled outside the kept set"
            want, ambiguous = _kept_ref(row, sp)
            if ambiguous:
                continue
            num_checked += 1
            assert mask.num_kept == len(want), sp
            assert mask.min_kept_logit == pytest.approx(float(scaled[sorted(want)].min()), abs=LOGIT_TOL)
            if mask.kept_token_ids is not None:
                assert set(mask.kept_token_ids) == want
                order = scaled[mask.kept_token_ids]  # most likely first (up to fp32 noise)
                assert bool((order[:-1] >= order[1:] - LOGIT_TOL).all())
            else:
                num_large += 1
                # The trainer's threshold rule on HF's logits gives the same set, up to tokens
                # within fp32 noise of the threshold (HF's logits are not the engine's bits).
                def above(t: float) -> set[int]:
                    return set(torch.nonzero(scaled >= t).squeeze(1).tolist())

                assert above(mask.min_kept_logit + LOGIT_TOL) <= want <= above(mask.min_kept_logit - LOGIT_TOL)
    assert num_checked >= 0.85 * num_steps * (len(FILTERS) - 1) / len(FILTERS)
    assert num_large >= 8, "no token kept more than MAX_KEPT_IDS: the large case went untested"


def test_sampler_masks_on_the_device_rows_that_ask_only():
    """Straight at the sampler: a greedy row with an exact tie keeps both tied tokens; rows
    not in mask_rows cost nothing and the fused path is not taken while a row asks."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, -1.0], [0.1, 0.2, 2.0, 1.0, -3.0], [0.0, 0.0, 0.0, 0.0, 5.0]])
    md = SamplingMetadata(
        temperature=torch.tensor([0.0, 0.5, 1.0]), top_k=torch.tensor([0, 2, 0]), top_p=None, min_p=None,
        generators={}, default_generator=torch.Generator().manual_seed(0), all_greedy=False,
        max_num_logprobs=None, banned_token_ids={}, mask_rows=torch.tensor([0, 1]),
    )
    called = []
    out = Sampler(fused_sample=lambda *a, **k: called.append(1))(logits, md)
    assert not called
    m = out.masks
    assert m.num_kept.tolist() == [2, 2]
    assert m.min_kept.tolist() == [3.0, 2.0]  # greedy row untempered; row 1: 1.0 / 0.5
    assert set(m.top_ids[0, :2].tolist()) == {1, 2} and m.top_ids[1, :2].tolist() == [2, 3]
    assert m.top_ids.shape == (2, 5)  # min(MAX_KEPT_IDS, vocab)
    md.mask_rows = None
    assert Sampler()(logits, md).masks is None


def _exact(model_dir, **kw) -> LLM:
    kw.setdefault("num_kv_blocks", 64)
    return LLM(str(model_dir), dtype="float32", batch_invariant=True, **kw)


EXACT_PROMPTS = [list(range(5, 45)), [100, 200, 300], list(range(7, 30))]
EXACT_PARAMS = [
    SamplingParams(temperature=0.8, top_k=5, max_tokens=10, logprobs=0, seed=1, return_sampling_mask=True),
    SamplingParams(temperature=1.3, top_p=0.8, max_tokens=10, logprobs=0, seed=2, return_sampling_mask=True, n=2),
    SamplingParams(temperature=1.0, min_p=0.1, top_k=40, top_p=0.95, max_tokens=10, logprobs=0, seed=3,
                   return_sampling_mask=True),
    SamplingParams(temperature=3.0, top_p=0.995, max_tokens=10, logprobs=0, seed=4, return_sampling_mask=True),
]


def _result(out):
    return [(c.token_ids, c.token_logprobs, c.sampling_masks) for c in out.outputs]


@pytest.fixture(scope="module")
def exact_alone(model_dirs):
    """Each (prompt, params) pair generated alone on a fresh exact-mode engine."""
    return [
        _result(_exact(model_dirs["llama"]).generate([p], sp)[0])
        for p in EXACT_PROMPTS for sp in EXACT_PARAMS
    ]


def test_trainer_replays_the_truncation_bitwise(model_dirs, exact_alone):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dirs["llama"]), dtype=torch.float32)
    fwd = ExactForward.for_module(hf)
    params = dict(hf.named_parameters())
    cases = [(p, sp) for p in EXACT_PROMPTS for sp in EXACT_PARAMS]
    num_large = 0
    for j, sp in enumerate(EXACT_PARAMS):
        seqs, plens, masks, want = [], [], [], []
        for (prompt, sp_i), res in zip(cases, exact_alone):
            if sp_i is not sp:
                continue
            for ids, lps, m in res:
                seqs.append(prompt + ids)
                plens.append(len(prompt))
                masks.append(m)
                want.append(lps)
                num_large += sum(x.kept_token_ids is None for x in m)
        got = fwd.token_logprobs(params, seqs, plens, temperature=sp.temperature, sampling_masks=masks)
        assert [g.tolist() for g in got] == want, sp
        # Without the replay: the full softmax at T, not what was sampled from.
        plain = fwd.token_logprobs(params, seqs, plens, temperature=sp.temperature)
        assert all(p.tolist() != w for p, w in zip(plain, want)), sp
        assert all(bool((p <= g).all()) for p, g in zip(plain, got))  # truncation raises the kept probs
        if j == 0:  # gradients flow through the replayed logprobs
            hf.zero_grad()
            sum(g.sum() for g in got).backward()
            grads = [p.grad for p in hf.parameters()]
            assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
            assert any(bool((g != 0).any()) for g in grads)
    assert num_large > 0, "the threshold form (more than MAX_KEPT_IDS kept) went untested"


def test_masks_are_the_same_in_batches_with_preemption(model_dirs, exact_alone):
    cases = [(p, sp) for p in EXACT_PROMPTS for sp in EXACT_PARAMS]
    layout = {"block_size": 4, "num_kv_blocks": 20, "max_num_batched_tokens": 16, "enable_prefix_caching": False}
    llm = _exact(model_dirs["llama"], **layout)
    outs = llm.generate([p for p, _ in cases], [sp for _, sp in cases])
    assert llm.stats().num_preemptions > 0, "the layout meant to force preemption did not"
    for out, want in zip(outs, exact_alone):
        assert _result(out) == want


def test_delta_outputs_carry_the_new_masks_only(model_dirs, exact_alone):
    llm = _exact(model_dirs["llama"])
    i = 1  # EXACT_PROMPTS[0] with EXACT_PARAMS[1] (n=2)
    prompt, sp = EXACT_PROMPTS[0], EXACT_PARAMS[1]
    delta = SamplingParams(**{**vars(sp), "output_kind": RequestOutputKind.DELTA})
    rid = llm.add_request(prompt, delta)
    other = llm.add_request(EXACT_PROMPTS[2], EXACT_PARAMS[0])  # another request decoding alongside
    ids = {0: [], 1: []}
    masks = {0: [], 1: []}
    for _ in range(200):
        for out in llm.step():
            if out.request_id != rid:
                continue
            for c in out.outputs:
                assert len(c.sampling_masks) == len(c.token_ids)
                ids[c.index] += c.token_ids
                masks[c.index] += c.sampling_masks
        if not llm.has_unfinished_requests():
            break
    assert other is not None
    assert [(ids[k], masks[k]) for k in (0, 1)] == [(t, m) for t, _, m in exact_alone[i]]


def test_penalties_are_refused_and_masks_checked():
    for kw in (dict(repetition_penalty=1.2), dict(presence_penalty=0.5), dict(frequency_penalty=-0.3)):
        with pytest.raises(InvalidRequestError, match="return_sampling_mask") as e:
            SamplingParams(return_sampling_mask=True, **kw)
        assert "penalty" in str(e.value) and "replay" in str(e.value)
    with pytest.raises(InvalidRequestError, match="return_sampling_mask"):
        SamplingParams(return_sampling_mask=1)
    sp = SamplingParams(return_sampling_mask=True)
    sp.presence_penalty = 0.5  # changed after construction: refused again on submission
    with pytest.raises(InvalidRequestError):
        sp.validate()


def test_penalties_after_construction_are_refused_on_submission(llm):
    sp = SamplingParams(return_sampling_mask=True, max_tokens=2)
    sp.repetition_penalty = 1.3
    with pytest.raises(InvalidRequestError, match="return_sampling_mask"):
        llm.generate([[5, 6, 7]], sp)
    assert not llm.has_unfinished_requests()


def test_bad_trainer_masks_are_typed(model_dirs):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dirs["llama"]), dtype=torch.float32)
    fwd = ExactForward.for_module(hf)
    params = dict(hf.named_parameters())
    ok = SamplingMask(2, 0.0, [3, 4])
    for bad in ([[ok]], [[ok, ok, ok]], [[ok, "mask"]], [[ok, SamplingMask(1, 0.0, [384])]], "masks"):
        with pytest.raises(InvalidRequestError, match="sampling_masks"):
            fwd.token_logprobs(params, [[1, 2, 3, 4]], [2], sampling_masks=bad)
    got = fwd.token_logprobs(params, [[1, 2, 3, 4]], [2], sampling_masks=[None])[0]
    assert got.tolist() == fwd.token_logprobs(params, [[1, 2, 3, 4]], [2])[0].tolist()
