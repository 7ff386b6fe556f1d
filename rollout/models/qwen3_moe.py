"""HF ``Qwen3MoeForCausalLM``: the Qwen3 decoder with sparse MoE blocks in place of the MLP.

A layer is sparse unless it is in ``mlp_only_layers`` or off the ``decoder_sparse_step``
(HF's rule); the others keep the dense MLP of ``intermediate_size``. Each expert's HF
tensors load as shards of the stacked ``experts.w13`` / ``experts.w2`` (see
``rollout.models.layers.moe``), through the same ``packed_modules_mapping`` as q/k/v.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from rollout.distributed.parallel_state import ParallelState
from rollout.errors import UnsupportedModelError
from rollout.models.layers.moe import SparseMoeBlock
from rollout.models.qwen3 import Qwen3ForCausalLM
from rollout.models.weights import EXPERT, WHOLE


def sparse_layers(config: Any) -> list[int]:
    """Indices of the layers HF gives a sparse MoE block, in order."""
    only_mlp = set(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", 1)
    return [
        i for i in range(config.num_hidden_layers)
        if i not in only_mlp and config.num_experts > 0 and (i + 1) % step == 0
    ]


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    # FP8: the attention's and dense layers' linears and the experts; the router stays full precision.
    supported_quantizations: ClassVar[tuple[str, ...]] = ("fp8",)
    # Each expert's HF tensors are shards of the stacked parameters; a transformers v5 module
    # (a live HF model, a trainer's named parameters) holds them stacked already (WHOLE).
    packed_modules_mapping: ClassVar[dict[str, list[tuple[str, Any]]]] = {
        **Qwen3ForCausalLM.packed_modules_mapping,
        "experts.w13": [
            (f"experts.{EXPERT}.gate_proj.weight", "gate"), (f"experts.{EXPERT}.up_proj.weight", "up"),
            ("experts.gate_up_proj", WHOLE),
        ],
        "experts.w2": [(f"experts.{EXPERT}.down_proj.weight", "down"), ("experts.down_proj", WHOLE)],
        # quantization="fp8": the block scales, by the names FP8 checkpoints (per expert) and
        # transformers' FP8Experts (stacked) give them.
        "experts.w13_scale_inv": [
            (f"experts.{EXPERT}.gate_proj.weight_scale_inv", "gate"),
            (f"experts.{EXPERT}.up_proj.weight_scale_inv", "up"),
            ("experts.gate_up_proj_scale_inv", WHOLE),
        ],
        "experts.w2_scale_inv": [
            (f"experts.{EXPERT}.down_proj.weight_scale_inv", "down"), ("experts.down_proj_scale_inv", WHOLE),
        ],
    }

    def __init__(self, config: Any, dtype: torch.dtype, parallel: ParallelState | None = None) -> None:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported; supported: silu")
        tp = (parallel or ParallelState()).tensor_parallel_size
        if config.moe_intermediate_size % tp:
            raise UnsupportedModelError(
                f"moe_intermediate_size ({config.moe_intermediate_size}) is not divisible by "
                f"tensor_parallel_size {tp}; use a tensor_parallel_size that divides it"
            )
        self.moe_layers = sparse_layers(config)  # model layer index of each MoE layer
        super().__init__(config, dtype, parallel)

    def build_mlp(self, config: Any, layer_idx: int, dtype: torch.dtype, parallel: ParallelState) -> nn.Module:
        if layer_idx not in self.moe_layers:
            return super().build_mlp(config, layer_idx, dtype, parallel)
        return SparseMoeBlock(config, self.moe_layers.index(layer_idx), dtype, parallel, self.quantization)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def num_experts_per_tok(self) -> int:
        return self.config.num_experts_per_tok
