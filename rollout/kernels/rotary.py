"""Rotary position embedding (neox / rotate-half layout, as HF Llama and Qwen), torch
reference; optionally after a per-head RMSNorm of q and k (Qwen3's q_norm / k_norm)."""

from __future__ import annotations

import torch

from rollout.kernels.layernorm import rms_norm_ref


def rotary_ref(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] fp32: cos | sin halves
    q_norm_weight: torch.Tensor | None = None,  # [head_dim]: RMSNorm each query head first
    k_norm_weight: torch.Tensor | None = None,  # [head_dim]: RMSNorm each key head first
    eps: float = 1e-6,  # of those norms
) -> tuple[torch.Tensor, torch.Tensor]:
    if q_norm_weight is not None:
        query = rms_norm_ref(query, q_norm_weight, eps)
    if k_norm_weight is not None:
        key = rms_norm_ref(key, k_norm_weight, eps)
    half = cos_sin_cache.shape[-1] // 2
    num_tokens = positions.shape[0]
    # [num_tokens, 2, head_dim]: (cos | cos) and (sin | sin), HF's layout, in one copy.
    cos_sin = cos_sin_cache.index_select(0, positions).view(num_tokens, 2, 1, half)
    cos_sin = cos_sin.expand(num_tokens, 2, 2, half).reshape(num_tokens, 2, 2 * half)
    cos, sin = cos_sin[:, :1], cos_sin[:, 1:]  # [num_tokens, 1, head_dim] each

    def rotate(x: torch.Tensor) -> torch.Tensor:
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return x * c + torch.cat((-x2, x1), dim=-1) * s

    qk = _adjacent_heads(query, key)
    if qk is None:
        return rotate(query), rotate(key)
    # q and k are the two halves of one fused projection: rotate them in one pass.
    out = rotate(qk)
    return out[:, : query.shape[1]], out[:, query.shape[1] :]


def _adjacent_heads(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """``[num_tokens, num_heads + num_kv_heads, head_dim]`` viewing both when ``key``'s heads
    directly follow ``query``'s in memory (both split from one qkv row), else None."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    if (
        # Under autograd the strided view would send key's gradient nowhere (as_strided's
        # backward covers query's own elements only): rotate them apart, bit for bit the same.
        (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad))
        or query.dtype != key.dtype or query.shape[0] != key.shape[0] or key.shape[2] != head_dim
        or query.stride() != key.stride() or query.stride()[1:] != (head_dim, 1)
        or query.untyped_storage().data_ptr() != key.untyped_storage().data_ptr()
        or key.storage_offset() != query.storage_offset() + num_heads * head_dim
    ):
        return None
    shape = (query.shape[0], num_heads + key.shape[1], head_dim)
    return query.as_strided(shape, query.stride(), query.storage_offset())
