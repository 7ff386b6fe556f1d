"""Attention backends by name; the platform says which name to use."""

from __future__ import annotations

from rollout.errors import PlatformError
from rollout.forward_context import AttentionBackend, AttentionMetadata
from rollout.kernels.attention import paged_attention_ref, paged_attention_sdpa, write_kv_ref


def _torch_attention(q, kv_cache, md: AttentionMetadata, scale: float):
    return paged_attention_ref(q, kv_cache, md.block_tables, md.query_start_loc_cpu, md.seq_lens_cpu, scale)


def _sdpa_attention(q, kv_cache, md: AttentionMetadata, scale: float):
    return paged_attention_sdpa(q, kv_cache, md.block_tables, md.query_start_loc_cpu, md.seq_lens_cpu, scale)


_BACKENDS = {
    # The reference: one request at a time, plain matmuls in fp32.
    "torch": AttentionBackend("torch", write_kv_ref, _torch_attention),
    # The same maths through SDPA with decodes batched: the default off-GPU fast path.
    "torch_sdpa": AttentionBackend("torch_sdpa", write_kv_ref, _sdpa_attention),
}


def get_attention_backend(name: str) -> AttentionBackend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise PlatformError(f"unknown attention backend {name!r}; known: {sorted(_BACKENDS)}") from None
