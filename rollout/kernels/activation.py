"""SiLU-and-mul over a fused gate/up projection, torch reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """``x``: [num_tokens, 2 * d] as (gate, up) -> [num_tokens, d]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)  # in place on silu's fresh output: one allocation
