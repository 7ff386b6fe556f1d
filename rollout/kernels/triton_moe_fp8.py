"""Fused MoE over FP8 block-quantized experts (``quantization="fp8"``) as Triton kernels.
Reference: ``moe.fused_moe_fp8_ref``; the same call, and its result within fp32
reassociation (below).

``fused_moe_fp8(x, w13_q, w13_scale, w2_q, w2_scale, topk_weights, topk_ids)``: the
weights are e4m3 with one fp32 scale per 128x128 block, each expert's gate rows and up rows
their own blocks (``w13_scale`` [E, 2 * ceil(I/128), ceil(H/128)]: gate's block rows, then
up's), ``w2_scale`` [E, ceil(H/128), ceil(I/128)]. ``triton_moe``'s pipeline with two
block-scaled GEMMs and two activation quantizations, six launches, none waiting on the host:

1. x quantized per token and 128-feature group (``triton_fp8``'s kernel: bitwise the
   reference's ``quantize_activation_per_token_group`` on the same device; a token's
   groups do not depend on which expert reads them, so once for all T tokens).
2. ``moe_align`` (``triton_moe``): the (token, slot) pairs sorted by expert, padded to
   ``BLOCK_M``.
3. ``_moe_gate_up_fp8_kernel``: a program per (block of sorted pairs, ``BLOCK_N`` columns
   of I) gathers its tokens' fp8 rows and walks H in K steps of ``BLOCK_K`` (a divisor of
   128, so a step lies in one scale block): each step one ``tl.dot`` of the fp8 tiles from
   zero (exact products summed in fp32), scaled by ``x_scale[token, kb] *
   w13_scale[e, row block of the column, kb]`` (column c of gate in block row c // 128, of
   up in ceil(I/128) + c // 128) and added to the fp32 accumulator. The epilogue is
   ``triton_moe``'s: gate and up rounded to x's dtype, silu(gate) rounded, h = its product
   with up rounded, stored by pair [T*k, I].
4. h quantized per pair and 128-group (as the reference quantizes each expert's h).
5. ``_moe_down_fp8_kernel``: the same over ``h @ w2[e]^T`` (scales ``h_scale[pair, kb] *
   w2_scale[e, c // 128, kb]``), y rounded to x's dtype, stored by pair [T*k, H].
6. ``_moe_sum_kernel`` (``triton_moe``): each token's k weighted rows of y in the
   reference's order.

Numerics. The reference dequantizes both operands to fp32 and multiplies; the kernels sum
exact fp8 products per 128-block, scale each block's sum and add it: both within about
``(K + 3) * 2^-24`` of the magnitudes of the exact product (``triton_fp8``'s argument),
then round where the reference rounds. A difference can still tip a rounding to x's dtype
and, through h, an e4m3 rounding of the down GEMM's input (a step of up to 2^-4 of that
element); tests/test_triton_moe_fp8.py states what it asserts. On Hopper the tensor cores
accumulate fp8 products with ~13 mantissa bits inside one dot; a dot here spans at most
one 128-block, whose sum is then promoted to fp32 (``triton_fp8``'s docstring).
Needs fp8 ``tl.dot``: CUDA sm_89+ or the interpreter (which upcasts fp8 tiles exactly).

Tiles: ``triton_moe.moe_tiles`` (measured for bf16; not measured for fp8 on a GPU yet).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rollout.kernels.fp8 import BLOCK, FP8_DTYPE
from rollout.kernels.triton_fp8 import quantize_activation_per_token_group
from rollout.kernels.triton_moe import (
    _GROUP_M, MoeTiles, _block_of, _store_silu_mul, combine, moe_align, moe_tiles,
)
from rollout.kernels.triton_utils import round_as


@triton.jit
def _moe_gate_up_fp8_kernel(
    xq_ptr,  # [T, H] fp8 contiguous
    xs_ptr,  # [T, ceil(H/128)] fp32 contiguous
    w13_ptr,  # [E, 2I, H] fp8, last dim contiguous: gate rows [0, I), up rows [I, 2I)
    ws_ptr,  # [E, 2 * ceil(I/128), ceil(H/128)] fp32: gate's block rows, then up's
    h_ptr,  # [T*k, I] contiguous, x's dtype
    sorted_pair_ids_ptr, block_expert_ids_ptr, num_padded_ptr,
    num_pairs, num_blocks, H, I, num_i_blocks, num_h_blocks,
    stride_we, stride_wn, stride_se, stride_sn, stride_sk,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides 128
    GROUP: tl.constexpr,  # 128
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # H % BLOCK_K == 0
):
    pid_m, pid_n = _block_of(tl.program_id(0), num_blocks, I, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pairs = tl.load(sorted_pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    m_mask = pairs < num_pairs
    tokens = (pairs // TOP_K).to(tl.int64)
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = xq_ptr + tokens[:, None] * H + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    g_ptrs = w13_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + I * stride_wn  # [BLOCK_K, BLOCK_N] each
    xs_ptrs = xs_ptr + tokens * num_h_blocks  # [BLOCK_M]
    gs_ptrs = ws_ptr + expert * stride_se + (offs_n // GROUP) * stride_sn  # [BLOCK_N] gate's block rows
    us_ptrs = gs_ptrs + num_i_blocks * stride_sn  # up's
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            g = tl.load(g_ptrs, mask=n_mask[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < H - k0
            a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        kb = k0 // GROUP
        a_scale = tl.load(xs_ptrs + kb, mask=m_mask, other=0.0)  # [BLOCK_M]
        g_scale = tl.load(gs_ptrs + kb * stride_sk, mask=n_mask, other=0.0)  # [BLOCK_N]
        u_scale = tl.load(us_ptrs + kb * stride_sk, mask=n_mask, other=0.0)
        # One block's exact fp8 products summed from zero, then scaled into fp32.
        acc_g += tl.dot(a, g) * (a_scale[:, None] * g_scale[None, :])
        acc_u += tl.dot(a, u) * (a_scale[:, None] * u_scale[None, :])
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    _store_silu_mul(acc_g, acc_u, h_ptr, pairs, offs_n, I, m_mask, n_mask)


@triton.jit
def _moe_down_fp8_kernel(
    hq_ptr,  # [T*k, I] fp8 contiguous
    hs_ptr,  # [T*k, ceil(I/128)] fp32 contiguous
    w2_ptr,  # [E, H, I] fp8, last dim contiguous
    ws_ptr,  # [E, ceil(H/128), ceil(I/128)] fp32
    y_ptr,  # [T*k, H] contiguous, x's dtype
    sorted_pair_ids_ptr, block_expert_ids_ptr, num_padded_ptr,
    num_pairs, num_blocks, H, I, num_i_blocks,
    stride_we, stride_wn, stride_se, stride_sn, stride_sk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides 128
    GROUP: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # I % BLOCK_K == 0
):
    pid_m, pid_n = _block_of(tl.program_id(0), num_blocks, H, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pairs = tl.load(sorted_pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_mask = pairs < num_pairs
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = hq_ptr + pairs[:, None] * I + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w2_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    hs_ptrs = hs_ptr + pairs * num_i_blocks  # [BLOCK_M]
    ws_ptrs = ws_ptr + expert * stride_se + (offs_n // GROUP) * stride_sn  # [BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        if EVEN_K:
            a = tl.load(h_ptrs, mask=m_mask[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < I - k0
            a = tl.load(h_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        kb = k0 // GROUP
        a_scale = tl.load(hs_ptrs + kb, mask=m_mask, other=0.0)
        b_scale = tl.load(ws_ptrs + kb * stride_sk, mask=n_mask, other=0.0)
        acc += tl.dot(a, b) * (a_scale[:, None] * b_scale[None, :])
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    dtype = y_ptr.dtype.element_ty
    y = round_as(acc, dtype)  # the down projection's output
    y_ptrs = y_ptr + pairs[:, None] * H + offs_n[None, :]
    tl.store(y_ptrs, y.to(dtype), mask=m_mask[:, None] & n_mask[None, :])


def _check(x, w13_q, w13_scale, w2_q, w2_scale, topk_weights, topk_ids) -> None:
    if x.dim() != 2 or w13_q.dim() != 3 or w2_q.dim() != 3 or topk_weights.dim() != 2:
        raise ValueError(f"fused_moe_fp8: ranks x {x.dim()}, w13_q {w13_q.dim()}, w2_q {w2_q.dim()}, "
                         f"topk_weights {topk_weights.dim()} (want 2, 3, 3, 2)")
    num_tokens, hidden = x.shape
    num_experts, inter = w13_q.shape[0], w2_q.shape[2]
    scales = (num_experts, 2 * triton.cdiv(inter, BLOCK), triton.cdiv(hidden, BLOCK))
    if (w13_q.shape != (num_experts, 2 * inter, hidden) or w2_q.shape != (num_experts, hidden, inter)
            or w13_scale.shape != scales or w2_scale.shape != (num_experts, scales[2], scales[1] // 2)
            or topk_weights.shape[0] != num_tokens or topk_ids.shape != topk_weights.shape):
        raise ValueError(f"fused_moe_fp8: shapes do not fit: x {tuple(x.shape)}, w13_q {tuple(w13_q.shape)}, "
                         f"w13_scale {tuple(w13_scale.shape)}, w2_q {tuple(w2_q.shape)}, w2_scale "
                         f"{tuple(w2_scale.shape)}, topk_weights {tuple(topk_weights.shape)}, topk_ids "
                         f"{tuple(topk_ids.shape)}")
    if (x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or w13_q.dtype != FP8_DTYPE
            or w2_q.dtype != FP8_DTYPE or w13_scale.dtype != torch.float32 or w2_scale.dtype != torch.float32
            or topk_weights.dtype not in (torch.float32, torch.bfloat16, torch.float16)
            or topk_ids.dtype not in (torch.int64, torch.int32)):
        raise ValueError(f"fused_moe_fp8: dtypes x {x.dtype}, w13_q {w13_q.dtype}, w13_scale {w13_scale.dtype}, "
                         f"w2_q {w2_q.dtype}, w2_scale {w2_scale.dtype}, topk_weights {topk_weights.dtype}, "
                         f"topk_ids {topk_ids.dtype} (want fp32/bf16/fp16 x and routing weights, "
                         f"{FP8_DTYPE} weights with fp32 scales, int64/int32 ids)")
    if len({t.device for t in (x, w13_q, w13_scale, w2_q, w2_scale, topk_weights, topk_ids)}) != 1:
        raise ValueError("fused_moe_fp8: tensors on different devices")
    if w13_q.stride(-1) != 1 or w2_q.stride(-1) != 1:
        raise ValueError("fused_moe_fp8: expert weights need a contiguous last dim (no copy of the weights)")


def fused_moe_fp8(
    x: torch.Tensor, w13_q: torch.Tensor, w13_scale: torch.Tensor, w2_q: torch.Tensor, w2_scale: torch.Tensor,
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, tiles: MoeTiles | None = None,
) -> torch.Tensor:
    """``moe.fused_moe_fp8_ref``'s call (shapes in the module docstring) -> [T, H] in x's
    dtype. Under tensor parallelism I is this rank's share and the result a partial sum.
    ``tiles`` overrides ``moe_tiles`` (its K steps must divide 128). No host sync:
    capturable in a CUDA graph."""
    _check(x, w13_q, w13_scale, w2_q, w2_scale, topk_weights, topk_ids)
    num_tokens, hidden = x.shape
    num_experts, inter = w13_q.shape[0], w2_q.shape[2]
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    if num_pairs == 0 or hidden == 0:
        return out
    if inter == 0:
        return out.zero_()
    t = tiles or moe_tiles(num_pairs, num_experts, x.dtype)
    if BLOCK % t.block_k1 or BLOCK % t.block_k2:
        raise ValueError(f"fused_moe_fp8: K steps {t.block_k1}, {t.block_k2} must divide {BLOCK}")
    topk_weights, topk_ids = topk_weights.contiguous(), topk_ids.contiguous()
    x_q, x_scale = quantize_activation_per_token_group(x)  # [T, H], [T, ceil(H/128)]
    sorted_pair_ids, block_expert_ids, num_padded = moe_align(topk_ids, num_experts, t.block_m)
    num_blocks = block_expert_ids.numel()
    num_i_blocks, num_h_blocks = triton.cdiv(inter, BLOCK), triton.cdiv(hidden, BLOCK)
    launch = dict(GROUP=BLOCK, GROUP_M=_GROUP_M, num_warps=t.num_warps, num_stages=t.num_stages)

    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)  # [T*k, I] by pair
    _moe_gate_up_fp8_kernel[(num_blocks * triton.cdiv(inter, t.block_n1),)](
        x_q, x_scale, w13_q, w13_scale, h, sorted_pair_ids, block_expert_ids, num_padded,
        num_pairs, num_blocks, hidden, inter, num_i_blocks, num_h_blocks,
        w13_q.stride(0), w13_q.stride(1), *w13_scale.stride(),
        TOP_K=top_k, BLOCK_M=t.block_m, BLOCK_N=t.block_n1, BLOCK_K=t.block_k1,
        EVEN_K=hidden % t.block_k1 == 0, **launch,
    )
    h_q, h_scale = quantize_activation_per_token_group(h)  # [T*k, I], [T*k, ceil(I/128)]
    y = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)  # [T*k, H] by pair
    _moe_down_fp8_kernel[(num_blocks * triton.cdiv(hidden, t.block_n2),)](
        h_q, h_scale, w2_q, w2_scale, y, sorted_pair_ids, block_expert_ids, num_padded,
        num_pairs, num_blocks, hidden, inter, num_i_blocks,
        w2_q.stride(0), w2_q.stride(1), *w2_scale.stride(),
        BLOCK_M=t.block_m, BLOCK_N=t.block_n2, BLOCK_K=t.block_k2, EVEN_K=inter % t.block_k2 == 0, **launch,
    )
    return combine(y, topk_weights, topk_ids, out)
