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
    cos_sin = cos_sin_cache.index_select(0, positions)
    cos = cos_sin[:, :half].repeat(1, 2)[:, None, :]  # [num_tokens, 1, head_dim]
    sin = cos_sin[:, half:].repeat(1, 2)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return x * c + torch.cat((-x2, x1), dim=-1) * s

    return rotate(query), rotate(key)
