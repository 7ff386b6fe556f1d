"""Token embedding and LM head, vocab-parallel: each of ``tp_size`` ranks holds a slice of
``ceil(vocab / tp_size)`` rows (the last slice zero-padded past the vocab)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rollout.distributed.communication import (
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from rollout.models.forward_context import current_ops
from rollout.models.layers.linear import _attach, _param


def _vocab_param(vocab_size: int, hidden: int, dtype: torch.dtype, tp_rank: int, tp_size: int) -> nn.Parameter:
    """This rank's [ceil(vocab / tp_size), hidden] rows; its loader keeps them out of a
    full HF [vocab, hidden] tensor and zeroes the padding rows."""
    num_local = -(-vocab_size // tp_size)
    start = min(tp_rank * num_local, vocab_size)
    n = min(num_local, vocab_size - start)

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: None = None) -> None:
        param.data[:n].copy_(loaded.narrow(0, start, n))
        param.data[n:].zero_()

    param = _attach(_param((num_local, hidden), dtype), lambda s: torch.Size((vocab_size, hidden)), load)
    param.vocab_start, param.vocab_end = start, start + n
    return param


class VocabEmbedding(nn.Module):
    def __init__(
        self, vocab_size: int, hidden: int, dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1,
        tp_group: Any = None,
    ) -> None:
        super().__init__()
        self.vocab_size, self.tp_rank, self.tp_size, self.tp_group = vocab_size, tp_rank, tp_size, tp_group
        self.weight = _vocab_param(vocab_size, hidden, dtype, tp_rank, tp_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        # Ids outside this rank's slice look up row 0 and are zeroed; the sum over ranks
        # leaves each token exactly its own row.
        start, end = self.weight.vocab_start, self.weight.vocab_end
        outside = (input_ids < start) | (input_ids >= end)  # [num_tokens]
        h = F.embedding((input_ids - start).masked_fill(outside, 0), self.weight)
        return tensor_model_parallel_all_reduce(h.masked_fill(outside[:, None], 0.0), self.tp_group)


class LMHead(nn.Module):
    """Projects hidden states to vocab logits; shares the embedding's parameter when tied.
    Under tensor parallelism each rank computes its vocab slice and the slices are gathered,
    so every rank samples from the same full logits."""

    def __init__(
        self, vocab_size: int, hidden: int, dtype: torch.dtype, tied_to: VocabEmbedding | None = None,
        tp_rank: int = 0, tp_size: int = 1, tp_group: Any = None,
    ) -> None:
        super().__init__()
        self.vocab_size, self.tp_size, self.tp_group = vocab_size, tp_size, tp_group
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = _vocab_param(vocab_size, hidden, dtype, tp_rank, tp_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = current_ops().linear(hidden, self.weight)  # [num_rows, ceil(vocab / tp_size)]
        if self.tp_size == 1:
            return logits
        return tensor_model_parallel_all_gather(logits, self.tp_group)[:, : self.vocab_size]
