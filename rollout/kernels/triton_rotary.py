"""Rotary position embedding (neox / rotate-half layout), Triton. Reference: ``rotary.rotary_ref``.

Rounding follows the reference step by step: cos/sin are rounded to the activation dtype,
each product ``x * cos`` and ``x * sin`` is rounded to it, then their sum is (through
``round_as``, so the compiler cannot fuse a product into an FMA). In bf16 and fp16 that
gives the reference's bits (fp32 products of two half-precision values are exact); in
fp32 the compiler may contract into FMAs, a last-bit difference.

With norm weights (Qwen3's q_norm / k_norm) each head is RMS-normalised in the same pass,
rounded as ``rms_norm_ref`` rounds: one kernel where the layer ran a copy of the strided q
and k, two norms and the rotation. Its fp32 sum of squares may differ from torch's in the
last bits (reduction order), so normalised outputs match to two ulps, not bitwise."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rollout.kernels.triton_utils import round_as


@triton.jit
def _rotate_heads(
    x_ptr,  # [num_tokens, num_heads, head_dim] (strided)
    dst_ptr,  # this token's first head in the destination
    token,
    cos,  # [1, BLOCK_HALF] fp32, already rounded to the activation dtype
    sin,  # [1, BLOCK_HALF]
    x_token_stride,
    x_head_stride,
    dst_head_stride,
    num_heads,
    half,
    norm_weight_ptr,  # [2 * half]; read only if NORM
    eps,
    slot,  # int: < 0 skips the stores (a KV slot of CUDA-graph padding); 0 for no cache
    NORM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_HEADS)[:, None]  # [BLOCK_HEADS, 1]
    dims = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BLOCK_HALF]
    mask = (heads < num_heads) & (dims < half)
    dtype = dst_ptr.dtype.element_ty
    src = x_ptr + token * x_token_stride + heads * x_head_stride + dims
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    if NORM:  # as rms_norm_ref per head: normalise in fp32, round, scale by the weight, round
        mean_sq = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half)
        inv = tl.rsqrt(mean_sq + eps)[:, None]  # [BLOCK_HEADS, 1]
        w_mask = dims < half
        w1 = tl.load(norm_weight_ptr + dims, mask=w_mask, other=0.0).to(tl.float32)
        w2 = tl.load(norm_weight_ptr + half + dims, mask=w_mask, other=0.0).to(tl.float32)
        x1 = round_as(w1 * round_as(x1 * inv, dtype), dtype)
        x2 = round_as(w2 * round_as(x2 * inv, dtype), dtype)
    out1 = round_as(x1 * cos, dtype) - round_as(x2 * sin, dtype)
    out2 = round_as(x2 * cos, dtype) + round_as(x1 * sin, dtype)
    dst = dst_ptr + heads * dst_head_stride + dims
    mask = mask & (heads * 0 + slot >= 0)  # a block, not a scalar: the interpreter needs it
    tl.store(dst, round_as(out1, dtype).to(dtype), mask=mask)
    tl.store(dst + half, round_as(out2, dtype).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,  # [num_tokens] int
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_ptr,  # [max_positions, head_dim] fp32: cos | sin halves, contiguous
    q_out_ptr,  # [num_tokens, num_heads, head_dim] contiguous
    k_out_ptr,  # [num_tokens, num_kv_heads, head_dim] contiguous; unused if WRITE_KV
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    num_heads,
    num_kv_heads,
    half,  # head_dim // 2
    q_norm_ptr,  # [head_dim]; read only if NORM
    k_norm_ptr,
    eps,
    # WRITE_KV only: the rotated key and the value go to their slot of the paged cache.
    v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    slot_mapping_ptr,  # [num_tokens] int64; < 0: write nothing (CUDA-graph padding)
    v_token_stride,
    v_head_stride,
    stride_k_block, stride_k_slot, stride_k_head,
    stride_v_block, stride_v_slot, stride_v_head,
    PAGE_SIZE: tl.constexpr,
    WRITE_KV: tl.constexpr,
    NORM: tl.constexpr,  # RMSNorm every q and k head before rotating it
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_K_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BLOCK_HALF]
    dim_mask = dims < half
    dtype = q_out_ptr.dtype.element_ty
    # The reference rounds cos/sin to the activation dtype before using them.
    cos = tl.load(cos_sin_ptr + pos * 2 * half + dims, mask=dim_mask, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * 2 * half + half + dims, mask=dim_mask, other=0.0)
    cos = round_as(cos, dtype)
    sin = round_as(sin, dtype)
    _rotate_heads(q_ptr, q_out_ptr + token * num_heads * 2 * half, token, cos, sin, q_token_stride, q_head_stride,
                  2 * half, num_heads, half, q_norm_ptr, eps, 0, NORM, BLOCK_Q_HEADS, BLOCK_HALF)
    if WRITE_KV:
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        block_id = tl.maximum(slot, 0) // PAGE_SIZE
        in_page = tl.maximum(slot, 0) % PAGE_SIZE
        _rotate_heads(k_ptr, k_cache_ptr + block_id * stride_k_block + in_page * stride_k_slot, token, cos, sin,
                      k_token_stride, k_head_stride, stride_k_head, num_kv_heads, half, k_norm_ptr, eps, slot,
                      NORM, BLOCK_K_HEADS, BLOCK_HALF)
        heads = tl.arange(0, BLOCK_K_HEADS)[:, None]
        mask = (heads < num_kv_heads) & dim_mask
        valid = mask & (heads * 0 + slot >= 0)
        src = v_ptr + token * v_token_stride + heads * v_head_stride + dims
        dst = v_cache_ptr + block_id * stride_v_block + in_page * stride_v_slot + heads * stride_v_head + dims
        cache_dtype = v_cache_ptr.dtype.element_ty
        v1 = tl.load(src, mask=mask)
        v2 = tl.load(src + half, mask=mask)
        tl.store(dst, v1.to(cache_dtype), mask=valid)
        tl.store(dst + half, v2.to(cache_dtype), mask=valid)
    else:
        _rotate_heads(k_ptr, k_out_ptr + token * num_kv_heads * 2 * half, token, cos, sin, k_token_stride,
                      k_head_stride, 2 * half, num_kv_heads, half, k_norm_ptr, eps, 0, NORM, BLOCK_K_HEADS,
                      BLOCK_HALF)


def rotary(
    positions: torch.Tensor,  # [num_tokens] int32/int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] fp32: cos | sin halves
    q_norm_weight: torch.Tensor | None = None,  # [head_dim]: RMSNorm each query head first
    k_norm_weight: torch.Tensor | None = None,  # [head_dim]: RMSNorm each key head first
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated ``(query, key)`` as new contiguous tensors; the inputs are left untouched.
    With both norm weights (in the activation dtype), each head is RMS-normalised first,
    as ``rotary_ref`` does.

    ``query``/``key`` may be strided views (e.g. slices of a fused QKV output) as long as
    their last dim is contiguous. Positions must lie in ``[0, max_positions)``: they are
    not bounds-checked on the device."""
    return _launch(positions, query, key, cos_sin_cache, q_norm_weight, k_norm_weight, eps)


def rotary_write_kv(
    positions: torch.Tensor,  # [num_tokens] int32/int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] fp32
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim], the key's dtype
    slot_mapping: torch.Tensor,  # [num_tokens] int64; < 0: skipped
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``rotary`` and ``triton_attention.write_kv`` in one launch: returns the rotated
    query; the rotated key and the value go straight to their cache slots (the rotated key
    is never written elsewhere). Bitwise what the two kernels give in turn."""
    return _launch(positions, query, key, cos_sin_cache, q_norm_weight, k_norm_weight, eps,
                   value, kv_cache, slot_mapping)[0]


def _launch(positions, query, key, cos_sin_cache, q_norm_weight, k_norm_weight, eps,
            value=None, kv_cache=None, slot_mapping=None):
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    assert key.shape == (num_tokens, num_kv_heads, head_dim) and key.dtype == query.dtype
    assert positions.shape == (num_tokens,) and head_dim % 2 == 0
    assert cos_sin_cache.shape[-1] == head_dim and cos_sin_cache.dtype == torch.float32
    if query.stride(-1) != 1:
        query = query.contiguous()
    if key.stride(-1) != 1:
        key = key.contiguous()
    cos_sin_cache = cos_sin_cache.contiguous()
    norm = q_norm_weight is not None
    assert norm == (k_norm_weight is not None), "both norm weights or neither"
    if norm:
        for w in (q_norm_weight, k_norm_weight):
            assert w.shape == (head_dim,) and w.dtype == query.dtype and w.is_contiguous(), (w.shape, w.dtype)
    write_kv = kv_cache is not None
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = None if write_kv else torch.empty(key.shape, dtype=key.dtype, device=key.device)
    if write_kv:
        assert value is not None and value.shape == key.shape and slot_mapping.shape == (num_tokens,)
        assert kv_cache.dtype == key.dtype and kv_cache.shape[-2:] == (num_kv_heads, head_dim), (kv_cache.shape, kv_cache.dtype)
        if value.stride(-1) != 1:
            value = value.contiguous()
        k_cache, v_cache = kv_cache[0], kv_cache[1]
    else:
        value = k_cache = v_cache = slot_mapping = key  # never read: WRITE_KV is False
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    block_q_heads = triton.next_power_of_2(num_heads)
    block_half = triton.next_power_of_2(half)
    num_warps = 4 if block_q_heads * block_half <= 2048 else 8
    cache_strides = (*k_cache.stride()[:3], *v_cache.stride()[:3]) if write_kv else (0,) * 6
    _rotary_kernel[(num_tokens,)](
        positions, query, key, cos_sin_cache, q_out, key if write_kv else k_out,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        num_heads, num_kv_heads, half,
        q_norm_weight if norm else cos_sin_cache, k_norm_weight if norm else cos_sin_cache, eps,
        value, k_cache, v_cache, slot_mapping, value.stride(0), value.stride(1), *cache_strides,
        PAGE_SIZE=kv_cache.shape[2] if write_kv else 1,
        WRITE_KV=write_kv,
        NORM=norm,
        BLOCK_Q_HEADS=block_q_heads,
        BLOCK_K_HEADS=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=block_half,
        num_warps=num_warps,
    )
    return q_out, k_out
