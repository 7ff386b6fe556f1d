"""Op sets: which implementation of the small per-layer ops (RMSNorm, rotary, SiLU-and-mul)
the layers call. The platform names one; the model runner puts it in the forward context."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rollout.errors import PlatformError
from rollout.kernels.activation import silu_and_mul_ref
from rollout.kernels.layernorm import rms_norm_ref
from rollout.kernels.rotary import rotary_ref


@dataclass(frozen=True)
class Ops:
    name: str
    rms_norm: Callable  # (x, weight, eps, residual=None) -> out | (out, residual)
    # (positions, q, k, cos_sin_cache, q_norm_weight=None, k_norm_weight=None, eps) -> (q, k):
    # with norm weights, every q and k head is RMS-normalised first (Qwen3), in the same pass.
    rotary: Callable
    silu_and_mul: Callable  # (x [T, 2d]) -> [T, d]
    # One-pass sampling for steps with no filter (temperature only): (logits, temperature,
    # noise, seed=None) -> (token ids, logprobs); None: the sampler's torch path does everything.
    sample_tokens: Callable | None = None
    # (logits, temperature, token ids) -> 1-based ranks, for that path's logprobs.
    rank_tokens: Callable | None = None


TORCH_OPS = Ops("torch", rms_norm_ref, rotary_ref, silu_and_mul_ref)


def _triton_ops() -> Ops:
    # Imported on demand: installs without triton (or without a GPU) never load it.
    from rollout.kernels.triton_activation import silu_and_mul
    from rollout.kernels.triton_layernorm import rms_norm
    from rollout.kernels.triton_rotary import rotary
    from rollout.kernels.triton_sampling import rank_tokens, sample_tokens

    return Ops("triton", rms_norm, rotary, silu_and_mul, sample_tokens, rank_tokens)


def get_ops(name: str) -> Ops:
    if name == "torch":
        return TORCH_OPS
    if name == "triton":
        return _triton_ops()
    raise PlatformError(f"unknown op set {name!r}; known: ['torch', 'triton']")
