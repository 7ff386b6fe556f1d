"""Every Triton kernel against its torch reference.

Small shapes run under the Triton interpreter on CPU tensors, on any machine; real shapes
run compiled on a CUDA GPU (``gpu`` marker, skipped elsewhere).

Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a function, and its own
library (``tl.sum``, ``tl.max``...) is decorated when triton is first imported. So a process
is either interpreted from its start or not at all, whatever sets the variable later.
``test_kernels_in_interpreter`` therefore reruns this module's interpreter cases in a
child pytest with TRITON_INTERPRET=1; in the parent they are skipped, and in the child
(or in a run started with TRITON_INTERPRET=1 for per-case reports) they run directly.
Nothing here changes this process's environment.

bf16/fp16 results are checked to two ulps (rotary: bitwise): the kernels round their
intermediates where the references do, through ``triton_utils.round_as``, which also
sidesteps the interpreter's own fp32 -> bf16 cast (it truncates; the GPU rounds to even)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from rollout.engine.sampler import (  # noqa: E402
    _GREEDY_EPS,
    Sampler,
    SamplingMetadata,
    _exponential_noise,
)
from rollout.kernels import (  # noqa: E402
    triton_activation,
    triton_layernorm,
    triton_rotary,
    triton_sampling,
)
from rollout.kernels.activation import silu_and_mul_ref  # noqa: E402
from rollout.kernels.layernorm import rms_norm_ref  # noqa: E402
from rollout.kernels.rotary import rotary_ref  # noqa: E402
from rollout.kernels.triton_utils import round_as  # noqa: E402
from rollout.models.layers.rotary import RotaryEmbedding  # noqa: E402

# True when this process imported triton with TRITON_INTERPRET=1 (the child, or a run
# started that way): then every kernel here runs in the interpreter.
INTERPRETED = isinstance(tl.sum, InterpretedFunction)
if INTERPRETED:
    assert isinstance(triton_layernorm._rms_norm_kernel, InterpretedFunction)

interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the interpreter child process (test_kernels_in_interpreter)"
)
_DTYPES = pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)


def _assert_matches(got: torch.Tensor, want: torch.Tensor, max_ulps: int = 2,
                    magnitude: torch.Tensor | None = None) -> None:
    """fp32: close to 1e-5. bf16/fp16: at most ``max_ulps`` units in the last place apart.

    The kernels round intermediates exactly where the references do, so only fp32 math
    that differs in its last bits (reduction order, rsqrt, the GPU's fast exp) can tip one
    rounding: an intermediate one ulp off, then the output up to two ulps off after the
    next rounding. Rotary has no such math: bitwise (0). ``magnitude``: the size of the
    terms an output was summed from, when that exceeds the output (see ``_rotated_magnitude``);
    ulps are then counted at that size."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.dtype)
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        return
    g, w = got.float(), want.float()
    finfo = torch.finfo(got.dtype)  # eps: relative ulp; tiny * eps: the subnormal spacing
    size = torch.maximum(g.abs(), w.abs())
    if magnitude is not None:
        size = torch.maximum(size, magnitude.float())
    ulp = torch.clamp_min(finfo.eps * size, finfo.tiny * finfo.eps)
    bad = (g - w).abs() > max_ulps * ulp
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} values off by more than {max_ulps} ulp"


def _rotated_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Per element, the length of its rotary pair (i, i + head_dim / 2), which the rotation
    keeps. An input one ulp off (a fused q/k norm's fp32 sum rounding the other way) moves
    the rotated output by up to an ulp of that length, which can be many ulps of the output
    itself where x * cos and y * sin cancel."""
    x = x.float()
    half = x.shape[-1] // 2
    length = torch.hypot(x[..., :half], x[..., half:])
    return torch.cat((length, length), dim=-1)


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter process")
def test_kernels_in_interpreter():
    """This module's interpreter cases, in a fresh process with TRITON_INTERPRET=1."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-m", "not gpu",
           "-k", "not test_kernels_in_interpreter", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, proc.stdout[-3000:]


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=device).to(dtype)


def _qkv_views(gen: torch.Generator, num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int,
               dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """(qkv, q, k, v): q/k/v as strided views of one fused QKV output, as the attention
    layer makes them."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = _randn(gen, num_tokens, q_size + 2 * kv_size, dtype=dtype, device=device)
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].view(num_tokens, num_kv_heads, head_dim)
    return qkv, q, k, v


# ---------------------------------------------------------------------------------------
# round_as: the rounding every half-precision kernel relies on
# ---------------------------------------------------------------------------------------


@triton.jit
def _round_as_kernel(x_ptr, out_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, round_as(x, DTYPE), mask=offs < n)


def _check_round_as(device: str) -> None:
    gen = _gen(0, device)
    special = [65504.0, 65519.0, 65520.0, -65520.0, 3.3895e38, 3.4e38, 1e-8, 2.98e-8, -2.98e-8,
               6.1e-5, 1e-40, 0.0, -0.0, float("inf"), float("-inf")]
    x = torch.cat([torch.randn(2048, generator=gen, device=device) * scale
                   for scale in (1, 1e-3, 1e-5, 1e-7, 1e4, 6e4, 1e30)]
                  + [torch.tensor(special, device=device)])
    # Exact ties: the midpoints between neighbouring bf16 / fp16 values.
    x = torch.cat([x, torch.arange(1, 600, device=device) / 256 + 1 / 512,
                   torch.arange(1, 600, device=device) / 2048 + 1 / 4096])
    for dtype, tl_dtype in ((torch.bfloat16, tl.bfloat16), (torch.float16, tl.float16)):
        out = torch.empty_like(x)
        _round_as_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), DTYPE=tl_dtype, BLOCK=1024)
        assert torch.equal(out, x.to(dtype).float()), dtype


@interpreted
def test_round_as_matches_torch_casts():
    _check_round_as("cpu")


# ---------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------


@interpreted
@_DTYPES
@pytest.mark.parametrize("hidden", [1, 7, 96, 1000])
@pytest.mark.parametrize("num_tokens", [1, 5])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm(dtype, hidden, num_tokens, with_residual):
    gen = _gen(hidden * 10 + num_tokens)
    x = _randn(gen, num_tokens, hidden, dtype=dtype)
    weight = (1 + 0.5 * _randn(gen, hidden)).to(dtype)
    residual = _randn(gen, num_tokens, hidden, dtype=dtype) if with_residual else None
    x_before = x.clone()
    got = triton_layernorm.rms_norm(x, weight, 1e-6, residual)
    want = rms_norm_ref(x, weight, 1e-6, residual)
    if with_residual:
        assert torch.equal(got[1], want[1])  # x + residual, rounded as torch rounds it
        got, want = got[0], want[0]
    _assert_matches(got, want)
    assert torch.equal(x, x_before)


@interpreted
def test_rms_norm_strided_rows_3d_and_fp32_weight():
    rms_norm = triton_layernorm.rms_norm
    gen = _gen(1)
    # Rows of a wider buffer (row stride 80 for hidden 48).
    buf = _randn(gen, 3, 80)
    x, residual = buf[:, :48], _randn(gen, 3, 48)
    weight = _randn(gen, 48)
    for g, w in zip(rms_norm(x, weight, 1e-5, residual), rms_norm_ref(x, weight, 1e-5, residual)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # [batch, seq, hidden]
    x3 = _randn(gen, 2, 3, 24)
    w3 = _randn(gen, 24)
    torch.testing.assert_close(rms_norm(x3, w3, 1e-6), rms_norm_ref(x3, w3, 1e-6), atol=1e-5, rtol=1e-5)
    # bf16 activations with an fp32 weight: the product promotes to fp32, as in torch.
    xb = _randn(gen, 3, 40, dtype=torch.bfloat16)
    wf = _randn(gen, 40)
    got, want = rms_norm(xb, wf, 1e-6), rms_norm_ref(xb, wf, 1e-6)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)  # normed rounded to bf16 first
    # No rows.
    empty = rms_norm(torch.empty(0, 16), torch.ones(16), 1e-6, torch.empty(0, 16))
    assert empty[0].shape == empty[1].shape == (0, 16)


# ---------------------------------------------------------------------------------------
# Rotary
# ---------------------------------------------------------------------------------------


@interpreted
@_DTYPES
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim", [(4, 2, 16), (3, 1, 80), (2, 2, 8)], ids=["gqa", "odd", "mha"]
)
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32])
def test_rotary(dtype, num_heads, num_kv_heads, head_dim, pos_dtype):
    max_positions = 64
    rope = RotaryEmbedding(head_dim, max_positions, {"rope_theta": 10000.0, "rope_type": "default"})
    gen = _gen(head_dim + num_heads)
    positions = torch.tensor([5, 0, 63, 5, 17], dtype=pos_dtype)  # unsorted, repeated, last
    qkv, q, k, _ = _qkv_views(gen, positions.numel(), num_heads, num_kv_heads, head_dim, dtype)
    qkv_before = qkv.clone()
    q_out, k_out = triton_rotary.rotary(positions, q, k, rope.cos_sin_cache)
    q_ref, k_ref = rotary_ref(positions.long(), q, k, rope.cos_sin_cache)
    for got, want in ((q_out, q_ref), (k_out, k_ref)):
        _assert_matches(got, want, max_ulps=0)  # every rounding as in the reference
    assert torch.equal(qkv, qkv_before)


@interpreted
@_DTYPES
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 16), (3, 1, 80)], ids=["gqa", "odd"])
def test_rotary_with_qk_norm(dtype, num_heads, num_kv_heads, head_dim):
    """Qwen3's per-head q/k RMSNorm fused before the rotation, on strided q/k views."""
    rope = RotaryEmbedding(head_dim, 64, {"rope_theta": 10000.0, "rope_type": "default"})
    gen = _gen(7 + head_dim)
    positions = torch.tensor([5, 0, 63, 5, 17])
    qkv, q, k, _ = _qkv_views(gen, positions.numel(), num_heads, num_kv_heads, head_dim, dtype)
    qkv.mul_(3)
    qkv[1] = 0  # an all-zero head: the norm's eps alone
    wq, wk = (1 + _randn(gen, head_dim, dtype=dtype) / 4 for _ in range(2))
    qkv_before = qkv.clone()
    got = triton_rotary.rotary(positions, q, k, rope.cos_sin_cache, wq, wk, 1e-6)
    want = rotary_ref(positions, q, k, rope.cos_sin_cache, wq, wk, 1e-6)
    for g, w in zip(got, want):
        _assert_matches(g, w, magnitude=_rotated_magnitude(w))
    assert torch.equal(qkv, qkv_before)
    # The reference is the layer's old path: RMSNorm of each head, then the rotation.
    normed = rotary_ref(positions, rms_norm_ref(q, wq, 1e-6), rms_norm_ref(k, wk, 1e-6), rope.cos_sin_cache)
    assert all(torch.equal(a, b) for a, b in zip(want, normed))


def _check_rotary_write_kv(dtype, num_heads, num_kv_heads, head_dim, norm, device="cpu"):
    """The fused rotary + cache write equals ``rotary`` then ``write_kv`` bitwise: the same
    query, the same cache bytes (a negative slot writes nothing), on strided QKV views."""
    from rollout.kernels.triton_attention import write_kv

    num_tokens, num_blocks, block_size = 6, 5, 4
    rope = RotaryEmbedding(head_dim, 64, {"rope_theta": 10000.0, "rope_type": "default"}).to(device)
    gen = _gen(11 + head_dim, device)
    positions = torch.tensor([5, 0, 63, 5, 17, 2], device=device)
    _, q, k, v = _qkv_views(gen, num_tokens, num_heads, num_kv_heads, head_dim, dtype, device)
    weights = [1 + _randn(gen, head_dim, dtype=dtype, device=device) / 4 for _ in range(2)] if norm else [None, None]
    slots = torch.tensor([3, 17, -1, 0, 19, 8], device=device)  # shuffled, one skipped
    cache = _randn(gen, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    want_cache = cache.clone()
    want_q, k_rot = triton_rotary.rotary(positions, q, k, rope.cos_sin_cache, *weights, 1e-6)
    write_kv(k_rot, v, want_cache, slots)
    got_q = triton_rotary.rotary_write_kv(positions, q, k, v, rope.cos_sin_cache, cache, slots, *weights, 1e-6)
    assert torch.equal(got_q, want_q)
    assert torch.equal(cache.view(torch.uint8), want_cache.view(torch.uint8))


@interpreted
@_DTYPES
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 16), (3, 1, 80)], ids=["gqa", "odd"])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "qk_norm"])
def test_rotary_write_kv(dtype, num_heads, num_kv_heads, head_dim, norm):
    _check_rotary_write_kv(dtype, num_heads, num_kv_heads, head_dim, norm)


# ---------------------------------------------------------------------------------------
# SiLU-and-mul
# ---------------------------------------------------------------------------------------


@interpreted
@_DTYPES
@pytest.mark.parametrize("shape", [(1, 10), (7, 192), (3, 3000), (2, 3, 80)], ids=str)
def test_silu_and_mul(dtype, shape):
    x = _randn(_gen(shape[-1]), *shape, dtype=dtype) * 3
    _assert_matches(triton_activation.silu_and_mul(x), silu_and_mul_ref(x))


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------


def _md(temperature: list[float], seeds: list[int], banned=None, device="cpu") -> SamplingMetadata:
    temp = torch.tensor(temperature, dtype=torch.float32, device=device)
    return SamplingMetadata(
        temperature=temp, top_k=None, top_p=None, min_p=None,
        generators={row: _gen(seed, device) for row, seed in enumerate(seeds)},
        default_generator=None, all_greedy=bool((temp < _GREEDY_EPS).all()),
        max_num_logprobs=None, banned_token_ids=banned or {},
    )


def _compare_with_sampler(sample_tokens, logits, temperature, banned, num_splits, steps, seed):
    """Run the torch sampler and the kernel on the same noise for ``steps`` steps; return
    (num_tokens_compared, num_token_mismatches) after checking the logprobs."""
    num_reqs, vocab = logits.shape
    device = logits.device.type
    seeds = [seed + row for row in range(num_reqs)]
    md = _md(temperature, seeds, banned, device)  # the sampler's generators advance per step
    md_noise = _md(temperature, seeds, banned, device)  # same streams, for the kernel's noise
    masked = logits.clone()  # the caller's job: banned tokens -inf before the kernel
    for row, ids in (banned or {}).items():
        masked[row, ids] = float("-inf")
    mismatches = 0
    for _ in range(steps):
        want = Sampler()(logits, md)
        noise = _exponential_noise(masked.float(), md_noise)
        tokens, logprobs = sample_tokens(masked, md.temperature, noise, num_splits=num_splits)
        assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
        mismatches += int((tokens != want.sampled_token_ids).sum())
        same = tokens == want.sampled_token_ids
        torch.testing.assert_close(logprobs[same], want.sampled_logprobs[same], atol=2e-5, rtol=1e-5)
        for row, ids in (banned or {}).items():
            assert int(tokens[row]) not in ids
    return steps * num_reqs, mismatches


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_splits", [1, 2, 3])
def test_sample_tokens_matches_sampler(dtype, num_splits):
    # 2500 = 2 full blocks of 1024 and a partial one; 7 rows; greedy rows mixed in.
    gen = _gen(num_splits)
    logits = (_randn(gen, 7, 2500) * 3).to(dtype)
    temperature = [0.0, 1.0, 0.5, 1.7, 0.0, 1e-3, 3.0]
    banned = {1: [int(logits[1].float().argmax()), 7], 4: [int(logits[4].float().argmax())]}
    compared, mismatches = _compare_with_sampler(
        triton_sampling.sample_tokens, logits, temperature, banned, num_splits, steps=3, seed=10
    )
    assert mismatches == 0, f"{mismatches} of {compared} tokens differ"


@interpreted
def test_sample_tokens_greedy_without_noise_and_ties():
    sample_tokens = triton_sampling.sample_tokens
    gen = _gen(3)
    logits = _randn(gen, 5, 2500)
    logits[0, [2400, 1500, 100]] = 9.0  # tie across splits: lowest id wins
    logits[1, [1030, 6]] = 9.0  # tie in the same lane of one split (1030 = 6 + 1024)
    logits[2, [700, 300]] = 9.0  # tie across lanes of one block
    logits[3, :] = float("-inf")
    logits[3, 2499] = 0.0  # one finite token, the last one
    logits[4, 1:] = float("-inf")  # one finite token, the first one
    want_tokens = logits.argmax(-1)
    assert want_tokens[:3].tolist() == [100, 6, 300]
    want_logprobs = logits.log_softmax(-1).gather(-1, want_tokens[:, None])[:, 0]
    temperature = torch.zeros(5)
    for num_splits in (1, 3, 100, None):  # 100 is clamped to the 3 blocks
        tokens, logprobs = sample_tokens(logits, temperature, None, num_splits=num_splits)
        assert torch.equal(tokens, want_tokens), num_splits
        torch.testing.assert_close(logprobs, want_logprobs, atol=1e-6, rtol=1e-6)
    # The same rows through the noise path: greedy rows never look at their noise.
    noise = torch.full((5, 2500), 1e-30)
    tokens, _ = sample_tokens(logits, temperature, noise, num_splits=2)
    assert torch.equal(tokens, want_tokens)


@interpreted
def test_sample_tokens_random_row_follows_noise():
    """With uniform logits the token is argmin(q); its logprob is -log(vocab) at any T."""
    sample_tokens = triton_sampling.sample_tokens
    vocab = 1500
    noise = torch.rand(3, vocab, generator=_gen(4)) + 1.0
    noise[0, 1234], noise[1, 3], noise[2, 1499] = 0.5, 0.0, 1e-3  # 0 is clamped to fp32 tiny
    tokens, logprobs = sample_tokens(torch.zeros(3, vocab), torch.tensor([1.0, 0.7, 2.0]), noise, num_splits=2)
    assert tokens.tolist() == [1234, 3, 1499]
    torch.testing.assert_close(logprobs, torch.full((3,), -math.log(vocab)))


@triton.jit
def _philox_uniforms_kernel(out_ptr, seed, num_quads, BLOCK: tl.constexpr):
    """The four uniforms of each Philox call at offsets 0..num_quads-1, as [num_quads, 4]."""
    offs = tl.arange(0, BLOCK)
    mask = offs < num_quads
    u0, u1, u2, u3 = tl.rand4x(seed, offs)
    for k, u in enumerate((u0, u1, u2, u3)):
        tl.store(out_ptr + offs * 4 + k, u, mask=mask)


@interpreted
def test_sample_tokens_in_kernel_noise_is_the_documented_philox_stream():
    """Token t of row r races with u = output t % 4 of Philox at (seed, r * ceil(vocab / 4)
    + t // 4): with all-zero logits the winner is argmax u. The same tokens for any split
    count (2501: a vocab not a multiple of 4, three blocks; 32 rows, so a wrong token-to-output
    mapping shows)."""
    sample_tokens = triton_sampling.sample_tokens
    num_reqs, vocab, seed = 32, 2501, 11
    quads = math.ceil(vocab / 4)
    uniforms = torch.empty(num_reqs * quads, 4)
    _philox_uniforms_kernel[(1,)](uniforms, seed, num_reqs * quads, BLOCK=triton.next_power_of_2(num_reqs * quads))
    u = uniforms.reshape(num_reqs, quads * 4)[:, :vocab]
    temperature = torch.ones(num_reqs)
    for num_splits in (1, 2, 3):
        tokens, logprobs = sample_tokens(torch.zeros(num_reqs, vocab), temperature, None, num_splits=num_splits, seed=seed)
        assert torch.equal(tokens, u.argmax(-1)), num_splits
        torch.testing.assert_close(logprobs, torch.full((num_reqs,), -math.log(vocab)))


@interpreted
def test_sample_tokens_in_kernel_noise_follows_the_distribution():
    """Philox noise drawn in the kernel (no noise tensor): the same seed gives the same
    tokens, tokens follow softmax(logits / T), logprobs are those of the tokens drawn,
    greedy rows stay argmax."""
    sample_tokens = triton_sampling.sample_tokens
    vocab, num_reqs = 6, 1500
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")])
    logits = base.repeat(num_reqs, 1)
    temperature = torch.full((num_reqs,), 1.5)
    temperature[::50] = 0.0  # greedy rows mixed in
    tokens, logprobs = sample_tokens(logits, temperature, None, num_splits=1, seed=7)
    again, _ = sample_tokens(logits, temperature, None, num_splits=1, seed=7)
    other, _ = sample_tokens(logits, temperature, None, num_splits=1, seed=8)
    assert torch.equal(tokens, again) and not torch.equal(tokens, other)
    greedy = temperature == 0
    assert (tokens[greedy] == 0).all()
    rand = tokens[~greedy]
    assert (rand != 5).all()  # a masked token never wins
    want = (base / 1.5).softmax(-1)
    freq = torch.bincount(rand, minlength=vocab).float() / rand.numel()
    assert (freq - want).abs().max() < 0.04, (freq, want)  # ~4 sigma at 1470 draws
    lp = (base / 1.5).log_softmax(-1)
    torch.testing.assert_close(logprobs[~greedy], lp[rand], atol=1e-5, rtol=1e-5)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rank_tokens_matches_the_samplers_count(dtype):
    from rollout.engine.sampler import _rank_tokens

    gen = _gen(5)
    logits = (_randn(gen, 6, 2500) * 2).to(dtype)
    logits[2, :100] = logits[2, 0]  # ties with the chosen token do not count
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.3, 1e-6, 2.0])
    token_ids = torch.tensor([int(logits[0].float().argmax()), 5, 0, 2499, 17, 1234])
    got = triton_sampling.rank_tokens(logits, temperature, token_ids)
    assert got.dtype == torch.int64
    assert torch.equal(got, _rank_tokens(logits, temperature, token_ids))
    assert int(got[0]) == 1


@interpreted
def test_sample_tokens_greedy_threshold_is_the_samplers():
    assert triton_sampling.GREEDY_EPS == _GREEDY_EPS
    empty_tokens, empty_logprobs = triton_sampling.sample_tokens(torch.empty(0, 10), torch.empty(0), None)
    assert empty_tokens.shape == empty_logprobs.shape == (0,)


# ---------------------------------------------------------------------------------------
# Real shapes on the GPU (compiled kernels)
# ---------------------------------------------------------------------------------------


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU and compiled kernels"
)
NUM_ROWS, HIDDEN, VOCAB = 256, 4096, 151936


@gpu
@needs_cuda
def test_gpu_round_as_matches_torch_casts():
    _check_round_as("cuda")


@gpu
@needs_cuda
@_DTYPES
def test_gpu_rms_norm_real_shape(dtype):
    rms_norm = triton_layernorm.rms_norm
    gen = _gen(0, "cuda")
    x = _randn(gen, NUM_ROWS, HIDDEN, dtype=dtype, device="cuda")
    residual = _randn(gen, NUM_ROWS, HIDDEN, dtype=dtype, device="cuda")
    weight = (1 + 0.1 * _randn(gen, HIDDEN, device="cuda")).to(dtype)
    out, res = rms_norm(x, weight, 1e-6, residual)
    out_ref, res_ref = rms_norm_ref(x, weight, 1e-6, residual)
    assert torch.equal(res, res_ref)  # the residual sum rounds exactly as torch's
    plain = rms_norm(x, weight, 1e-6)
    plain_ref = rms_norm_ref(x, weight, 1e-6)
    _assert_matches(out, out_ref)
    _assert_matches(plain, plain_ref)


@gpu
@needs_cuda
@_DTYPES
def test_gpu_rotary_real_shape(dtype):
    rotary = triton_rotary.rotary
    num_heads, num_kv_heads, head_dim, max_positions = 32, 8, 128, 8192
    rope = RotaryEmbedding(head_dim, max_positions, {"rope_theta": 1e6, "rope_type": "default"}).cuda()
    gen = _gen(1, "cuda")
    positions = torch.randint(0, max_positions, (NUM_ROWS,), generator=gen, device="cuda")
    _, q, k, _ = _qkv_views(gen, NUM_ROWS, num_heads, num_kv_heads, head_dim, dtype, "cuda")
    got = rotary(positions, q, k, rope.cos_sin_cache)
    want = rotary_ref(positions, q, k, rope.cos_sin_cache)
    for g, w in zip(got, want):
        _assert_matches(g, w, max_ulps=0)  # fp32: may contract into FMAs (close)


@gpu
@needs_cuda
@_DTYPES
def test_gpu_rotary_with_qk_norm_real_shape(dtype):
    num_heads, num_kv_heads, head_dim, max_positions = 32, 8, 128, 8192
    rope = RotaryEmbedding(head_dim, max_positions, {"rope_theta": 1e6, "rope_type": "default"}).cuda()
    gen = _gen(2, "cuda")
    positions = torch.randint(0, max_positions, (NUM_ROWS,), generator=gen, device="cuda")
    _, q, k, _ = _qkv_views(gen, NUM_ROWS, num_heads, num_kv_heads, head_dim, dtype, "cuda")
    wq, wk = (1 + _randn(gen, head_dim, dtype=dtype, device="cuda") / 4 for _ in range(2))
    got = triton_rotary.rotary(positions, q, k, rope.cos_sin_cache, wq, wk, 1e-6)
    want = rotary_ref(positions, q, k, rope.cos_sin_cache, wq, wk, 1e-6)
    for g, w in zip(got, want):
        _assert_matches(g, w, magnitude=_rotated_magnitude(w))


@gpu
@needs_cuda
@_DTYPES
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "qk_norm"])
def test_gpu_rotary_write_kv(dtype, norm):
    _check_rotary_write_kv(dtype, 32, 8, 128, norm, device="cuda")


@gpu
@needs_cuda
@_DTYPES
def test_gpu_silu_and_mul_real_shape(dtype):
    silu_and_mul = triton_activation.silu_and_mul
    x = _randn(_gen(2, "cuda"), NUM_ROWS, 2 * 12288, dtype=dtype, device="cuda") * 3
    _assert_matches(silu_and_mul(x), silu_and_mul_ref(x))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("num_reqs", [NUM_ROWS, 3])
def test_gpu_sample_tokens_real_shape(dtype, num_reqs):
    sample_tokens = triton_sampling.sample_tokens
    gen = _gen(3, "cuda")
    logits = (_randn(gen, num_reqs, VOCAB, device="cuda") * 4).to(dtype)
    temperature = [[0.0, 1.0, 0.6, 1.3][row % 4] for row in range(num_reqs)]
    banned = {1: [int(logits[1].float().argmax())], 2: [0, 1, 2]}
    compared, mismatches = _compare_with_sampler(
        sample_tokens, logits, temperature, banned, None, steps=2, seed=100
    )
    # Same noise, same token, up to fp32 near-ties of the race (log space vs prob space).
    assert mismatches <= compared // 1000, f"{mismatches} of {compared} tokens differ"
    # Ranks: the kernel's count equals the sampler's torch count.
    from rollout.engine.sampler import _rank_tokens

    temp_t = torch.tensor(temperature, device="cuda")
    some = torch.randint(0, VOCAB, (num_reqs,), device="cuda", generator=gen)
    assert torch.equal(triton_sampling.rank_tokens(logits, temp_t, some), _rank_tokens(logits, temp_t, some))
    # In-kernel noise: deterministic per seed, greedy rows argmax.
    tokens, _ = sample_tokens(logits, temp_t, None, seed=3)
    again, _ = sample_tokens(logits, temp_t, None, seed=3)
    assert torch.equal(tokens, again)
    greedy = temp_t == 0
    assert torch.equal(tokens[greedy], logits.float().argmax(-1)[greedy])
    # All greedy, no noise.
    tokens, logprobs = sample_tokens(logits, torch.zeros(num_reqs, device="cuda"), None)
    raw = logits.float().log_softmax(-1)
    assert torch.equal(tokens, logits.float().argmax(-1))
    torch.testing.assert_close(logprobs, raw.max(-1).values, atol=2e-5, rtol=1e-5)
