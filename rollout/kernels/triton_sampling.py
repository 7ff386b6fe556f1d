"""Filter-free sampling in one pass over the vocab, Triton. Reference: ``engine.sampler.Sampler``.

For the common RL case (no top-k, top-p or min-p on any row) the sampler's work reduces to
per row, with ``z = logits / T``:

* random rows (``T >= 1e-5``): the exponential race ``argmax(softmax(z) / q)``, computed
  as ``argmax(logits - T * log q)`` (the same token: no normaliser needed, no per-token
  division), and its logprob ``z[tok] - logsumexp(z)``;
* greedy rows (``T < 1e-5``): ``argmax(logits)`` and its logprob under the *untempered*
  ``log_softmax(logits)``.

Both need only running maxima and a running sum of exponentials, so one streaming pass
over the vocab suffices: no full-vocab sort, no materialised probs or logprobs. The vocab is
split across programs (``num_splits`` per row, so a small batch still fills the GPU); each
program keeps per-lane online state (max logit, sum of exp, best race score, its token and
its logit; one exp and one log per token) and a second tiny kernel merges a row's splits.
Measured on an H100 (CUDA graph, bf16 logits + fp32 noise, vocab 151936): 87 us for 256
rows, about 2.7 TB/s; 4 us for one row.

The caller's contract (it must fall back to the torch sampler otherwise):

* no row uses top-k, top-p or min-p; this kernel applies none of them;
* banned tokens are already masked to ``-inf`` in ``logits``;
* ``noise`` is the sampler's ``q ~ Exp(1)`` [num_reqs, vocab] fp32, drawn per request from
  its own generator (so seeding stays per request); values are clamped to fp32 ``tiny``
  here as in the sampler. ``noise=None`` is allowed only when every row is greedy;
* each row has at least one finite logit (else its logprob is NaN, as in torch);
* only the sampled token's logprob comes back: ranks and top-k logprobs need the full
  distribution, which is exactly what this path avoids.

Ties resolve to the lowest token id, as ``torch.argmax``. The race in log space matches
the sampler's ``softmax(z) / q`` up to fp32 rounding, so the two can pick different tokens
only when two race scores agree to ~1e-7.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Same threshold as the sampler's (and SamplingParams.greedy): below it a row is greedy.
GREEDY_EPS = 1e-5
_FP32_TINY = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny
_INT32_MAX = 2**31 - 1
_BLOCK_V = 1024
_PROGRAMS_PER_SM = 16  # target occupancy of the split pass
_NUM_WARPS = 8  # with _BLOCK_V = 1024: 4 tokens per thread per step (tuned on H100)


# A new seed or batch size every step must not mean a new compilation (ints are
# specialised on "== 1" and "% 16 == 0").
@triton.jit(do_not_specialize=["seed", "num_reqs", "num_splits", "blocks_per_split"])
def _sample_tokens_kernel(
    logits_ptr,  # [num_reqs, vocab] bf16/fp16/fp32
    temperature_ptr,  # [num_reqs] fp32; < GREEDY_EPS: greedy row
    noise_ptr,  # [num_reqs, vocab] fp32 Exp(1); read only if NOISE == 1
    partial_ptr,  # [4, num_reqs, num_splits] fp32: max logit, sum of exp, best score, its logit
    partial_idx_ptr,  # [num_reqs, num_splits] int32: token id of the best score
    token_ptr,  # [num_reqs] int64; written only if FINAL
    logprob_ptr,  # [num_reqs] fp32; written only if FINAL
    logits_row_stride,
    noise_row_stride,
    num_reqs,
    vocab,
    num_splits,
    greedy_eps,
    tiny,
    seed,  # Philox seed of the in-kernel noise (NOISE == 2)
    blocks_per_split,  # a run-time loop bound: one compilation serves every batch size
    NOISE: tl.constexpr,  # 0: none (all rows greedy), 1: from noise_ptr, 2: drawn here
    FINAL: tl.constexpr,  # num_splits == 1: write the result, skip the combine kernel
    BLOCK_V: tl.constexpr,
):
    # Everything is kept in raw logits x, never divided by T per element:
    #   race:    argmax(x / T - log q) == argmax(x - T * log q)        (T > 0)
    #   logprob: (x_tok - max x) / T - log(sum exp((x - max x) / T))
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    temperature = tl.load(temperature_ptr + row)
    is_random = temperature >= greedy_eps
    temperature = tl.where(is_random, temperature, 1.0)  # greedy rows report untempered logprobs
    exp2_scale = 1.4426950408889634 / temperature  # exp(d / T) == exp2(d * exp2_scale)
    log2_scale = temperature * 0.6931471805599453  # T * log(q) == log2(q) * log2_scale
    noise_end = tl.where(is_random, vocab, 0)  # greedy rows never read their noise

    lanes = tl.arange(0, BLOCK_V)
    start = split * (blocks_per_split * BLOCK_V)  # this split's first token id
    # Per-lane online state; a lane sees tokens start + lane, start + lane + BLOCK_V, ...
    run_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_V], tl.float32)  # sum of exp((x - run_max) / T)
    best_score = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_idx = start + lanes  # ties at -inf (fully masked) resolve to the first token
    best_x = tl.full([BLOCK_V], float("-inf"), tl.float32)
    for i in range(blocks_per_split):
        offs = start + i * BLOCK_V + lanes
        mask = offs < vocab
        x = tl.load(logits_ptr + row * logits_row_stride + offs, mask=mask, other=float("-inf"))
        x = x.to(tl.float32)
        if NOISE == 1:
            q = tl.load(noise_ptr + row * noise_row_stride + offs, mask=offs < noise_end, other=1.0)
            score = x - tl.log2(tl.maximum(q, tiny)) * log2_scale
        elif NOISE == 2:
            # q = -ln(u), u ~ U[0, 1) from Philox: no noise tensor written and read back.
            # One Philox call gives four uniforms, one per token of a run of four (token t
            # takes output t % 4 of the call at (seed, row * ceil(vocab / 4) + t // 4)):
            # Philox's ten rounds per call, not the memory, bounded this kernel when each
            # token took its own call. u = 0 gives q = inf, a score of -inf.
            quad = row * tl.cdiv(vocab, 4) + (start + i * BLOCK_V) // 4 + tl.arange(0, BLOCK_V // 4)
            u0, u1, u2, u3 = tl.rand4x(seed, quad.to(tl.int32))
            u = tl.interleave(tl.interleave(u0, u2), tl.interleave(u1, u3))  # token 4j + k: u_k[j]
            q = -tl.log2(u) * 0.6931471805599453
            q = tl.where(offs < noise_end, q, 1.0)
            score = x - tl.log2(tl.maximum(q, tiny)) * log2_scale
        else:
            score = x
        better = score > best_score  # strict: the earlier token keeps a tie
        best_score = tl.where(better, score, best_score)
        best_idx = tl.where(better, offs, best_idx)
        best_x = tl.where(better, x, best_x)
        # One exp per element: rescale the old sum when x is a new max, else add exp(x - max).
        # A finite floor on the max keeps -inf - -inf (NaN) out: e is 0 for x = -inf, and
        # for the first finite x the empty sum (0) is rescaled by a finite e.
        e = tl.exp2(-tl.abs(x - tl.maximum(run_max, -1e30)) * exp2_scale)
        run_sum = tl.where(x > run_max, run_sum * e + 1.0, run_sum + e)
        run_max = tl.maximum(run_max, x)

    # Reduce the lanes. A lane still at -inf has run_sum 0, so the safe max keeps it at 0.
    m = tl.max(run_max, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(run_sum * tl.exp2((run_max - m_safe) * exp2_scale), axis=0)
    top = tl.max(best_score, axis=0)
    idx = tl.min(tl.where(best_score == top, best_idx, 2147483647), axis=0)
    x_top = tl.max(tl.where(best_idx == idx, best_x, float("-inf")), axis=0)
    if FINAL:
        tl.store(token_ptr + row, idx.to(tl.int64))
        tl.store(logprob_ptr + row, (x_top - m) / temperature - tl.log(s))
    else:
        part = row * num_splits + split
        plane = num_reqs * num_splits
        tl.store(partial_ptr + part, m)
        tl.store(partial_ptr + plane + part, s)
        tl.store(partial_ptr + 2 * plane + part, top)
        tl.store(partial_ptr + 3 * plane + part, x_top)
        tl.store(partial_idx_ptr + part, idx)


@triton.jit(do_not_specialize=["num_reqs", "num_splits"])
def _sample_tokens_combine_kernel(
    partial_ptr,  # [4, num_reqs, num_splits] fp32
    partial_idx_ptr,  # [num_reqs, num_splits] int32
    temperature_ptr,  # [num_reqs] fp32
    token_ptr,  # [num_reqs] int64
    logprob_ptr,  # [num_reqs] fp32
    num_reqs,
    num_splits,
    greedy_eps,
    BLOCK_S: tl.constexpr,  # >= num_splits, a power of two (fixed per vocab size)
):
    row = tl.program_id(0).to(tl.int64)
    temperature = tl.load(temperature_ptr + row)
    temperature = tl.where(temperature >= greedy_eps, temperature, 1.0)
    offs = tl.arange(0, BLOCK_S)
    mask = offs < num_splits
    part = row * num_splits + offs
    plane = num_reqs * num_splits
    run_max = tl.load(partial_ptr + part, mask=mask, other=float("-inf"))
    run_sum = tl.load(partial_ptr + plane + part, mask=mask, other=0.0)
    score = tl.load(partial_ptr + 2 * plane + part, mask=mask, other=float("-inf"))
    x = tl.load(partial_ptr + 3 * plane + part, mask=mask, other=float("-inf"))
    idx = tl.load(partial_idx_ptr + part, mask=mask, other=2147483647)

    m = tl.max(run_max, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(run_sum * tl.exp((run_max - m_safe) / temperature), axis=0)
    top = tl.max(score, axis=0)
    best = tl.min(tl.where(score == top, idx, 2147483647), axis=0)  # lowest id among ties
    x_top = tl.max(tl.where(idx == best, x, float("-inf")), axis=0)
    tl.store(token_ptr + row, best.to(tl.int64))
    tl.store(logprob_ptr + row, (x_top - m) / temperature - tl.log(s))


def _default_num_splits(num_reqs: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    return triton.cdiv(_PROGRAMS_PER_SM * num_sms, num_reqs)


def sample_tokens(
    logits: torch.Tensor,  # [num_reqs, vocab] bf16/fp16/fp32, banned tokens already -inf
    temperature: torch.Tensor,  # [num_reqs] fp32; 0 (< 1e-5) for greedy rows
    noise: torch.Tensor | None,  # [num_reqs, vocab] fp32 Exp(1); None: all greedy, or ``seed``
    num_splits: int | None = None,  # vocab splits per row; None: enough to fill the GPU
    seed: int | None = None,  # with noise=None: draw q ~ Exp(1) in the kernel (Philox)
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sampled_token_ids [num_reqs] int64, sampled_logprobs [num_reqs] fp32)``.

    Only valid when no row has top-k, top-p or min-p (see the module docstring). With
    ``seed`` and no ``noise`` the exponential noise is drawn inside the kernel from Philox
    (output ``token % 4`` of the call at ``(seed, row * ceil(vocab / 4) + token // 4)``):
    the same seed gives the same tokens, whatever the split count, and no
    [num_reqs, vocab] noise tensor is written and read (for steps with no seeded request)."""
    num_reqs, vocab = logits.shape
    assert num_reqs * triton.cdiv(vocab, 4) < _INT32_MAX or seed is None, "Philox offsets are int32"
    assert temperature.shape == (num_reqs,) and temperature.dtype == torch.float32
    assert 0 < vocab < _INT32_MAX - _BLOCK_V
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    temperature = temperature.contiguous()
    if noise is not None:
        assert noise.shape == logits.shape and noise.dtype == torch.float32, (noise.shape, noise.dtype)
        if noise.stride(-1) != 1:
            noise = noise.contiguous()
    device = logits.device
    token_ids = torch.empty(num_reqs, dtype=torch.int64, device=device)
    logprobs = torch.empty(num_reqs, dtype=torch.float32, device=device)
    if num_reqs == 0:
        return token_ids, logprobs

    num_blocks = triton.cdiv(vocab, _BLOCK_V)
    if num_splits is None:
        num_splits = _default_num_splits(num_reqs, device)
    num_splits = max(1, min(num_splits, num_blocks))
    blocks_per_split = triton.next_power_of_2(triton.cdiv(num_blocks, num_splits))
    num_splits = triton.cdiv(num_blocks, blocks_per_split)  # no split starts past the vocab
    final = num_splits == 1
    partial = torch.empty((4, num_reqs, num_splits) if not final else (1,), dtype=torch.float32, device=device)
    partial_idx = torch.empty((num_reqs, num_splits) if not final else (1,), dtype=torch.int32, device=device)
    _sample_tokens_kernel[(num_reqs, num_splits)](
        logits, temperature, logits if noise is None else noise, partial, partial_idx,
        token_ids, logprobs,
        logits.stride(0), 0 if noise is None else noise.stride(0),
        num_reqs, vocab, num_splits, GREEDY_EPS, _FP32_TINY, 0 if seed is None else seed, blocks_per_split,
        NOISE=1 if noise is not None else (2 if seed is not None else 0),
        FINAL=final,
        BLOCK_V=_BLOCK_V,
        num_warps=_NUM_WARPS,
    )
    if not final:
        _sample_tokens_combine_kernel[(num_reqs,)](
            partial, partial_idx, temperature, token_ids, logprobs, num_reqs, num_splits, GREEDY_EPS,
            # Sized for the most splits the vocab allows, not this step's count: one compiled
            # variant serves every batch size instead of one per power of two as the batch
            # shrinks (each compiled mid-rollout on a cold cache).
            BLOCK_S=triton.next_power_of_2(num_blocks),
            num_warps=1,
        )
    return token_ids, logprobs


@triton.jit
def _rank_tokens_kernel(
    logits_ptr,  # [num_reqs, vocab] bf16/fp16/fp32
    temperature_ptr,  # [num_reqs] fp32; < GREEDY_EPS: greedy row (untempered)
    token_ptr,  # [num_reqs] int64
    rank_ptr,  # [num_reqs] int64
    logits_row_stride,
    vocab,
    greedy_eps,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    temperature = tl.load(temperature_ptr + row)
    temperature = tl.where(temperature >= greedy_eps, temperature, 1.0)
    base = logits_ptr + row * logits_row_stride
    tok = tl.load(token_ptr + row)
    # The same fp32 division as the sampler's ``logits.float() / T``: identical comparisons.
    v = tl.load(base + tok).to(tl.float32) / temperature
    count = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, vocab, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32) / temperature
        count += (x > v).to(tl.int32)
    tl.store(rank_ptr + row, tl.sum(count, axis=0).to(tl.int64) + 1)


def rank_tokens(logits: torch.Tensor, temperature: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """1-based rank [num_reqs] int64 of ``token_ids`` under ``logits / T`` (greedy rows:
    untempered): one more than the tokens strictly more likely. One read of the logits;
    the sampler's torch path materialises the tempered fp32 logits for the same count."""
    num_reqs, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    ranks = torch.empty(num_reqs, dtype=torch.int64, device=logits.device)
    if num_reqs:
        _rank_tokens_kernel[(num_reqs,)](
            logits, temperature.contiguous(), token_ids.contiguous(), ranks, logits.stride(0), vocab, GREEDY_EPS,
            BLOCK_V=2048, num_warps=8,
        )
    return ranks
