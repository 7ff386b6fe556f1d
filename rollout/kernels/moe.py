"""Mixture-of-experts routing and the expert computation, torch reference (HF Qwen3-MoE numerics).

``route`` picks each token's experts from the router logits; ``fused_moe_ref`` runs them,
``fused_moe_fp8_ref`` runs them over FP8 block-quantized experts (``quantization="fp8"``).
The Triton kernels (``triton_moe.py``) implement their signatures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rollout.kernels.fp8 import BLOCK, dequantize_blockwise, fp8_linear_ref, quantize_activation_per_token_group


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``router_logits`` [T, E] -> (topk_weights [T, k] fp32, topk_ids [T, k] int64).

    HF's ``Qwen3MoeTopKRouter``: softmax over the experts in fp32, top-k of the
    probabilities (ties to the lower expert id, as ``torch.topk``), then with
    ``renormalize`` (``norm_topk_prob``) divided by their sum. The caller casts the weights
    to the activation dtype (HF casts them to the router logits' dtype), as ``fused_moe_ref``
    does."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    topk_ids = torch.topk(probs, top_k, dim=-1).indices  # [T, k], by descending probability
    return _weights_at(probs, topk_ids, renormalize), topk_ids


def route_weights(router_logits: torch.Tensor, topk_ids: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """The routing weights [T, k] fp32 of given experts ``topk_ids`` [T, k] (routing replay):
    the same probabilities ``route`` computes, taken at those ids. For ids ``route`` chose
    (same order) the result equals ``route``'s bitwise: ``topk``'s values are the
    probabilities it gathers."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    return _weights_at(probs, topk_ids, renormalize)


def _weights_at(probs: torch.Tensor, topk_ids: torch.Tensor, renormalize: bool) -> torch.Tensor:
    weights = probs.gather(-1, topk_ids)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights


def fused_moe_ref(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
) -> torch.Tensor:
    """``sum_j w_j * down_e(silu(gate_e(x)) * up_e(x))`` over each token's k experts ``e = topk_ids[:, j]``.

    x [T, H]; w13 [E, 2I, H] (each expert's gate rows, then its up rows); w2 [E, H, I];
    topk_weights [T, k] (any float dtype); topk_ids [T, k] int64 -> [T, H] in x's dtype.

    HF's eager ``Qwen3MoeExperts`` loop exactly: experts in ascending id, each over its
    tokens (``where`` over [k, T]: by choice slot, then token), the weights cast to x's dtype
    before the product, the products summed into a zero [T, H] of x's dtype (so a token's
    sum runs in ascending expert id, in x's dtype). Under tensor parallelism ``I`` is this
    rank's share and the result is a partial sum for the caller to all-reduce.
    """
    out = torch.zeros_like(x)  # [T, H]
    weights = topk_weights.to(x.dtype)
    slot_token = topk_ids.t()  # [k, T]: HF's expert mask is [E, k, T]
    for expert in torch.unique(topk_ids).tolist():  # ascending
        slot, token = torch.where(slot_token == expert)
        gate, up = F.linear(x[token], w13[expert]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, w2[expert])  # [n, H]
        out.index_add_(0, token, h * weights[token, slot, None])
    return out


def fused_moe_fp8_ref(
    x: torch.Tensor, w13_q: torch.Tensor, w13_scale: torch.Tensor, w2_q: torch.Tensor, w2_scale: torch.Tensor,
    topk_weights: torch.Tensor, topk_ids: torch.Tensor,
) -> torch.Tensor:
    """``fused_moe_ref`` over FP8 experts: the same loop, order and roundings, each expert GEMM
    as ``fp8_linear_ref`` computes a linear layer (its input quantized per token and 128-group,
    both operands dequantized to fp32 and multiplied, the product rounded to x's dtype).

    w13_q [E, 2I, H] float8_e4m3fn with w13_scale [E, 2 * ceil(I/128), ceil(H/128)] fp32: the
    gate rows and the up rows are each their own 128-row blocks (the gate's block rows, then
    the up's), as a fused linear's shards; w2_q [E, H, I] with w2_scale [E, ceil(H/128),
    ceil(I/128)]. Gate and up are one GEMM over the expert's tokens (x quantized once); h =
    silu(gate) * up in x's dtype is quantized again before the down GEMM. -> [T, H] in x's dtype.
    """
    inter = w2_q.shape[2]
    num_blocks = -(-inter // BLOCK)  # block rows of each of gate and up
    out = torch.zeros_like(x)  # [T, H]
    weights = topk_weights.to(x.dtype)
    slot_token = topk_ids.t()  # [k, T]
    for expert in torch.unique(topk_ids).tolist():  # ascending
        slot, token = torch.where(slot_token == expert)
        w13 = torch.cat([  # [2I, H] fp32
            dequantize_blockwise(w13_q[expert, :inter], w13_scale[expert, :num_blocks]),
            dequantize_blockwise(w13_q[expert, inter:], w13_scale[expert, num_blocks:]),
        ])
        x_q, x_scale = quantize_activation_per_token_group(x[token])
        gate, up = (dequantize_blockwise(x_q, x_scale, 1, BLOCK) @ w13.T).to(x.dtype).chunk(2, dim=-1)
        h = fp8_linear_ref(F.silu(gate) * up, w2_q[expert], w2_scale[expert])  # [n, H]
        out.index_add_(0, token, h * weights[token, slot, None])
    return out
