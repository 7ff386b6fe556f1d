"""RMSNorm module over the kernel reference."""

from __future__ import annotations

import torch
from torch import nn

from rollout.models.forward_context import current_ops
from rollout.models.layers.linear import replicated_param


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = replicated_param((hidden,), dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return current_ops().rms_norm(x, self.weight, self.eps, residual)
