"""The per-step forward context: the one global, set by the model runner, read by attention.

It carries what every attention layer of one forward needs (paged-attention metadata and
the KV cache views) without threading it through every model's ``forward`` signature.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rollout.models.backends import TORCH_OPS, AttentionBackend, AttentionMetadata, Ops


@dataclass
class ExpertRoutes:
    """One forward's routed experts, shared by its MoE layers (the forward context's
    ``expert_routes``). Layer ``l`` (its index among the MoE layers) writes
    ``topk_ids[l, :num_tokens]``; where ``replay`` is set, it first reads the ids there and
    sends those tokens to them instead of the router's choice."""

    topk_ids: torch.Tensor  # [num_moe_layers, max_tokens, top_k] int64
    replay: torch.Tensor | None = None  # [num_tokens] bool: rows whose ids are given; None: none


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata
    kv_caches: list[torch.Tensor]  # per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]
    backend: AttentionBackend
    ops: Ops = TORCH_OPS  # RMSNorm, rotary, SiLU-and-mul implementations
    # MoE models: where the MoE layers record (and replay) each token's experts; None: not kept.
    expert_routes: ExpertRoutes | None = None


_current: ForwardContext | None = None


@contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[None]:
    """Install ``ctx`` for one forward. Refuses to nest: a nested forward is a bug."""
    global _current
    if _current is not None:
        raise RuntimeError("forward context is already set: forwards may not nest")
    _current = ctx
    try:
        yield
    finally:
        _current = None


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("no forward context: attention layers run only inside the model runner")
    return _current


def current_ops() -> Ops:
    """The op set of the forward in progress; the torch references outside one (tests,
    layers used on their own)."""
    return TORCH_OPS if _current is None else _current.ops


def current_routes() -> ExpertRoutes | None:
    """The forward's ``ExpertRoutes`` (None outside a forward or when it keeps none)."""
    return None if _current is None else _current.expert_routes
