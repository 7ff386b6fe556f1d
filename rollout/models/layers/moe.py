"""The sparse mixture-of-experts block: router, top-k routing, the experts (stacked weights).

The experts' weights are two stacked parameters, ``w13`` [E, 2 * I_local, H] (each
expert's gate rows, then its up rows) and ``w2`` [E, H, I_local]. Each HF tensor of one
expert is a shard of them: ``(expert, "gate" | "up")`` of ``w13``, ``(expert, "down")`` of
``w2`` (the model's ``packed_modules_mapping`` names them); ``WHOLE`` is a transformers v5
module's stacked tensor. Under tensor parallelism each rank holds ``1 / tp_size`` of every
expert's intermediate dimension (as the dense MLP's) and the partial outputs are all-reduced.
With ``quantization="fp8"`` both are e4m3 beside fp32 block scales (``FusedExperts``); the
router stays in the model dtype.

Routing replay: a forward may carry ``ExpertRoutes`` in its context; every MoE layer then
writes the experts each token was sent to, and takes the given ones for the tokens marked
to replay (their weights recomputed from this forward's router logits at those experts).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rollout.distributed.communication import tensor_model_parallel_all_reduce
from rollout.distributed.parallel_state import ParallelState
from rollout.kernels.moe import route, route_weights
from rollout.models.forward_context import ExpertRoutes, current_ops, current_routes
from rollout.kernels.fp8 import BLOCK, FP8_DTYPE, quantize_weight_blockwise
from rollout.models.layers.linear import QUANTIZATIONS, ColumnLinear, _attach, _cdiv, _param, attach_fp8
from rollout.models.weights import WHOLE


class FusedExperts(nn.Module):
    """Every expert's gate/up and down projections, stacked; loaded shard by shard.

    ``quantization="fp8"``: ``w13`` and ``w2`` are float8_e4m3fn beside fp32 block scales
    ``w13_scale_inv`` [E, 2 * ceil(I_local/128), ceil(H/128)] (each expert's gate block rows,
    then its up block rows: gate and up each start a block row, as a fused linear's shards)
    and ``w2_scale_inv`` [E, ceil(H/128), ceil(I_local/128)]; the forward runs the op set's
    ``fused_moe_fp8``. A full-precision HF tensor (one expert's, or a stacked one) is quantized
    in place into its experts' blocks inside the loader, on load and on every update; an FP8
    checkpoint's ``weight`` + ``weight_scale_inv`` (``gate_up_proj`` + ``gate_up_proj_scale_inv``
    when stacked) load as they are when this rank's slice of each is whole 128-blocks."""

    def __init__(
        self, num_experts: int, hidden: int, inter: int, dtype: torch.dtype, tp_rank: int, tp_size: int,
        quantization: str | None = None,
    ) -> None:
        super().__init__()
        assert inter % tp_size == 0, f"moe_intermediate_size {inter} not divisible by tp_size {tp_size}"
        assert quantization in QUANTIZATIONS, f"quantization {quantization!r} not in {QUANTIZATIONS}"
        self.num_experts, self.hidden, self.inter = num_experts, hidden, inter
        self.inter_local = inter // tp_size
        self.start = tp_rank * self.inter_local  # this rank's slice of each expert's intermediate dim
        weight_dtype = dtype if quantization is None else FP8_DTYPE
        self.w13 = _attach(
            _param((num_experts, 2 * self.inter_local, hidden), weight_dtype), self._w13_shape, self._load_w13,
        )
        self.w2 = _attach(_param((num_experts, hidden, self.inter_local), weight_dtype), self._w2_shape, self._load_w2)
        self.w13.num_experts = self.w2.num_experts = num_experts
        self.w13_scale_inv = self.w2_scale_inv = None
        if quantization is None:
            return
        self.num_blocks = _cdiv(self.inter_local, BLOCK)  # block rows of each of gate and up
        hidden_blocks = _cdiv(hidden, BLOCK)
        self.w13_scale_inv = _param((num_experts, 2 * self.num_blocks, hidden_blocks), torch.float32)
        self.w2_scale_inv = _param((num_experts, hidden_blocks, self.num_blocks), torch.float32)
        self.w13_scale_inv.num_experts = self.w2_scale_inv.num_experts = num_experts
        # Every rank's slice of I is whole blocks (one answer on all ranks: ranks r >= 1 start
        # at r * I_local, so it must be whole blocks unless one rank holds all of I). A rank
        # must not accept a pre-quantized tensor its peers refuse. A stacked fp8
        # gate_up_proj's blocks are its fused rows': gate's and up's own only when I is whole blocks.
        sliced = tp_size == 1 or self.inter_local % BLOCK == 0
        attach_fp8(
            self.w13, self.w13_scale_inv, self._w13_scale_shape, self._load_w13_scale, self._quantize_w13_into,
            lambda shard_id: sliced and (shard_id != WHOLE or inter % BLOCK == 0),
        )
        attach_fp8(
            self.w2, self.w2_scale_inv, self._w2_scale_shape, self._load_w2_scale, self._quantize_w2_into,
            lambda shard_id: sliced,
        )

    @property
    def op_name(self) -> str:
        """The op set's op this layer runs (the model runner checks that graphs can capture it)."""
        return "fused_moe" if self.w13_scale_inv is None else "fused_moe_fp8"

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if self.w13_scale_inv is None:
            return current_ops().fused_moe(x, self.w13, self.w2, topk_weights, topk_ids)
        return current_ops().fused_moe_fp8(
            x, self.w13, self.w13_scale_inv, self.w2, self.w2_scale_inv, topk_weights, topk_ids,
        )

    # ---- shapes of the HF tensors ----------------------------------------------------------
    def _w13_shape(self, shard_id: tuple | str) -> torch.Size:
        if shard_id == WHOLE:
            return torch.Size((self.num_experts, 2 * self.inter, self.hidden))
        return torch.Size((self.inter, self.hidden))

    def _w2_shape(self, shard_id: tuple | str) -> torch.Size:
        if shard_id == WHOLE:
            return torch.Size((self.num_experts, self.hidden, self.inter))
        return torch.Size((self.hidden, self.inter))

    def _w13_scale_shape(self, shard_id: tuple | str) -> torch.Size:
        rows, cols = _cdiv(self.inter, BLOCK), _cdiv(self.hidden, BLOCK)
        if shard_id == WHOLE:  # transformers' FP8Experts: the fused rows' blocks
            return torch.Size((self.num_experts, _cdiv(2 * self.inter, BLOCK), cols))
        return torch.Size((rows, cols))

    def _w2_scale_shape(self, shard_id: tuple | str) -> torch.Size:
        rows, cols = _cdiv(self.hidden, BLOCK), _cdiv(self.inter, BLOCK)
        return torch.Size((self.num_experts, rows, cols)) if shard_id == WHOLE else torch.Size((rows, cols))

    # ---- loaders ---------------------------------------------------------------------------
    def _w13_parts(self, loaded: torch.Tensor, shard_id: tuple | str) -> list[tuple[Any, int, torch.Tensor]]:
        """(expert index or ``slice(None)``, 0 for gate | 1 for up, this rank's rows of it)
        of an HF tensor: [n, H] one expert's, [E, n, H] each of a stacked tensor's halves."""
        n, start, inter = self.inter_local, self.start, self.inter
        if shard_id == WHOLE:  # [E, 2I, H]: every expert's gate rows, then its up rows
            return [(slice(None), 0, loaded[:, start : start + n]),
                    (slice(None), 1, loaded[:, inter + start : inter + start + n])]
        expert, part = shard_id
        return [(expert, 0 if part == "gate" else 1, loaded[start : start + n])]

    def _load_w13(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple | str) -> None:
        n = self.inter_local
        quantize = self.w13_scale_inv is not None and loaded.dtype != FP8_DTYPE
        for expert, half, rows in self._w13_parts(loaded, shard_id):
            if not quantize:
                param.data[expert, half * n : (half + 1) * n].copy_(rows)
            elif isinstance(expert, int):
                self._store_w13(expert, half, rows)
            else:  # stacked: expert by expert (bounded scratch memory)
                for e in range(self.num_experts):
                    self._store_w13(e, half, rows[e])

    def _load_w2(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple | str) -> None:
        n, start = self.inter_local, self.start
        cols = loaded[..., start : start + n]  # [H, n] one expert's, [E, H, n] stacked
        if self.w2_scale_inv is None or loaded.dtype == FP8_DTYPE:
            param.data[slice(None) if shard_id == WHOLE else shard_id[0]].copy_(cols)
        elif shard_id != WHOLE:
            self._store_w2(shard_id[0], cols)
        else:
            for e in range(self.num_experts):
                self._store_w2(e, cols[e])

    def _load_w13_scale(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple | str) -> None:
        """An FP8 checkpoint's scales of gate/up (this rank's slice is whole blocks: checked
        by ``hf_dtype_problem`` before any copy)."""
        nb, first = self.num_blocks, self.start // BLOCK
        if shard_id == WHOLE:  # [E, 2I/128, H/128]: gate's block rows, then up's (I whole blocks)
            up = self.inter // BLOCK
            param.data[:, :nb].copy_(loaded[:, first : first + nb])
            param.data[:, nb:].copy_(loaded[:, up + first : up + first + nb])
            return
        expert, part = shard_id
        half = 0 if part == "gate" else 1
        param.data[expert, half * nb : (half + 1) * nb].copy_(loaded[first : first + nb])

    def _load_w2_scale(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple | str) -> None:
        expert = slice(None) if shard_id == WHOLE else shard_id[0]
        first = self.start // BLOCK
        param.data[expert].copy_(loaded[..., first : first + self.num_blocks])

    # ---- quantization ----------------------------------------------------------------------
    def _store_w13(self, expert: int, half: int, rows: torch.Tensor) -> None:
        """Quantize full-precision ``rows`` [n, H] into expert ``expert``'s gate (0) or up (1)."""
        n, nb = self.inter_local, self.num_blocks
        q, scale = quantize_weight_blockwise(rows.to(self.w13.device))  # on its device: see ColumnLinear's _store
        self.w13.data[expert, half * n : (half + 1) * n].copy_(q)
        self.w13_scale_inv.data[expert, half * nb : (half + 1) * nb].copy_(scale)

    def _store_w2(self, expert: int, cols: torch.Tensor) -> None:
        q, scale = quantize_weight_blockwise(cols.to(self.w2.device))
        self.w2.data[expert].copy_(q)
        self.w2_scale_inv.data[expert].copy_(scale)

    def _quantize_w13_into(self, local: torch.Tensor) -> None:
        """A full-precision w13 of this rank's shape [E, 2n, H] (dummy init)."""
        n = self.inter_local
        for e in range(self.num_experts):
            for half in (0, 1):
                self._store_w13(e, half, local[e, half * n : (half + 1) * n])

    def _quantize_w2_into(self, local: torch.Tensor) -> None:
        for e in range(self.num_experts):
            self._store_w2(e, local[e])


class SparseMoeBlock(nn.Module):
    """HF ``Qwen3MoeSparseMoeBlock``: the router (``gate``, held whole by every rank), top-k
    routing (``rollout.kernels.moe.route``), the experts, then one all-reduce over the TP group.
    ``moe_layer_idx``: this layer's index among the model's MoE layers (its row of
    ``ExpertRoutes``)."""

    def __init__(
        self, config, moe_layer_idx: int, dtype: torch.dtype, parallel: ParallelState, quantization: str | None = None,
    ) -> None:
        super().__init__()
        self.moe_layer_idx = moe_layer_idx
        self.top_k = config.num_experts_per_tok
        self.renormalize = bool(config.norm_topk_prob)
        self.tp_size, self.tp_group = parallel.tensor_parallel_size, parallel.tp_group
        # Every rank: all of it, in the model dtype under fp8 too (vLLM's and Qwen's FP8
        # checkpoints keep the router in bf16: "mlp.gate" in modules_to_not_convert).
        self.gate = ColumnLinear(config.hidden_size, (config.num_experts,), False, dtype)
        self.experts = FusedExperts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size, dtype,
            parallel.tp_rank, parallel.tensor_parallel_size, quantization,
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        router_logits = self.gate(h)  # [num_tokens, num_experts], in h's dtype as HF's
        topk_weights, topk_ids = route(router_logits, self.top_k, self.renormalize)
        routes = current_routes()
        if routes is not None:
            topk_weights, topk_ids = self._replay(routes, router_logits, topk_weights, topk_ids)
        out = self.experts(h, topk_weights, topk_ids)
        return out if self.tp_size == 1 else tensor_model_parallel_all_reduce(out, self.tp_group)

    def _replay(
        self, routes: ExpertRoutes, router_logits: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        recorded = routes.topk_ids[self.moe_layer_idx, : topk_ids.shape[0]]  # [num_tokens, top_k]
        if routes.replay is not None:
            topk_ids = torch.where(routes.replay[:, None], recorded, topk_ids)
            topk_weights = route_weights(router_logits, topk_ids, self.renormalize)
        recorded.copy_(topk_ids)
        return topk_weights, topk_ids
