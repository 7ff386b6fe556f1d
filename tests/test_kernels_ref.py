"""Every torch reference kernel against an independent computation (CPU, no model).

Paged attention (the reference and the SDPA path) is checked against dense causal
attention over K/V histories kept contiguous on the side; RMSNorm and rotary against HF Llama; SiLU-and-mul against a
float64 formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from rollout.kernels.activation import silu_and_mul_ref
from rollout.kernels.attention import paged_attention_ref, paged_attention_sdpa, write_kv_ref
from rollout.kernels.layernorm import rms_norm_ref
from rollout.kernels.rotary import rotary_ref
from rollout.models.layers.rotary import RotaryEmbedding, rope_parameters
from tests.helpers.attention_steps import block_boundary_specs


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


# ---------------------------------------------------------------------------------------
# Paged attention + write_kv
# ---------------------------------------------------------------------------------------

NUM_BLOCKS = 32
NUM_KV_HEADS = 2
HEAD_DIM = 16


def _step_specs(block_size: int) -> list[tuple[int, int]]:
    """(num_context_tokens already cached, q_len this step) for one mixed step."""
    return [*block_boundary_specs(block_size), (3 * block_size + 4, 1)]  # + a decode on a longer sequence


def _dense_attention(q, k, v, scale):
    """q [q_len, H, D] are the last q_len positions of k/v [seq_len, KV, D]; float64 SDPA
    with an explicit bottom-right causal mask and query head h -> kv head h // group."""
    q_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    kv_head = torch.arange(num_heads) // (num_heads // num_kv_heads)
    qh = q.double().transpose(0, 1)[None]  # [1, H, q_len, D]
    kh = k.double()[:, kv_head].transpose(0, 1)[None]  # [1, H, seq_len, D]
    vh = v.double()[:, kv_head].transpose(0, 1)[None]
    q_pos = torch.arange(seq_len - q_len, seq_len)
    mask = torch.arange(seq_len)[None, :] <= q_pos[:, None]  # [q_len, seq_len], True = attend
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)  # [q_len, H, D]


def _build_step(block_size, num_heads, dtype, seed, specs=None, shuffle=True):
    """A cache holding each request's context (written slot by slot, not via write_kv_ref),
    plus this step's new K/V, queries and metadata. Unallocated slots hold NaN.
    ``specs``: (context, q_len) per request (default: the mixed step), shuffled unless not."""
    gen = _gen(seed)
    specs = specs or _step_specs(block_size)
    if shuffle:
        order = torch.randperm(len(specs), generator=gen).tolist()
        specs = [specs[i] for i in order]

    kv_cache = torch.full((2, NUM_BLOCKS, block_size, NUM_KV_HEADS, HEAD_DIM), float("nan"), dtype=dtype)
    free_blocks = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    num_blocks_per_req = [math.ceil((c + q) / block_size) for c, q in specs]
    max_blocks = max(num_blocks_per_req) + 2  # padding columns past each request's blocks
    block_tables = torch.zeros(len(specs), max_blocks, dtype=torch.int32)

    reqs = []
    for i, ((num_context, q_len), n) in enumerate(zip(specs, num_blocks_per_req)):
        seq_len = num_context + q_len
        blocks = [free_blocks.pop() for _ in range(n)]
        block_tables[i, :n] = torch.tensor(blocks, dtype=torch.int32)
        # Whole history, contiguous; the cache stores it rounded to `dtype`.
        k = _randn(gen, seq_len, NUM_KV_HEADS, HEAD_DIM).to(dtype)
        v = _randn(gen, seq_len, NUM_KV_HEADS, HEAD_DIM).to(dtype)
        q = _randn(gen, q_len, num_heads, HEAD_DIM).to(dtype)
        for pos in range(num_context):
            kv_cache[0, blocks[pos // block_size], pos % block_size] = k[pos]
            kv_cache[1, blocks[pos // block_size], pos % block_size] = v[pos]
        slots = [blocks[p // block_size] * block_size + p % block_size for p in range(num_context, seq_len)]
        reqs.append(dict(num_context=num_context, seq_len=seq_len, k=k, v=v, q=q, slots=slots))

    q_lens = [r["q"].shape[0] for r in reqs]
    return dict(
        kv_cache=kv_cache,
        block_tables=block_tables,
        reqs=reqs,
        query=torch.cat([r["q"] for r in reqs]),
        new_k=torch.cat([r["k"][r["num_context"]:] for r in reqs]),
        new_v=torch.cat([r["v"][r["num_context"]:] for r in reqs]),
        slot_mapping=torch.tensor([s for r in reqs for s in r["slots"]], dtype=torch.int64),
        query_start_loc_cpu=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32),
        seq_lens_cpu=torch.tensor([r["seq_len"] for r in reqs], dtype=torch.int32),
    )


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_heads", [2, 4, 8], ids=["mha", "gqa2", "gqa4"])
@pytest.mark.parametrize(
    "dtype,atol,rtol",
    [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 2e-2)],
    ids=["fp32", "bf16"],
)
@pytest.mark.parametrize("attention", [paged_attention_ref, paged_attention_sdpa], ids=["ref", "sdpa"])
def test_paged_attention_matches_dense_mixed_step(block_size, num_heads, dtype, atol, rtol, attention):
    step = _build_step(block_size, num_heads, dtype, seed=block_size * 100 + num_heads)
    kv_cache = step["kv_cache"]
    write_kv_ref(step["new_k"], step["new_v"], kv_cache, step["slot_mapping"])

    # The batch really mixes every case, including the block-boundary lengths.
    reqs = step["reqs"]
    assert any(r["num_context"] == 0 and r["seq_len"] > 1 for r in reqs)
    assert any(r["num_context"] > 0 and r["seq_len"] - r["num_context"] > 1 for r in reqs)
    assert {block_size - 1, block_size, block_size + 1} <= {
        r["seq_len"] for r in reqs if r["seq_len"] - r["num_context"] == 1
    }

    _check_against_dense(step, attention(
        step["query"], kv_cache, step["block_tables"], step["query_start_loc_cpu"], step["seq_lens_cpu"],
        HEAD_DIM**-0.5,
    ), atol, rtol)


def _check_against_dense(step, out, atol, rtol):
    assert out.shape == step["query"].shape and out.dtype == step["query"].dtype
    assert torch.isfinite(out).all()
    starts = step["query_start_loc_cpu"].tolist()
    for i, r in enumerate(step["reqs"]):
        expected = _dense_attention(r["q"], r["k"], r["v"], HEAD_DIM**-0.5)
        torch.testing.assert_close(
            out[starts[i] : starts[i + 1]].double(), expected, atol=atol, rtol=rtol,
            msg=lambda m: f"request {i} (context {r['num_context']}, seq_len {r['seq_len']}): {m}",
        )


# (context, q_len) per request of steps whose requests the SDPA path batches together.
SDPA_BATCH_STEPS = {
    # Decodes of one length (no mask) and of many (masked, each past-the-end position
    # re-reading the request's last slot; unwritten slots are NaN).
    "decodes_one_length": [(37, 1)] * 5,
    "decodes_many_lengths": [(c, 1) for c in (0, 3, 15, 16, 17, 40, 63)],
    # Fresh prompts of one length (one causal call), consecutive or not, beside other shapes.
    "prompts_one_length": [(0, 20)] * 4,
    "prompts_interleaved": [(0, 20), (9, 1), (0, 20), (16, 5), (0, 20), (16, 5), (0, 7), (30, 1)],
    # Chunks after a prefix hit, of one shape (one masked call).
    "chunks_one_shape": [(32, 6)] * 3 + [(5, 1)],
}


@pytest.mark.parametrize("case", list(SDPA_BATCH_STEPS))
@pytest.mark.parametrize("num_heads", [2, 8], ids=["mha", "gqa4"])
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 2e-2)],
                         ids=["fp32", "bf16"])
def test_paged_attention_sdpa_batched_shapes(case, num_heads, dtype, atol, rtol):
    step = _build_step(16, num_heads, dtype, seed=len(case) + num_heads, specs=SDPA_BATCH_STEPS[case], shuffle=False)
    write_kv_ref(step["new_k"], step["new_v"], step["kv_cache"], step["slot_mapping"])
    args = (step["query"], step["kv_cache"], step["block_tables"], step["query_start_loc_cpu"], step["seq_lens_cpu"])
    out = paged_attention_sdpa(*args, HEAD_DIM**-0.5)
    _check_against_dense(step, out, atol, rtol)
    if dtype == torch.float32:  # the same maths as the reference, one request at a time
        torch.testing.assert_close(out, paged_attention_ref(*args, HEAD_DIM**-0.5), atol=1e-6, rtol=1e-6)


def test_paged_attention_single_token_sees_only_itself():
    """A fresh prompt of one token attends only to itself: the output is its own V."""
    kv_cache = torch.zeros(2, 4, 4, 1, 8)
    k, v = torch.randn(1, 1, 8, generator=_gen(0)), torch.randn(1, 1, 8, generator=_gen(1))
    write_kv_ref(k, v, kv_cache, torch.tensor([8]))  # block 2, offset 0
    q = torch.randn(1, 2, 8, generator=_gen(2))
    out = paged_attention_ref(q, kv_cache, torch.tensor([[2]]), torch.tensor([0, 1]), torch.tensor([1]), 0.5)
    torch.testing.assert_close(out, v.expand(1, 2, 8), atol=0, rtol=0)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_write_kv_writes_only_mapped_slots(cache_dtype):
    gen = _gen(7)
    num_blocks, block_size = 8, 4
    kv_cache = _randn(gen, 2, num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM).to(cache_dtype)
    before = kv_cache.clone()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:11]
    key = _randn(gen, 11, NUM_KV_HEADS, HEAD_DIM)  # fp32 even into a bf16 cache
    value = _randn(gen, 11, NUM_KV_HEADS, HEAD_DIM)

    write_kv_ref(key, value, kv_cache, slots)

    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots] = True
    for t, slot in enumerate(slots.tolist()):
        block_id, offset = divmod(slot, block_size)
        assert torch.equal(kv_cache[0, block_id, offset], key[t].to(cache_dtype))
        assert torch.equal(kv_cache[1, block_id, offset], value[t].to(cache_dtype))
    flat, flat_before = kv_cache.view(2, -1, NUM_KV_HEADS, HEAD_DIM), before.view(2, -1, NUM_KV_HEADS, HEAD_DIM)
    assert torch.equal(flat[:, ~written], flat_before[:, ~written])


# ---------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_hf_llama(dtype, with_residual):
    gen = _gen(3)
    hidden, eps = 64, 1e-5
    x = (_randn(gen, 7, hidden) * 3).to(dtype)
    residual = _randn(gen, 7, hidden).to(dtype) if with_residual else None
    weight = (1 + 0.1 * _randn(gen, hidden)).to(dtype)
    hf = LlamaRMSNorm(hidden, eps=eps).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(weight)
    x_before = x.clone()

    with torch.no_grad():
        if with_residual:
            out, new_residual = rms_norm_ref(x, weight, eps, residual)
            summed = x_before + residual
            expected = hf(summed)
            assert torch.equal(new_residual, summed)
        else:
            out = rms_norm_ref(x, weight, eps)
            expected = hf(x_before)
    assert out.dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(out, expected)
        # Also close to a float64 formula, independent of HF.
        h = x_before.double() + (residual.double() if with_residual else 0)
        ref = weight.double() * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------------------------------
# SiLU-and-mul
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 2 * 24), (2, 3, 2 * 8)])
def test_silu_and_mul_matches_formula(dtype, shape):
    x = (_randn(_gen(4), *shape) * 4).to(dtype)
    d = shape[-1] // 2
    out = silu_and_mul_ref(x)
    assert out.shape == (*shape[:-1], d) and out.dtype == dtype
    assert torch.equal(out, F.silu(x[..., :d]) * x[..., d:])
    g, u = x[..., :d].double(), x[..., d:].double()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), g * torch.sigmoid(g) * u, **tol)


# ---------------------------------------------------------------------------------------
# Rotary
# ---------------------------------------------------------------------------------------

ROPE_CASES = {
    "default": dict(rope_theta=10000.0),
    "llama3": dict(
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "linear": dict(rope_theta=10000.0, rope_scaling=dict(rope_type="linear", factor=4.0)),
}
MAX_POSITIONS = 4096


def _llama_config(case: str, num_heads: int, num_kv_heads: int, head_dim: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=num_heads * head_dim, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim,
        max_position_embeddings=MAX_POSITIONS, **ROPE_CASES[case],
    )


@pytest.mark.parametrize("case", list(ROPE_CASES))
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"]
)
def test_rotary_matches_hf_llama(case, dtype, tol):
    num_heads, num_kv_heads, head_dim = 4, 2, 32
    config = _llama_config(case, num_heads, num_kv_heads, head_dim)
    params = rope_parameters(config)
    assert params["rope_type"] == case
    rope = RotaryEmbedding(head_dim, MAX_POSITIONS, params)

    gen = _gen(5)
    # Arbitrary, unsorted, repeated positions spanning short and long (> original 64) ranges.
    positions = torch.cat([
        torch.tensor([0, 1, 63, 64, 65, MAX_POSITIONS - 1, 5, 5]),
        torch.randint(0, MAX_POSITIONS, (8,), generator=gen),
    ])
    num_tokens = positions.numel()
    q = _randn(gen, num_tokens, num_heads, head_dim).to(dtype)
    k = _randn(gen, num_tokens, num_kv_heads, head_dim).to(dtype)

    q_out, k_out = rotary_ref(positions, q, k, rope.cos_sin_cache)
    q_mod, k_mod = rope(positions, q, k)
    assert torch.equal(q_out, q_mod) and torch.equal(k_out, k_mod)
    assert q_out.dtype == dtype and k_out.dtype == dtype

    # HF: [batch, heads, seq, dim] with cos/sin [batch, seq, dim].
    hf_rope = LlamaRotaryEmbedding(config)
    cos, sin = hf_rope(q.transpose(0, 1)[None], positions[None])
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    torch.testing.assert_close(q_out, q_hf[0].transpose(0, 1), atol=tol, rtol=tol)
    torch.testing.assert_close(k_out, k_hf[0].transpose(0, 1), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_of_one_fused_projection_matches_separate_tensors(dtype):
    """q and k split from one qkv row (as the layers pass them) are rotated in one pass:
    bit for bit what rotating them as separate tensors gives, and the qkv buffer untouched."""
    num_heads, num_kv_heads, head_dim = 6, 2, 16
    rope = RotaryEmbedding(head_dim, MAX_POSITIONS, rope_parameters(_llama_config("llama3", 4, 2, head_dim)))
    gen = _gen(6)
    positions = torch.randint(0, MAX_POSITIONS, (9,), generator=gen)
    qkv = _randn(gen, 9, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype)
    before = qkv.clone()
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k = q.view(9, num_heads, head_dim), k.view(9, num_kv_heads, head_dim)
    q_out, k_out = rotary_ref(positions, q, k, rope.cos_sin_cache)
    q_sep, k_sep = rotary_ref(positions, q.contiguous(), k.contiguous(), rope.cos_sin_cache)
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == k_out.dtype == dtype
    assert torch.equal(q_out, q_sep) and torch.equal(k_out, k_sep)
    assert torch.equal(qkv, before)


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rotary_cache_matches_hf_cos_sin(case):
    head_dim = 32
    config = _llama_config(case, 4, 2, head_dim)
    rope = RotaryEmbedding(head_dim, MAX_POSITIONS, rope_parameters(config))
    positions = torch.arange(MAX_POSITIONS)
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions[None])
    half = head_dim // 2
    assert rope.cos_sin_cache.shape == (MAX_POSITIONS, head_dim)
    assert rope.cos_sin_cache.dtype == torch.float32
    torch.testing.assert_close(rope.cos_sin_cache[:, :half], cos[0, :, :half], atol=1e-6, rtol=0)
    torch.testing.assert_close(rope.cos_sin_cache[:, half:], sin[0, :, :half], atol=1e-6, rtol=0)


def test_rope_parameters_reads_old_and_new_layouts():
    class Old:  # transformers < 5: rope_theta + rope_scaling (with the legacy "type" key)
        rope_theta = 500000.0
        rope_scaling = dict(type="linear", factor=2.0)

    class New:
        rope_parameters = dict(rope_type="linear", factor=2.0, rope_theta=500000.0)

    class Bare:
        pass

    keys = ("rope_type", "rope_theta", "factor")
    old, new = rope_parameters(Old()), rope_parameters(New())
    assert [old[k] for k in keys] == [new[k] for k in keys] == ["linear", 500000.0, 2.0]
    assert rope_parameters(Bare()) == dict(rope_theta=10000.0, rope_type="default")
