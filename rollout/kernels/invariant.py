"""Batch-invariant torch kernels (exact on-policy mode, CPU and any device without Triton).

A fast kernel's result for one token depends on what else is in the call: a GEMM picks
its blocking and thread split from the number of rows, a reduction splits its reduced
dimension across threads once the tensor is large. Here every operation that reduces is
called once per token (per row), with shapes that depend only on that token (its position,
for attention) and never on the batch: a token's result is then the same alone, in any
batch, chunked at any size, after a prefix-cache hit or a recompute, and in the trainer's
forward over whole sequences, which calls these same functions. Elementwise operations
(rotary, SiLU-and-mul, residual adds) are invariant as they are. Every function is
differentiable (the trainer's backward runs through them; it need not be invariant).

Mixture-of-experts routing needs nothing here: the router is a linear layer (``linear_rows``
through the op set) and ``moe.route`` is a softmax and a top-k over each token's own row of
router logits, computed row by row by torch as the sampler's softmax is (tests/test_exact_moe.py
checks both against each row alone). ``fused_moe_rows`` runs the experts.

Slow by design: one small call per token per operation. On GPU the Triton kernels with
fixed tilings give the same guarantee at speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rollout.kernels.activation import silu_and_mul_ref
from rollout.kernels.attention import gather_kv
from rollout.kernels.layernorm import rms_norm_with
from rollout.kernels.rotary import rotary_ref


def _rows(x: torch.Tensor) -> list[torch.Tensor]:
    # Each row as its own fresh tensor: the same shape and alignment whatever its index in
    # the batch, so a library cannot take another code path for it.
    rows = [r.unsqueeze(0).clone() for r in x.unbind(0)]
    assert all(r.data_ptr() % _ALIGN == 0 for r in rows), "the allocator no longer aligns fresh tensors"
    return rows


# The BLAS kernels' summation order depends on the operands' address alignment (seen: MKL's
# GEMV gives other bits for a weight at 56 mod 64 than at 0); every operand is used at this one.
_ALIGN = 64


def _aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or (t.data_ptr() % _ALIGN == 0 and t.is_contiguous()):
        return t
    return t.contiguous().clone()  # fresh allocations are aligned (differentiable copy)


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` one row at a time: [num_tokens, in] -> [num_tokens, out]."""
    weight, bias = _aligned(weight), _aligned(bias)
    if x.shape[0] == 0:
        return F.linear(x, weight, bias)
    return torch.cat([F.linear(r, weight, bias) for r in _rows(x)])


def fused_moe_rows(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
) -> torch.Tensor:
    """``moe.fused_moe_ref`` (same signature, loop and roundings) with each expert's gate/up
    and down projections through ``linear_rows``: every token's GEMVs are its own calls,
    whatever other tokens chose that expert. A token's k products are added to its zero row
    in ascending expert id, one ``index_add_`` per expert (a token is at most once in each:
    its k ids are distinct), so its sum has one order; adds and products are elementwise.

    x [T, H]; w13 [E, 2I, H]; w2 [E, H, I]; topk_weights [T, k]; topk_ids [T, k] -> [T, H]
    in x's dtype. Differentiable in x, w13, w2 and topk_weights."""
    out = torch.zeros_like(x)  # [T, H]
    weights = topk_weights.to(x.dtype)
    slot_token = topk_ids.t()  # [k, T]
    for expert in torch.unique(topk_ids).tolist():  # ascending: each token's order of adds
        slot, token = torch.where(slot_token == expert)
        h = linear_rows(silu_and_mul_ref(linear_rows(x[token], w13[expert])), w2[expert])  # [n, H]
        out.index_add_(0, token, h * weights[token, slot, None])
    return out


def rms_norm_rows(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``rms_norm_ref`` with each row's mean of squares reduced on its own."""
    return rms_norm_with(_mean_square_rows, x, weight, eps, residual)


def _mean_square_rows(h: torch.Tensor) -> torch.Tensor:
    if h.shape[0] == 0:
        return h.pow(2).mean(-1, keepdim=True)
    return torch.cat([r.pow(2).mean(-1, keepdim=True) for r in _rows(h)])


def rotary_rows(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary_ref`` with Qwen3's per-head q/k RMSNorm reduced token by token (the rotation
    itself is elementwise)."""
    if q_norm_weight is not None:
        query = rms_norm_rows(query, q_norm_weight, eps)
    if k_norm_weight is not None:
        key = rms_norm_rows(key, k_norm_weight, eps)
    return rotary_ref(positions, query, key, cos_sin_cache)


def log_softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """fp32 ``log_softmax`` over the last dim, one row at a time: [rows, vocab]."""
    logits = logits.float()
    if logits.shape[0] == 0:
        return torch.log_softmax(logits, dim=-1)
    return torch.cat([torch.log_softmax(r, dim=-1) for r in _rows(logits)])


def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """fp32 ``softmax`` over the last dim, one row at a time."""
    logits = logits.float()
    if logits.shape[0] == 0:
        return torch.softmax(logits, dim=-1)
    return torch.cat([torch.softmax(r, dim=-1) for r in _rows(logits)])


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token over its whole causal context, fp32 inside.

    q [num_heads, head_dim]; k, v [ctx_len, num_kv_heads, head_dim] (the token's own
    position last) -> [num_heads, head_dim]. Shapes depend on ``ctx_len`` only."""
    num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    qg = q.float().reshape(num_kv_heads, group, head_dim).clone()  # [kv_heads, group, d]
    kh = k.float().permute(1, 2, 0).contiguous()  # [kv_heads, d, ctx]
    vh = v.float().permute(1, 0, 2).contiguous()  # [kv_heads, ctx, d]
    scores = torch.matmul(qg, kh) * scale  # [kv_heads, group, ctx]
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vh).reshape(num_heads, head_dim).to(q.dtype)


def paged_attention_rows(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_reqs, max_blocks_per_req] int
    query_start_loc_cpu: torch.Tensor,  # [num_reqs + 1] int, host
    seq_lens_cpu: torch.Tensor,  # [num_reqs] int, host
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal paged attention, each query token attending on its own (``attend_one``):
    the same maths as ``paged_attention_ref``, with no token's result depending on the
    others in the call."""
    starts = query_start_loc_cpu.tolist()
    outs = []
    for i, seq_len in enumerate(seq_lens_cpu.tolist()):
        q = query[starts[i] : starts[i + 1]]
        q_len = q.shape[0]
        k, v = gather_kv(kv_cache, block_tables[i], seq_len)
        for j in range(q_len):
            ctx = seq_len - q_len + j + 1  # query j sits at position ctx - 1
            outs.append(attend_one(q[j], k[:ctx], v[:ctx], scale))
    if not outs:
        return torch.empty_like(query)
    return torch.stack(outs)
