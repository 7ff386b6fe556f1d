"""The sparse mixture-of-experts block: router, top-k routing, the experts (stacked weights).

The experts' weights are two stacked parameters, ``w13`` [E, 2 * I_local, H] (each
expert's gate rows, then its up rows) and ``w2`` [E, H, I_local]. Each HF tensor of one
expert is a shard of them: ``(expert, "gate" | "up")`` of ``w13``, ``(expert, "down")`` of
``w2`` (the model's ``packed_modules_mapping`` names them); ``WHOLE`` is a transformers v5
module's stacked tensor. Under tensor parallelism each rank holds ``1 / tp_size`` of every
expert's intermediate dimension (as the dense MLP's) and the partial outputs are all-reduced.

Routing replay: a forward may carry ``ExpertRoutes`` in its context; every MoE layer then
writes the experts each token was sent to, and takes the given ones for the tokens marked
to replay (their weights recomputed from this forward's router logits at those experts).
"""

from __future__ import annotations

import torch
from torch import nn

from rollout.distributed.communication import tensor_model_parallel_all_reduce
from rollout.distributed.parallel_state import ParallelState
from rollout.kernels.moe import route, route_weights
from rollout.models.forward_context import ExpertRoutes, current_ops, current_routes
from rollout.models.layers.linear import ColumnLinear, _attach, _param
from rollout.models.weights import WHOLE


class FusedExperts(nn.Module):
    """Every expert's gate/up and down projections, stacked; loaded shard by shard."""

    def __init__(self, num_experts: int, hidden: int, inter: int, dtype: torch.dtype, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        assert inter % tp_size == 0, f"moe_intermediate_size {inter} not divisible by tp_size {tp_size}"
        self.num_experts, self.hidden, self.inter = num_experts, hidden, inter
        self.inter_local = inter // tp_size
        self.start = tp_rank * self.inter_local  # this rank's slice of each expert's intermediate dim
        self.w13 = _attach(_param((num_experts, 2 * self.inter_local, hidden), dtype), self._w13_shape, self._load_w13)
        self.w2 = _attach(_param((num_experts, hidden, self.inter_local), dtype), self._w2_shape, self._load_w2)
        self.w13.num_experts = self.w2.num_experts = num_experts

    def _w13_shape(self, shard_id: tuple | str) -> torch.Size:
        if shard_id == WHOLE:
            return torch.Size((self.num_experts, 2 * self.inter, self.hidden))
        return torch.Size((self.inter, self.hidden))

    def _w2_shape(self, shard_id: tuple | str) -> torch.Size:
        if shard_id == WHOLE:
            return torch.Size((self.num_experts, self.hidden, self.inter))
        return torch.Size((self.hidden, self.inter))

    def _load_w13(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple | str) -> None:
        n, start = self.inter_local, self.start
        if shard_id == WHOLE:  # [E, 2I, H]: every expert's gate rows, then its up rows
            param.data[:, :n].copy_(loaded[:, start : start + n])
            param.data[:, n:].copy_(loaded[:, self.inter + start : self.inter + start + n])
            return
        expert, part = shard_id
        rows = slice(0, n) if part == "gate" else slice(n, 2 * n)
        param.data[expert, rows].copy_(loaded[start : start + n])

    def _load_w2(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple | str) -> None:
        n, start = self.inter_local, self.start
        if shard_id == WHOLE:  # [E, H, I]
            param.data.copy_(loaded[:, :, start : start + n])
            return
        expert, _ = shard_id
        param.data[expert].copy_(loaded[:, start : start + n])

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return current_ops().fused_moe(x, self.w13, self.w2, topk_weights, topk_ids)


class SparseMoeBlock(nn.Module):
    """HF ``Qwen3MoeSparseMoeBlock``: the router (``gate``, held whole by every rank), top-k
    routing (``rollout.kernels.moe.route``), the experts, then one all-reduce over the TP group.
    ``moe_layer_idx``: this layer's index among the model's MoE layers (its row of
    ``ExpertRoutes``)."""

    def __init__(self, config, moe_layer_idx: int, dtype: torch.dtype, parallel: ParallelState) -> None:
        super().__init__()
        self.moe_layer_idx = moe_layer_idx
        self.top_k = config.num_experts_per_tok
        self.renormalize = bool(config.norm_topk_prob)
        self.tp_size, self.tp_group = parallel.tensor_parallel_size, parallel.tp_group
        self.gate = ColumnLinear(config.hidden_size, (config.num_experts,), False, dtype)  # every rank: all of it
        self.experts = FusedExperts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size, dtype,
            parallel.tp_rank, parallel.tensor_parallel_size,
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
