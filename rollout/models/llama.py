"""Llama-family decoder (Llama, and through flags Qwen2 and Qwen3), built from an HF config.

Module names mirror HF's so that HF parameter names map 1:1, except the fused
``qkv_proj`` and ``gate_up_proj`` (see ``packed_modules_mapping``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from rollout.distributed.parallel_state import ParallelState
from rollout.errors import UnsupportedModelError
from rollout.models.forward_context import current_ops
from rollout.models.layers.attention import Attention
from rollout.models.layers.embedding import LMHead, VocabEmbedding
from rollout.models.layers.linear import ColumnLinear, QKVLinear, RowLinear
from rollout.models.layers.norm import RMSNorm
from rollout.models.layers.rotary import RotaryEmbedding, rope_parameters
from rollout.models.quantization import quantization_of


def _check_divisible(what: str, total: int, tp_size: int) -> None:
    if total % tp_size:
        raise UnsupportedModelError(
            f"{what} ({total}) is not divisible by tensor_parallel_size {tp_size}; "
            f"use a tensor_parallel_size that divides it"
        )


def split_heads(num_heads: int, num_kv_heads: int, tp_size: int) -> tuple[int, int]:
    """(q heads, kv heads) of each of ``tp_size`` ranks. The q heads always split evenly. So
    do the kv heads when ``tp_size`` divides them; when ``tp_size`` is a multiple of them
    instead, each rank holds one kv head, replicated on ``tp_size // num_kv_heads`` ranks
    (rank r: kv head ``r // replicas``, see ``QKVLinear``)."""
    _check_divisible("num_attention_heads", num_heads, tp_size)
    if num_kv_heads >= tp_size and num_kv_heads % tp_size == 0:
        return num_heads // tp_size, num_kv_heads // tp_size
    if num_kv_heads >= tp_size or tp_size % num_kv_heads:
        raise UnsupportedModelError(
            f"num_key_value_heads ({num_kv_heads}) is neither divisible by tensor_parallel_size {tp_size} "
            f"nor a divisor of it; use a tensor_parallel_size that divides num_key_value_heads, or a "
            f"multiple of it that divides num_attention_heads ({num_heads}): each rank then holds one "
            f"kv head, replicated"
        )
    # Rank r holds q heads [r * q, (r + 1) * q), q = num_heads / tp_size. HF's q head i
    # attends to kv head i // g, g = num_heads / num_kv_heads = replicas * q, so every q head
    # of rank r attends to kv head r // replicas: the one rank r holds.
    return num_heads // tp_size, 1


class DecoderAttention(nn.Module):
    """Each of ``tp_size`` ranks holds ``1 / tp_size`` of the q heads and of the kv heads
    (so of the KV cache), or, with fewer kv heads than ranks, the one kv head its q heads
    attend to (``split_heads``); ``o_proj`` all-reduces the partial outputs."""

    def __init__(
        self, config: Any, layer_idx: int, dtype: torch.dtype, qkv_bias: bool, qk_norm: bool, rotary: RotaryEmbedding,
        parallel: ParallelState, quantization: str | None = None,
    ) -> None:
        super().__init__()
        hidden = config.hidden_size
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        tp = parallel.tensor_parallel_size
        self.num_heads, self.num_kv_heads = split_heads(num_heads, num_kv_heads, tp)  # this rank's
        self.head_dim = getattr(config, "head_dim", None) or hidden // num_heads
        # Llama and Qwen3 put ``attention_bias`` on q/k/v/o; Qwen2 biases q/k/v only.
        o_bias = getattr(config, "attention_bias", False)
        rank, group = parallel.tp_rank, parallel.tp_group
        self.qkv_proj = QKVLinear(
            hidden, self.head_dim, num_heads, num_kv_heads, qkv_bias, dtype, rank, tp, quantization=quantization,
        )
        self.o_proj = RowLinear(num_heads * self.head_dim, hidden, o_bias, dtype, rank, tp, group, quantization)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype) if qk_norm else None
        self.rotary_emb = rotary  # one cos/sin cache shared by every layer
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, positions: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(h)  # [num_tokens, (heads + 2 * kv_heads) * head_dim]
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        # Rotation (after Qwen3's q/k norm) and the K/V write: one kernel where the backend has it.
        return self.o_proj(self.attn(q, k, v, positions, self.rotary_emb, self.q_norm, self.k_norm))


class MLP(nn.Module):
    def __init__(
        self, config: Any, dtype: torch.dtype, parallel: ParallelState, quantization: str | None = None,
    ) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported; supported: silu")
        bias = getattr(config, "mlp_bias", False)
        inter = config.intermediate_size
        tp, rank = parallel.tensor_parallel_size, parallel.tp_rank
        _check_divisible("intermediate_size", inter, tp)
        self.gate_up_proj = ColumnLinear(
            config.hidden_size, (inter, inter), bias, dtype, rank, tp, shard_ids=(0, 1), quantization=quantization,
        )
        self.down_proj = RowLinear(inter, config.hidden_size, bias, dtype, rank, tp, parallel.tp_group, quantization)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(current_ops().silu_and_mul(self.gate_up_proj(h)))


class DecoderLayer(nn.Module):
    def __init__(
        self, config: Any, layer_idx: int, dtype: torch.dtype, qkv_bias: bool, qk_norm: bool, rotary: RotaryEmbedding,
        parallel: ParallelState, build_mlp: Callable[[int], nn.Module], quantization: str | None = None,
    ) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        # Attention first: its shape checks (heads vs tensor_parallel_size) report before the MLP's.
        self.self_attn = DecoderAttention(config, layer_idx, dtype, qkv_bias, qk_norm, rotary, parallel, quantization)
        self.mlp = build_mlp(layer_idx)  # (h [num_tokens, hidden]) -> [num_tokens, hidden], all-reduced
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype)

    def forward(
        self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(positions, h)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    """``build_mlp(layer_idx)`` makes each layer's feed-forward block (a Llama ``MLP``, or a
    MoE model's sparse block); ``quantization`` ("fp8" or None) is the attention's linears'."""

    def __init__(
        self, config: Any, dtype: torch.dtype, qkv_bias: bool, qk_norm: bool, parallel: ParallelState,
        build_mlp: Callable[[int], nn.Module], quantization: str | None = None,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(
            config.vocab_size, config.hidden_size, dtype, parallel.tp_rank, parallel.tensor_parallel_size,
            parallel.tp_group,
        )
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rotary = RotaryEmbedding(head_dim, config.max_position_embeddings, rope_parameters(config))
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, dtype, qkv_bias, qk_norm, rotary, parallel, build_mlp, quantization)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            h, residual = layer(positions, h, residual)
        h, _ = self.norm(h, residual)
        return h


class LlamaForCausalLM(nn.Module):
    """HF ``LlamaForCausalLM``: rope (default/linear/llama3), tied or untied embeddings.
    ``parallel`` (default: one rank) shards it for tensor parallelism. The config's
    ``quantization_config`` (``rollout.models.quantization``) may make the decoder's linear
    layers fp8; embeddings, norms and the LM head stay in ``dtype``."""

    # The quantizations build_model may build this class with.
    supported_quantizations: ClassVar[tuple[str, ...]] = ("fp8",)
    qkv_bias = False
    qk_norm = False
    # Engine parameter -> the HF sub-modules fused into it, in shard order.
    packed_modules_mapping: ClassVar[dict[str, list[tuple[str, str | int]]]] = {
        "qkv_proj": [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")],
        "gate_up_proj": [("gate_proj", 0), ("up_proj", 1)],
    }

    def __init__(self, config: Any, dtype: torch.dtype, parallel: ParallelState | None = None) -> None:
        super().__init__()
        self.config = config
        self.quantization = quantization_of(config)
        parallel = parallel or ParallelState()
        qkv_bias = self.qkv_bias or getattr(config, "attention_bias", False)
        self.model = DecoderModel(
            config, dtype, qkv_bias, self.qk_norm, parallel, lambda i: self.build_mlp(config, i, dtype, parallel),
            self.quantization,
        )
        tied = getattr(config, "tie_word_embeddings", False)
        self.lm_head = LMHead(
            config.vocab_size, config.hidden_size, dtype, self.model.embed_tokens if tied else None,
            parallel.tp_rank, parallel.tensor_parallel_size, parallel.tp_group,
        )

    def build_mlp(self, config: Any, layer_idx: int, dtype: torch.dtype, parallel: ParallelState) -> nn.Module:
        """Layer ``layer_idx``'s feed-forward block (subclasses: MoE layers)."""
        return MLP(config, dtype, parallel, self.quantization)

    @property
    def num_kv_heads(self) -> int:
        """KV heads of this rank (the KV cache holds only these)."""
        return self.model.layers[0].self_attn.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.model.layers[0].self_attn.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
