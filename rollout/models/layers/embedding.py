"""Token embedding and LM head, vocab-sharded across ranks (one rank for now)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rollout.models.layers.linear import _attach, _param


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        if tp_size != 1:
            raise NotImplementedError("vocab-parallel embedding arrives with tensor parallelism")
        self.vocab_size = vocab_size
        self.weight = _param((vocab_size, hidden), dtype)
        _attach(self.weight, lambda s: torch.Size((vocab_size, hidden)), _load_rows)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Projects hidden states to vocab logits; shares the embedding's parameter when tied."""

    def __init__(self, vocab_size: int, hidden: int, dtype: torch.dtype, tied_to: VocabEmbedding | None = None) -> None:
        super().__init__()
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = _param((vocab_size, hidden), dtype)
            _attach(self.weight, lambda s: torch.Size((vocab_size, hidden)), _load_rows)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)


def _load_rows(param: nn.Parameter, loaded: torch.Tensor, shard_id: None = None) -> None:
    param.data.copy_(loaded)
