"""The per-step forward context: the one global, set by the model runner, read by attention.

It carries what every attention layer of one forward needs (paged-attention metadata and
the KV cache views) without threading it through every model's ``forward`` signature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rollout.ops import TORCH_OPS, Ops


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V goes
    block_tables: torch.Tensor  # [num_reqs, max_blocks_per_req] int32
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [num_reqs] int32, context + new tokens
    query_start_loc_cpu: torch.Tensor | None  # host mirrors, for kernels that loop or size
    seq_lens_cpu: torch.Tensor | None  # grids; None inside a CUDA graph capture
    max_query_len: int
    max_seq_len: int
    # Every request has exactly one new token (a CUDA-graph decode step): backends must
    # then read only the device tensors above.
    decode_only: bool = False
    # [>= num_q_tiles * num_kv_heads] int32 zeros, persistent: lets a split-KV attention
    # kernel merge its splits in the same launch (the last split to arrive merges) instead
    # of a second launch. None: backends that split launch a separate combine.
    split_counters: torch.Tensor | None = None


@dataclass
class AttentionBackend:
    """The kernels attention layers call; the platform picks them."""

    name: str
    write_kv: Callable[..., None]
    attention: Callable[..., torch.Tensor]  # (q, kv_cache, AttentionMetadata, scale) -> out
    # Optional: rotary embedding (after an optional per-head q/k RMSNorm) and the K/V write
    # in one kernel: (positions, q, k, v, cos_sin_cache, kv_cache, slot_mapping, q_norm_weight,
    # k_norm_weight, eps) -> rotated q. None: the layer rotates, then ``write_kv``.
    rotary_write_kv: Callable[..., torch.Tensor] | None = None


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata
    kv_caches: list[torch.Tensor]  # per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]
    backend: AttentionBackend
    ops: Ops = TORCH_OPS  # RMSNorm, rotary, SiLU-and-mul implementations


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
