"""Rotary embedding: a fp32 cos/sin cache built like HF's (default and llama3 scaling)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rollout.errors import UnsupportedModelError
from rollout.models.forward_context import current_ops


def rope_parameters(config: Any) -> dict[str, Any]:
    """The rope settings of an HF config, in either the transformers 5 layout
    (``rope_parameters``) or the older one (``rope_theta`` + ``rope_scaling``)."""
    params = getattr(config, "rope_parameters", None)
    if params:
        params = dict(params)
    else:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UnsupportedModelError(f"partial_rotary_factor={partial} is not supported; supported: 1.0")
    return params


def _inv_freq(head_dim: int, params: dict[str, Any]) -> torch.Tensor:
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise UnsupportedModelError(
        f"rope_type {rope_type!r} is not supported; supported: default, linear, llama3"
    )


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.init_args = (head_dim, max_positions, params)  # to rebuild the cache elsewhere
        inv_freq = _inv_freq(head_dim, params)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        # [max_positions, head_dim]: cos | sin; a buffer so it follows the module's device.
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_norm: Any = None, k_norm: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated (q, k); with ``q_norm``/``k_norm`` (RMSNorm modules over head_dim) each
        head is normalised first, fused into the same kernel."""
        if q_norm is None:
            return current_ops().rotary(positions, q, k, self.cos_sin_cache)
        return current_ops().rotary(positions, q, k, self.cos_sin_cache, q_norm.weight, k_norm.weight, q_norm.eps)
