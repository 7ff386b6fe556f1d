"""Attention layer: writes this step's K/V into the paged cache, then attends over it."""

from __future__ import annotations

import torch
from torch import nn

from rollout.forward_context import get_forward_context


class Attention(nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [num_tokens, num_heads, head_dim], k/v [num_tokens, num_kv_heads, head_dim]
        -> [num_tokens, num_heads * head_dim]."""
        ctx = get_forward_context()
        md = ctx.attn_metadata
        kv_cache = ctx.kv_caches[self.layer_idx]
        ctx.backend.write_kv(k, v, kv_cache, md.slot_mapping)
        out = ctx.backend.attention(q, kv_cache, md, self.scale)
        return out.reshape(q.shape[0], -1)
