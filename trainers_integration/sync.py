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
    copied; when a later chunk (or the stream itself) fails, the chunks already loaded stay
    loaded and the weights not reached are marked stale (``LLM.mark_partial_update``): the
    engine refuses to generate with a mix of versions until they are loaded, and the error
    propagates. Returns (tensors loaded, bytes loaded)."""
    if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
    target = llm.weight_version + 1 if version is None else version
    num_tensors = num_bytes = 0
    loaded: set[str] = set()
    chunk: list[tuple[str, torch.Tensor]] = []
    chunk_bytes = 0

    def flush() -> int:
        n = llm.update_weights(chunk, version=target)
        loaded.update(name for name, _ in chunk)
        return n

    try:
        for name, tensor in named_tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if chunk and chunk_bytes + nbytes > bucket_bytes:
                num_tensors += flush()
                chunk, chunk_bytes = [], 0  # drop our references before gathering more
            chunk.append((name, tensor))
            chunk_bytes += nbytes
            num_bytes += nbytes
        if chunk or num_tensors == 0:  # an empty stream still bumps the version
            num_tensors += flush()
    except BaseException:
        if loaded:
            llm.mark_partial_update(loaded)
        raise
    return num_tensors, num_bytes
