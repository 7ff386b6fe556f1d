"""Full weights of an FSDP2 (``fully_shard``) model, streamed parameter by parameter.

Gathering is collective: every rank of the FSDP mesh must run the iterator to the end, in
the same order (``named_parameters`` order is the same on every rank of one model).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from rollout.weight_sync.bucket import DEFAULT_BUCKET_BYTES
from trainers_integration.hf_module import hf_name


def _full(param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return param.full_tensor()  # all-gather over the mesh: collective
    return param.detach()  # unsharded (reshard_after_forward=False) or not wrapped


@torch.no_grad()
def iter_full_weight_buckets(
    module: torch.nn.Module, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    prefix_map: Mapping[str, str] | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Lists of ``(hf_name, full tensor)`` of at most ``bucket_bytes`` each (a larger tensor
    comes alone), gathered one parameter at a time: besides the shards, at most one bucket
    of full tensors is held here."""
    if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
    bucket: list[tuple[str, torch.Tensor]] = []
    used = 0
    for name, param in module.named_parameters():
        full = _full(param)
        nbytes = full.numel() * full.element_size()
        if bucket and used + nbytes > bucket_bytes:
            yield bucket
            bucket, used = [], 0
        bucket.append((hf_name(name, prefix_map), full))
        used += nbytes
    if bucket:
        yield bucket


def iter_full_weights(
    module: torch.nn.Module, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    prefix_map: Mapping[str, str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, full tensor)`` for every parameter of an FSDP2 model, on every rank
    (collective; see the module docstring). Full tensors are gathered a bucket at a time
    and handed over as they are yielded, so the whole model is never gathered at once;
    pair with ``update_weights_in_buckets`` to keep the consumer bounded too."""
    for bucket in iter_full_weight_buckets(module, bucket_bytes, prefix_map):
        bucket.reverse()
        while bucket:
            yield bucket.pop()  # the consumer now holds the only reference
