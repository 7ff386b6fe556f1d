"""RMSNorm with optional fused residual add, torch reference (HF numerics: fp32 inside)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def rms_norm_ref(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``norm(x)``, or with ``residual``: ``(norm(x + residual), x + residual)``."""
    return rms_norm_with(_mean_square, x, weight, eps, residual)


def _mean_square(h: torch.Tensor) -> torch.Tensor:
    return h.pow(2).mean(-1, keepdim=True)


def rms_norm_with(
    mean_square: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, weight: torch.Tensor, eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``rms_norm_ref`` with the mean of squares of the fp32 rows [.., hidden] -> [.., 1]
    computed by ``mean_square`` (the batch-invariant variant reduces row by row)."""
    if residual is not None:
        x = x + residual
        residual = x
    orig_dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(mean_square(h) + eps)
    out = weight * h.to(orig_dtype)
    return out if residual is None else (out, residual)
