"""RMSNorm with optional fused residual add, torch reference (HF numerics: fp32 inside)."""

from __future__ import annotations

import torch


def rms_norm_ref(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``norm(x)``, or with ``residual``: ``(norm(x + residual), x + residual)``."""
    if residual is not None:
        x = x + residual
        residual = x
    orig_dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(orig_dtype)
    return out if residual is None else (out, residual)
