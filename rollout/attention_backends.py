"""Attention backends by name; the platform says which name to use."""

from __future__ import annotations

from collections.abc import Callable

from rollout.errors import PlatformError
from rollout.forward_context import AttentionBackend, AttentionMetadata
from rollout.kernels.attention import paged_attention_ref, paged_attention_sdpa, paged_decode_sdpa, write_kv_ref


def _torch_attention(q, kv_cache, md: AttentionMetadata, scale: float):
    return paged_attention_ref(q, kv_cache, md.block_tables, md.query_start_loc_cpu, md.seq_lens_cpu, scale)


def _sdpa_attention(q, kv_cache, md: AttentionMetadata, scale: float):
    if md.decode_only:
        return paged_decode_sdpa(q, kv_cache, md.block_tables, md.seq_lens, scale)
    return paged_attention_sdpa(q, kv_cache, md.block_tables, md.query_start_loc_cpu, md.seq_lens_cpu, scale)


def _triton_backend() -> AttentionBackend:
    """Triton kernels (GPU). Imported on first use: installs without triton still import us."""
    try:
        from rollout.kernels.triton_attention import paged_attention, write_kv
        from rollout.kernels.triton_rotary import rotary_write_kv
    except ImportError as e:
        raise PlatformError(f"attention backend 'triton' needs triton: {e}") from e

    def attention(q, kv_cache, md: AttentionMetadata, scale: float):
        return paged_attention(
            q, kv_cache, md.block_tables, md.query_start_loc, md.seq_lens, scale,
            max_query_len=md.max_query_len, max_seq_len=md.max_seq_len, split_counters=md.split_counters,
        )

    return AttentionBackend("triton", write_kv, attention, rotary_write_kv)


_BACKENDS = {
    # The reference: one request at a time, plain matmuls in fp32.
    "torch": AttentionBackend("torch", write_kv_ref, _torch_attention),
    # The same maths through SDPA with decodes batched: the default off-GPU fast path.
    "torch_sdpa": AttentionBackend("torch_sdpa", write_kv_ref, _sdpa_attention),
}
# Backends whose kernels need an optional package: built on first use.
_LAZY_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {
    # One Triton launch per step over prefill chunks and decodes; write_kv skips slot < 0;
    # the K/V write rides in the rotary kernel.
    "triton": _triton_backend,
}


def get_attention_backend(name: str) -> AttentionBackend:
    if name in _BACKENDS:
        return _BACKENDS[name]
    if name in _LAZY_BACKENDS:
        return _LAZY_BACKENDS[name]()
    known = sorted([*_BACKENDS, *_LAZY_BACKENDS])
    raise PlatformError(f"unknown attention backend {name!r}; known: {known}")
