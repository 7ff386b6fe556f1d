"""The kernels a model's layers call, chosen once per engine: the attention backend (paged
attention and the K/V-cache write, with the buffers its kernels need) and the op set
(RMSNorm, rotary, SiLU-and-mul, the one-pass sampler, the sampling penalties). The
platform names them; the model runner creates them and puts them in the forward context.

A backend owns its buffers: they are allocated when it is created, sized by ``BackendLimits``,
and never replaced, so CUDA graphs may capture their addresses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rollout.errors import PlatformError
from rollout.kernels.activation import silu_and_mul_ref
from rollout.kernels.attention import paged_attention_ref, paged_attention_sdpa, paged_decode_sdpa, write_kv_ref
from rollout.kernels.fp8 import fp8_linear_ref
from rollout.kernels.invariant import (
    fused_moe_rows, linear_rows, log_softmax_rows, paged_attention_rows, rms_norm_rows, rotary_rows,
)
from rollout.kernels.layernorm import rms_norm_ref
from rollout.kernels.moe import fused_moe_fp8_ref, fused_moe_ref
from rollout.kernels.penalties import apply_penalties_ref
from rollout.kernels.rotary import rotary_ref


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V goes
    block_tables: torch.Tensor  # [num_reqs, max_blocks_per_req] int32
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [num_reqs] int32, context + new tokens
    query_start_loc_cpu: torch.Tensor | None  # host mirrors, for kernels that loop or size
    seq_lens_cpu: torch.Tensor | None  # grids; None inside a CUDA graph capture
    max_query_len: int
    max_seq_len: int
    # Every request has exactly one new token (a CUDA-graph decode step): backends must
    # then read only the device tensors above.
    decode_only: bool = False


@dataclass(frozen=True)
class BackendLimits:
    """The largest step a backend's buffers must serve."""

    num_kv_heads: int  # of this rank
    max_num_batched_tokens: int
    max_num_seqs: int
    device: torch.device


class AttentionBackend:
    """``write_kv(key, value, kv_cache, slot_mapping)`` and ``attention(q, kv_cache,
    AttentionMetadata, scale) -> out``; optionally ``rotary_write_kv(positions, q, k, v,
    cos_sin_cache, kv_cache, slot_mapping, q_norm_weight, k_norm_weight, eps) -> rotated q``:
    the rotation (after an optional per-head q/k RMSNorm) and the K/V write in one kernel
    (None: the layer rotates, then ``write_kv``)."""

    name: str = ""
    write_kv: Callable[..., None] = staticmethod(write_kv_ref)
    rotary_write_kv: Callable[..., torch.Tensor] | None = None

    def attention(self, q: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, scale: float) -> torch.Tensor:
        raise NotImplementedError


class TorchAttention(AttentionBackend):
    """The reference: one request at a time, plain matmuls in fp32."""

    name = "torch"

    def attention(self, q, kv_cache, md, scale):
        return paged_attention_ref(q, kv_cache, md.block_tables, md.query_start_loc_cpu, md.seq_lens_cpu, scale)


class SdpaAttention(AttentionBackend):
    """The same maths through SDPA with decodes batched: the default off-GPU fast path."""

    name = "torch_sdpa"

    def attention(self, q, kv_cache, md, scale):
        if md.decode_only:
            return paged_decode_sdpa(q, kv_cache, md.block_tables, md.seq_lens, scale)
        return paged_attention_sdpa(q, kv_cache, md.block_tables, md.query_start_loc_cpu, md.seq_lens_cpu, scale)


class InvariantTorchAttention(AttentionBackend):
    """Batch-invariant: every query token attends on its own (``paged_attention_rows``), so
    its result never depends on the other tokens of the step (exact on-policy mode)."""

    name = "torch_invariant"

    def attention(self, q, kv_cache, md, scale):
        return paged_attention_rows(q, kv_cache, md.block_tables, md.query_start_loc_cpu, md.seq_lens_cpu, scale)


class TritonAttention(AttentionBackend):
    """One Triton launch per step over prefill chunks and decodes; ``write_kv`` skips slot
    < 0; the K/V write rides in the rotary kernel. Reads device tensors only (CUDA graphs)."""

    name = "triton"

    def __init__(self, limits: BackendLimits | None) -> None:
        try:  # imported here: installs without triton still import this module
            from rollout.kernels.triton_attention import paged_attention, write_kv
            from rollout.kernels.triton_rotary import rotary_write_kv
        except ImportError as e:
            raise PlatformError(f"attention backend 'triton' needs triton: {e}") from e
        self._paged_attention = paged_attention
        self.write_kv = write_kv
        self.rotary_write_kv = rotary_write_kv
        # Split-KV attention counts each (query tile, KV head)'s finished splits here so the
        # last one merges them in the same launch. A step has at most max(batched tokens,
        # seqs) tokens and num_q_tiles <= num_tokens + num_seqs. Launches leave it zero.
        # None (no limits given): the splits merge in a second launch.
        self.split_counters: torch.Tensor | None = None
        if limits is not None:
            max_q_tiles = max(limits.max_num_batched_tokens, limits.max_num_seqs) + limits.max_num_seqs
            self.split_counters = torch.zeros(max_q_tiles * limits.num_kv_heads, dtype=torch.int32, device=limits.device)

    def attention(self, q, kv_cache, md, scale):
        return self._paged_attention(
            q, kv_cache, md.block_tables, md.query_start_loc, md.seq_lens, scale,
            max_query_len=md.max_query_len, max_seq_len=md.max_seq_len, split_counters=self.split_counters,
        )


class TritonInvariantAttention(AttentionBackend):
    """Batch-invariant on GPU (exact on-policy mode): ``paged_attention_invariant`` walks
    every query's keys in the same fixed blocks from position 0, with no split, so a
    token's result is the same in any step layout and in the trainer's forward. Rotary is
    not fused (the layer calls the op set's, then ``write_kv``). Under autograd (the
    trainer) the write is differentiable and the attention's backward recomputes in torch.
    Reads device tensors only (CUDA graphs)."""

    name = "triton_invariant"

    def __init__(self) -> None:
        try:  # imported here: installs without triton still import this module
            from rollout.kernels.triton_invariant import paged_attention_invariant, write_kv_invariant
        except ImportError as e:
            raise PlatformError(f"attention backend 'triton_invariant' needs triton: {e}") from e
        self._paged_attention = paged_attention_invariant
        self.write_kv = write_kv_invariant

    def attention(self, q, kv_cache, md, scale):
        return self._paged_attention(
            q, kv_cache, md.block_tables, md.query_start_loc, md.seq_lens, scale, md.max_query_len, md.max_seq_len,
        )


_ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {
    "torch": TorchAttention, "torch_sdpa": SdpaAttention, "triton": TritonAttention,
    "torch_invariant": InvariantTorchAttention, "triton_invariant": TritonInvariantAttention,
}


def create_attention_backend(name: str, limits: BackendLimits | None = None) -> AttentionBackend:
    """The attention backend ``name`` with its buffers sized for ``limits`` (None: without
    the optional buffers, for kernels used on their own)."""
    cls = _ATTENTION_BACKENDS.get(name)
    if cls is None:
        raise PlatformError(f"unknown attention backend {name!r}; known: {sorted(_ATTENTION_BACKENDS)}")
    return cls(limits) if cls is TritonAttention else cls()


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
    # (logits, idx, rows, values, output_counts, prompt_mask) -> None: repetition, presence
    # and frequency penalties on the fp32 logits of the penalised rows, in place.
    apply_penalties: Callable = apply_penalties_ref
    # (x, weight, bias=None) -> x @ weight.T + bias: every linear layer and the LM head.
    linear: Callable = F.linear
    # (logits [rows, vocab]) -> fp32 log-probabilities (score()'s and prompt logprobs').
    log_softmax: Callable = lambda logits: torch.log_softmax(logits.float(), dim=-1)
    # (x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k], topk_ids [T, k]) -> [T, H]:
    # the routed experts of a MoE layer (rollout.kernels.moe).
    fused_moe: Callable = fused_moe_ref
    # (x [..., K], w_q fp8 [N, K], w_scale fp32 [ceil(N/128), ceil(K/128)], bias=None) -> [..., N]
    # in x's dtype: linear layers of quantization="fp8" (x quantized per token and 128-group).
    # The Triton set has rollout.kernels.triton_fp8 (fp8 tl.dot: CUDA sm_89+).
    fp8_linear: Callable = fp8_linear_ref
    # (x [T, H], w13_q fp8 [E, 2I, H], w13_scale [E, 2 * ceil(I/128), ceil(H/128)], w2_q fp8
    # [E, H, I], w2_scale [E, ceil(H/128), ceil(I/128)], topk_weights, topk_ids) -> [T, H]:
    # the experts of quantization="fp8" (rollout.kernels.moe; gate and up each their own blocks).
    # The Triton set has rollout.kernels.triton_moe_fp8 (fp8 tl.dot: CUDA sm_89+).
    fused_moe_fp8: Callable = fused_moe_fp8_ref
    # Every op gives each token the same result whatever else is in the call.
    batch_invariant: bool = False
    # Ops that read device values on the host (the torch MoE loops: unique/where), which a
    # CUDA graph cannot capture: a model running one of them decodes eagerly.
    host_sync_ops: tuple[str, ...] = ()


_TORCH_MOE = ("fused_moe", "fused_moe_fp8")
TORCH_OPS = Ops("torch", rms_norm_ref, rotary_ref, silu_and_mul_ref, host_sync_ops=_TORCH_MOE)
# Exact on-policy mode off-GPU: every reduction once per token (rollout.kernels.invariant).
TORCH_INVARIANT_OPS = Ops(
    "torch_invariant", rms_norm_rows, rotary_rows, silu_and_mul_ref, linear=linear_rows, log_softmax=log_softmax_rows,
    fused_moe=fused_moe_rows, batch_invariant=True, host_sync_ops=_TORCH_MOE,
)


def _triton_ops(fp8_dot: bool = True) -> Ops:
    # Imported on demand: installs without triton (or without a GPU) never load it.
    # fp8_dot=False ("triton_no_fp8", GPUs before sm_89): the FP8 layers run the references.
    from rollout.kernels.triton_activation import silu_and_mul
    from rollout.kernels.triton_fp8 import fp8_linear
    from rollout.kernels.triton_layernorm import rms_norm
    from rollout.kernels.triton_moe import fused_moe
    from rollout.kernels.triton_moe_fp8 import fused_moe_fp8
    from rollout.kernels.triton_penalties import apply_penalties
    from rollout.kernels.triton_rotary import rotary
    from rollout.kernels.triton_sampling import rank_tokens, sample_tokens

    if not fp8_dot:
        return Ops("triton_no_fp8", rms_norm, rotary, silu_and_mul, sample_tokens, rank_tokens, apply_penalties,
                   fused_moe=fused_moe, host_sync_ops=("fused_moe_fp8",))
    return Ops("triton", rms_norm, rotary, silu_and_mul, sample_tokens, rank_tokens, apply_penalties,
               fused_moe=fused_moe, fp8_linear=fp8_linear, fused_moe_fp8=fused_moe_fp8)


def _triton_invariant_ops() -> Ops:
    # Exact on-policy mode on GPU: fixed-tiling matmul and fused MoE, per-row RMSNorm,
    # per-token rotary, elementwise SiLU-and-mul; Triton forwards, differentiable for the trainer.
    from rollout.kernels.triton_invariant import (
        fused_moe_invariant, linear_invariant, log_softmax_invariant, rms_norm_invariant, rotary_invariant,
        silu_and_mul_invariant,
    )
    from rollout.kernels.triton_penalties import apply_penalties

    return Ops(
        "triton_invariant", rms_norm_invariant, rotary_invariant, silu_and_mul_invariant,
        apply_penalties=apply_penalties, linear=linear_invariant, log_softmax=log_softmax_invariant,
        fused_moe=fused_moe_invariant, batch_invariant=True,
    )


def get_ops(name: str) -> Ops:
    if name == "torch":
        return TORCH_OPS
    if name == "torch_invariant":
        return TORCH_INVARIANT_OPS
    if name == "triton":
        return _triton_ops()
    if name == "triton_no_fp8":
        return _triton_ops(fp8_dot=False)
    if name == "triton_invariant":
        return _triton_invariant_ops()
    raise PlatformError(
        f"unknown op set {name!r}; known: ['torch', 'torch_invariant', 'triton', 'triton_no_fp8', 'triton_invariant']"
    )
