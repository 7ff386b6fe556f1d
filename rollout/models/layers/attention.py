"""Attention layer: rotates q and k (rotary embedding, after Qwen3's q/k norm), writes this
step's K/V into the paged cache, then attends over it. Where the backend has a kernel for
it, the rotation and the K/V write are one launch."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rollout.models.forward_context import get_forward_context


class Attention(nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None,
        rotary: Any = None, q_norm: Any = None, k_norm: Any = None,
    ) -> torch.Tensor:
        """q [num_tokens, num_heads, head_dim], k/v [num_tokens, num_kv_heads, head_dim]
        -> [num_tokens, num_heads * head_dim]. With ``rotary`` (a RotaryEmbedding) q and k
        are rotated at ``positions`` first, each head RMS-normalised before by ``q_norm`` /
        ``k_norm`` when given."""
        ctx = get_forward_context()
        md = ctx.attn_metadata
        kv_cache = ctx.kv_caches[self.layer_idx]
        fused = ctx.backend.rotary_write_kv
        if rotary is not None and fused is not None:
            norms = (q_norm.weight, k_norm.weight, q_norm.eps) if q_norm is not None else (None, None, 1e-6)
            q = fused(positions, q, k, v, rotary.cos_sin_cache, kv_cache, md.slot_mapping, *norms)
        else:
            if rotary is not None:
                q, k = rotary(positions, q, k, q_norm, k_norm)
            ctx.backend.write_kv(k, v, kv_cache, md.slot_mapping)
        out = ctx.backend.attention(q, kv_cache, md, self.scale)
        return out.reshape(q.shape[0], -1)
