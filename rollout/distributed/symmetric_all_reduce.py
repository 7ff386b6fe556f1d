"""A one-shot all-reduce over CUDA symmetric memory for the model's small all-reduces.

A decode step of a tensor-parallel model all-reduces a few KB to a few MB twice per layer;
NCCL's ring costs ~20-30 us per call there on two NVLink-connected H100s, a large part of
the step at small batches. Here every rank copies its tensor into a buffer the other ranks
of the group can read over NVLink (peer-to-peer loads, no NVLink multicast), and each rank
sums all of them itself, in rank order, so every rank gets bitwise the same result. Larger
tensors (prefill) and anything this cannot take stay on NCCL.

``ROLLOUT_SYMM_ALL_REDUCE=0`` turns it off (NCCL everywhere).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 4 << 20  # a decode step of up to 256 rows x 8192 bf16 features
_ALIGN = 16  # the kernel wants the local input and its buffer slot equally aligned


class SymmetricAllReduce:
    """Sums tensors of at most ``max_bytes`` over ``group`` through a symmetric buffer of
    that size. Build it with ``create`` on every rank of the group (it is collective)."""

    def __init__(self, buffer: torch.Tensor, group_name: str, max_bytes: int) -> None:
        self.buffer = buffer  # uint8 [max_bytes], symmetric over the group
        self.group_name = group_name
        self.max_bytes = max_bytes
        self._op = torch.ops.symm_mem.one_shot_all_reduce_copy_out

    @staticmethod
    def create(group: Any, device: torch.device, max_bytes: int = DEFAULT_MAX_BYTES) -> SymmetricAllReduce | None:
        """The all-reduce for ``group`` on ``device``, or None where it does not apply: off
        CUDA, turned off by ``ROLLOUT_SYMM_ALL_REDUCE=0``, or a torch without symmetric
        memory. Every rank of ``group`` must call it (the buffer's rendezvous is collective)
        and every rank decides alike, from the same torch build and environment."""
        if device.type != "cuda" or os.environ.get("ROLLOUT_SYMM_ALL_REDUCE", "1") == "0":
            return None
        if not hasattr(torch.ops, "symm_mem") or not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):
            return None
        import torch.distributed._symmetric_memory as symm_mem

        group_name = group.group_name
        try:
            if hasattr(symm_mem, "enable_symm_mem_for_group"):  # required by older torch, a no-op later
                symm_mem.enable_symm_mem_for_group(group_name)
            with torch.cuda.device(device):
                buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
                symm_mem.rendezvous(buffer, group_name)
        except Exception as e:  # no peer access between the GPUs, say: NCCL does it all
            logger.warning("symmetric memory unavailable (%s: %s); tensor-parallel all-reduces use NCCL", type(e).__name__, e)
            return None
        logger.info("tensor-parallel all-reduce: one-shot over symmetric memory up to %d bytes, NCCL above", max_bytes)
        return SymmetricAllReduce(buffer, group_name, max_bytes)

    def applies(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return (
            x.is_cuda and x.is_contiguous() and 0 < nbytes <= self.max_bytes
            and x.data_ptr() % _ALIGN == 0 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the group in a new tensor (``applies(x)`` must hold)."""
        slot = self.buffer[: x.numel() * x.element_size()].view(x.dtype).view(x.shape)
        out = torch.empty_like(x)
        return self._op(slot, x, "sum", self.group_name, out)

    def all_reduce(self, x: torch.Tensor, group: Any) -> torch.Tensor:
        """The sum over the group: here when ``applies(x)``, else NCCL in place on ``x``."""
        if self.applies(x):
            return self(x)
        dist.all_reduce(x, group=group)
        return x
