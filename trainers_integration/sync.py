"""Feeding a stream of ``(name, tensor)`` pairs into ``LLM.update_weights`` in chunks."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from rollout.weight_sync.bucket import DEFAULT_BUCKET_BYTES


def update_weights_in_buckets(
    llm, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    version: int | None = None,
) -> tuple[int, int]:
    """``llm.update_weights`` one chunk of at most ``bucket_bytes`` at a time (a larger tensor
    goes alone), so a stream (FSDP2, ZeRO-3) is never held whole. Every chunk gets the same
    version: ``version``, or the engine's current one + 1. Each chunk is checked before it is
    copied, but chunks already loaded stay loaded if a later one fails. Returns
    (tensors loaded, bytes loaded)."""
    if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
    target = llm.weight_version + 1 if version is None else version
    num_tensors = num_bytes = 0
    chunk: list[tuple[str, torch.Tensor]] = []
    chunk_bytes = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if chunk and chunk_bytes + nbytes > bucket_bytes:
            num_tensors += llm.update_weights(chunk, version=target)
            chunk, chunk_bytes = [], 0  # drop our references before gathering more
        chunk.append((name, tensor))
        chunk_bytes += nbytes
        num_bytes += nbytes
    if chunk or num_tensors == 0:  # an empty stream still bumps the version
        num_tensors += llm.update_weights(chunk, version=target)
    return num_tensors, num_bytes
