"""Sampler against straightforward per-row references (CPU, no model)."""

from __future__ import annotations

import math

import pytest
import torch

from rollout.engine.sampler import (
    Sampler,
    SamplingMetadata,
    apply_min_p,
    apply_top_k_top_p,
    gather_logprobs,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _md(n, temperature=1.0, top_k=None, top_p=None, min_p=None, generators=None,
        default_seed=0, k=None, banned=None) -> SamplingMetadata:
    def col(v, dtype):
        if v is None:
            return None
        return torch.tensor(v if isinstance(v, list) else [v] * n, dtype=dtype)

    temp = col(temperature, torch.float32)
    return SamplingMetadata(
        temperature=temp, top_k=col(top_k, torch.int64), top_p=col(top_p, torch.float32),
        min_p=col(min_p, torch.float32), generators=generators or {},
        default_generator=_gen(default_seed), all_greedy=bool((temp == 0).all()),
        max_num_logprobs=k, banned_token_ids=banned or {},
    )


def _ref_keep(logits, temperature=None, top_k=None, top_p=None, min_p=None) -> torch.Tensor:
    """Kept-token mask [num_reqs, vocab], one row at a time in float64 with sorted probs."""
    keep = torch.ones(logits.shape, dtype=torch.bool)
    for i, row in enumerate(logits.double()):
        t = 1.0 if temperature is None or temperature[i] == 0 else float(temperature[i])
        x = row / t
        if min_p is not None:
            p = x.softmax(-1)
            keep[i] &= p >= float(min_p[i]) * p.max()
        if top_k is not None and 0 < top_k[i] < len(x):
            kth = x.masked_fill(~keep[i], -math.inf).sort(descending=True).values[int(top_k[i]) - 1]
            keep[i] &= x >= kth
        if top_p is not None and top_p[i] < 1:
            p = x.masked_fill(~keep[i], -math.inf).softmax(-1)
            p_sorted, order = p.sort(descending=True)
            cum, n_keep = 0.0, 0
            while cum < float(top_p[i]):  # smallest prefix reaching top_p
                cum += float(p_sorted[n_keep])
                n_keep += 1
            nucleus = torch.zeros_like(keep[i])
            nucleus[order[:n_keep]] = True
            keep[i] &= nucleus
    return keep


def _ref_logprobs(logits, keep, temperature) -> torch.Tensor:
    t = torch.where(temperature == 0, 1.0, temperature)[:, None]
    return (logits.float() / t).masked_fill(~keep, -math.inf).log_softmax(-1)


def test_greedy_is_argmax_with_raw_logprob():
    logits = torch.randn(6, 50, generator=_gen(1)).to(torch.bfloat16)
    out = Sampler()(logits, _md(6, temperature=0.0, k=3))
    raw = logits.float().log_softmax(-1)
    assert torch.equal(out.sampled_token_ids, logits.float().argmax(-1))
    assert out.sampled_logprobs.dtype == torch.float32
    torch.testing.assert_close(out.sampled_logprobs, raw.max(-1).values)
    assert (out.sampled_ranks == 1).all()
    torch.testing.assert_close(out.topk_logprobs, raw.topk(3).values)
    # Greedy rows in a mixed batch stay untempered.
    out = Sampler()(logits.float(), _md(6, temperature=[0.0, 0.5] * 3))
    assert torch.equal(out.sampled_token_ids[::2], logits.float().argmax(-1)[::2])
    torch.testing.assert_close(out.sampled_logprobs[::2], raw.max(-1).values[::2])


def test_seeded_row_uses_its_generator_stream():
    logits = torch.randn(3, 100, generator=_gen(2))
    out = Sampler()(logits, _md(3, temperature=0.7, generators={1: _gen(42)}))
    q = torch.empty(100).exponential_(generator=_gen(42))
    assert out.sampled_token_ids[1] == ((logits[1] / 0.7).softmax(-1) / q).argmax()


def _stream(rows: list[tuple[int, torch.Tensor]], steps: int = 8) -> dict[int, list[int]]:
    """Sample ``steps`` times; rows are (seed or -1 for unseeded, logits [vocab])."""
    gens = {i: _gen(seed) for i, (seed, _) in enumerate(rows) if seed >= 0}
    logits = torch.stack([r for _, r in rows])
    tokens = {seed: [] for seed, _ in rows if seed >= 0}
    for _ in range(steps):
        out = Sampler()(logits, _md(len(rows), generators=gens))
        for i, (seed, _) in enumerate(rows):
            if seed >= 0:
                tokens[seed].append(int(out.sampled_token_ids[i]))
    return tokens


def test_seeded_stream_independent_of_batch_and_global_rng():
    flat = torch.zeros(1000)  # uniform: any two streams differ with overwhelming probability
    other = torch.randn(1000, generator=_gen(3))
    rng_before = torch.get_rng_state()
    alone = _stream([(7, flat)])
    batched = _stream([(-1, other), (7, flat), (8, flat), (-1, flat)])
    reordered = _stream([(8, flat), (-1, other), (7, flat)])
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert alone[7] == batched[7] == reordered[7]
    assert batched[8] == reordered[8]
    assert batched[7] != batched[8]
    assert _stream([(7, flat)]) == alone


def test_min_p_matches_reference():
    logits = torch.randn(8, 64, generator=_gen(4)) * 3
    min_p = torch.tensor([0.0, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0, 0.0])
    got = torch.isfinite(apply_min_p(logits, min_p))
    assert torch.equal(got, _ref_keep(logits, min_p=min_p))
    assert apply_min_p(logits, None) is logits


def test_top_k_matches_reference():
    logits = torch.randn(6, 64, generator=_gen(5))
    logits[5, :10] = 2.0  # ties at the boundary are kept
    top_k = torch.tensor([0, 1, 5, 64, 1000, 3])
    got = torch.isfinite(apply_top_k_top_p(logits, top_k, None))
    assert torch.equal(got, _ref_keep(logits, top_k=top_k))
    assert got[0].all() and got[4].all() and got[5].sum() == 10
    assert torch.isfinite(apply_top_k_top_p(logits, torch.zeros(6, dtype=torch.long), None)).all()


def test_top_p_and_combined_match_reference():
    logits = torch.randn(6, 64, generator=_gen(6)) * 2
    logits[0, 0] = 200.0  # other probs underflow to 0 in fp32; top_p = 1 must still keep them
    top_p = torch.tensor([1.0, 0.9, 0.5, 1e-9, 0.73, 0.99])  # 1 - 1e-9 rounds to 1 in fp32
    got = torch.isfinite(apply_top_k_top_p(logits, None, top_p))
    assert torch.equal(got, _ref_keep(logits, top_p=top_p))
    assert got[3].sum() == 1 and got[0].all()
    # Exact boundary: uniform over 4, the top 2 reach top_p = 0.5 exactly and suffice.
    uniform = apply_top_k_top_p(torch.zeros(1, 4), None, torch.tensor([0.5]))
    assert torch.isfinite(uniform).sum() == 2
    top_k = torch.tensor([5, 0, 10, 0, 3, 20])
    got = torch.isfinite(apply_top_k_top_p(logits, top_k, top_p))
    assert torch.equal(got, _ref_keep(logits, top_k=top_k, top_p=top_p))


def test_sampler_filters_logprobs_and_ranks():
    n, vocab = 6, 40
    logits = torch.randn(n, vocab, generator=_gen(7)) * 2
    temp, top_k = [0.0, 0.5, 1.0, 1.5, 0.8, 1.0], [0, 5, 0, 10, 3, 0]
    top_p, min_p = [1.0, 0.9, 0.6, 1.0, 0.8, 1.0], [0.0, 0.0, 0.05, 0.1, 0.0, 0.0]
    md = _md(n, temp, top_k, top_p, min_p, generators={2: _gen(9)}, k=vocab)
    keep = _ref_keep(logits, md.temperature, md.top_k, md.top_p, md.min_p)
    ref = _ref_logprobs(logits, keep, md.temperature)
    sampler = Sampler()
    for _ in range(50):
        out = sampler(logits, md)
        rows = torch.arange(n)
        assert keep[rows, out.sampled_token_ids].all()
        torch.testing.assert_close(out.sampled_logprobs, ref[rows, out.sampled_token_ids])
        ref_ranks = (ref > ref[rows, out.sampled_token_ids][:, None]).sum(-1) + 1
        assert torch.equal(out.sampled_ranks, ref_ranks)
    # Full-vocab top logprobs: finite exactly on the kept set, values from the reference.
    assert torch.equal(torch.isfinite(out.topk_logprobs).sum(-1), keep.sum(-1))
    torch.testing.assert_close(out.topk_logprobs, ref.gather(-1, out.topk_token_ids))
    assert (out.topk_logprobs[:, :-1] >= out.topk_logprobs[:, 1:]).all()


def _frequencies(logits, steps=5, rows=4000, **kw) -> torch.Tensor:
    md = _md(rows, **kw)  # one default generator carried across steps
    batch = logits.expand(rows, -1)
    counts = torch.zeros(logits.shape[-1])
    for _ in range(steps):
        counts += torch.bincount(Sampler()(batch, md).sampled_token_ids, minlength=len(counts))
    return counts / counts.sum()


def test_sampling_frequencies():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0])
    freq = _frequencies(logits, temperature=0.7)
    torch.testing.assert_close(freq, (logits / 0.7).softmax(-1), atol=0.015, rtol=0)
    freq = _frequencies(logits, top_k=3)
    assert (freq[3:] == 0).all()
    torch.testing.assert_close(freq[:3], logits[:3].softmax(-1), atol=0.015, rtol=0)
    p = logits.softmax(-1)  # [0.40, 0.25, 0.15, 0.09, 0.05] nucleus 0.6 -> 2 tokens
    freq = _frequencies(logits, top_p=0.6)
    assert (freq[2:] == 0).all()
    torch.testing.assert_close(freq[:2], p[:2] / p[:2].sum(), atol=0.015, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_banned_tokens(temperature):
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    md = _md(2, temperature=temperature, k=4, banned={0: [0, 1], 1: [3]})
    keep = torch.tensor([[False, False, True, True], [True, True, True, False]])
    ref = logits.masked_fill(~keep, -math.inf).log_softmax(-1)
    for _ in range(30):
        out = Sampler()(logits, md)
        rows = torch.arange(2)
        assert keep[rows, out.sampled_token_ids].all()
        torch.testing.assert_close(out.sampled_logprobs, ref[rows, out.sampled_token_ids])
    assert out.topk_logprobs[0, 2:].isinf().all() and out.topk_logprobs[1, 3].isinf()
    if temperature == 0.0:
        assert out.sampled_token_ids[0] == 2
    assert torch.equal(logits[0], torch.tensor([5.0, 4.0, 1.0, 0.0]))  # input untouched


def test_gather_logprobs():
    logprobs = torch.tensor([[-0.5, -1.5, -3.0, -1.0], [-2.0, -0.2, -2.0, -4.0]])
    token_ids = torch.tensor([1, 2])
    lp, ranks, ids, top = gather_logprobs(logprobs, token_ids, 2)
    assert torch.equal(lp, torch.tensor([-1.5, -2.0]))
    assert torch.equal(ranks, torch.tensor([3, 2]))  # a tie takes the better rank
    assert torch.equal(ids[0], torch.tensor([0, 3])) and ids[1, 0] == 1 and ids[1, 1] in (0, 2)
    assert torch.equal(top, torch.tensor([[-0.5, -1.0], [-0.2, -2.0]]))
    assert gather_logprobs(logprobs, token_ids, 0)[2:] == (None, None)


def test_fused_path_is_taken_only_without_filters_and_matches_the_torch_path():
    """A fused one-pass sampler (here a torch stand-in with the kernel's contract) serves
    temperature-only steps and gives the same tokens and logprobs as the full path."""
    from rollout.engine.sampler import SamplingMetadata

    calls = []

    def stand_in(logits, temperature, noise, seed=None):
        calls.append(seed)
        t = torch.where(temperature < 1e-5, 1.0, temperature)[:, None]
        lp = (logits.float() / t).log_softmax(-1)
        tok = torch.where(temperature < 1e-5, lp.argmax(-1), (lp - noise.log()).argmax(-1) if noise is not None else lp.argmax(-1))
        return tok, lp.gather(-1, tok[:, None]).squeeze(-1)

    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    def md(**kw):
        base = dict(temperature=torch.tensor([0.0, 0.7, 1.0, 1.3, 1.0]), top_k=None, top_p=None, min_p=None,
                    generators={i: torch.Generator().manual_seed(i) for i in range(5)}, default_generator=None,
                    all_greedy=False, max_num_logprobs=None, banned_token_ids={3: [int(logits[3].argmax())]})
        base.update(kw)
        return SamplingMetadata(**base)
    fused = Sampler(stand_in)(logits, md(max_num_logprobs=0))
    ref = Sampler()(logits, md(max_num_logprobs=0))
    assert calls == [None] and torch.equal(fused.sampled_token_ids, ref.sampled_token_ids)
    torch.testing.assert_close(fused.sampled_logprobs, ref.sampled_logprobs)
    assert torch.equal(fused.sampled_ranks, ref.sampled_ranks)
    # No logprobs asked for: no rank pass.
    assert Sampler(stand_in)(logits, md()).sampled_ranks is None
    # No row with its own generator: the kernel gets a seed to draw the noise itself.
    calls.clear()
    Sampler(stand_in)(logits, md(generators={}, noise_seed=1234))
    assert calls == [1234]
    calls.clear()
    Sampler(stand_in)(logits, md(top_k=torch.tensor([0, 3, 0, 0, 0])))
    Sampler(stand_in)(logits, md(max_num_logprobs=2))
    assert not calls
