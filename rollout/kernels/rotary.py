"""Rotary position embedding (neox / rotate-half layout, as HF Llama and Qwen), torch reference."""

from __future__ import annotations

import torch


def rotary_ref(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] fp32: cos | sin halves
) -> tuple[torch.Tensor, torch.Tensor]:
    half = cos_sin_cache.shape[-1] // 2
    cos_sin = cos_sin_cache.index_select(0, positions)
    cos = cos_sin[:, :half].repeat(1, 2)[:, None, :]  # [num_tokens, 1, head_dim]
    sin = cos_sin[:, half:].repeat(1, 2)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return x * c + torch.cat((-x2, x1), dim=-1) * s

    return rotate(query), rotate(key)
