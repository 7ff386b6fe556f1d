"""Fused mixture-of-experts MLP (Qwen3-MoE: E experts, top-k routing) as Triton kernels.
Reference: ``moe.fused_moe_ref``; the same call and result.

``fused_moe(x, w13, w2, topk_weights, topk_ids)``: for each token and each of its k
experts e, ``h = silu(x @ W_gate[e]^T) * (x @ W_up[e]^T)`` (``w13[e] = [W_gate; W_up]``),
``y = h @ w2[e]^T``; the output is the sum over the k slots of ``topk_weights * y``. Four
launches, none of which waits on the host, so a decode step can be captured in a CUDA graph:

1. ``moe_align`` (one Triton program up to 4096 pairs, torch ops past that): the T*k
   (token, slot) pairs, numbered ``pair = token * k + slot``, sorted by expert (stable)
   and each expert's run padded to a multiple of ``BLOCK_M`` with the sentinel ``T*k``,
   so a block of ``BLOCK_M`` sorted pairs
   belongs to one expert (``block_expert_ids``). The buffers are sized by a bound known from
   the shapes alone, ``T*k + min(E, T*k) * (BLOCK_M - 1)`` rounded up to whole blocks (each
   expert that has pairs wastes at most ``BLOCK_M - 1`` slots); the real padded length stays
   on the device (``num_padded``) and programs past it exit at once.
2. ``_moe_gate_up_kernel``: a program per (block of sorted pairs, BLOCK_N columns of I)
   gathers its tokens' rows of x and multiplies them by that expert's gate and up rows (two
   fp32 accumulators over one A tile); SiLU-and-mul in the epilogue, stored by pair:
   ``h [T*k, I]``.
3. ``_moe_down_kernel``: the same tiling over ``h @ w2[e]^T``, stored by pair:
   ``y [T*k, H]``.
4. ``_moe_sum_kernel``: one program per (token, BLOCK_H columns) sums its k rows of y
   times their routing weights in the reference's order (ascending expert id, then slot;
   the k ids are ranked in registers). No atomics anywhere: every output element is
   computed by one program in one fixed order, so two calls give the same bits whatever
   the scheduling. (A token's bits do depend on the batch through the tile height
   ``BLOCK_M``, chosen from T*k/E: this is not a batch-invariant kernel.)

Rounding is the reference's (HF's eager Qwen3-MoE experts) in the activation dtype: gate
and up rounded (as ``F.linear`` outputs), then silu(gate), then the product h, then y (the
down projection's output); the routing weight is cast to the activation dtype, its product
with y rounded, and the k products summed into a zero of the activation dtype, one rounding
per add. The GEMMs accumulate in fp32, so only their summation order differs from the
reference's; it can tip a rounding now and then (see tests/test_triton_moe.py). Applying the
weight in the sum rather than in the down GEMM's epilogue is the same arithmetic and lets
the sum run in the reference's order. Roundings go through ``triton_utils.round_as``
(bit-exact nearest-even, also in the interpreter); for fp32 it is the identity.

Tiles (``moe_tiles``; Qwen3-30B-A3B, H 2048, I 768, E 128, k 8, bf16; measured on an H100
with ``python -m tests.gpu.check_moe --sweep``). Decode (T*k/E <= 16 pairs per expert on
average: T up to 256) reads the active experts' weights once (T=1: 8 experts, 75 MB, ~23 us
at 3.35 TB/s; T >= 64: nearly all 128, 1.2 GB) and is bound by memory: ``BLOCK_M`` 16 (the
smallest tensor-core tile; an expert's few tokens fill one block), narrow column tiles so
even T=1 launches enough programs (gate/up: 8 blocks x 768/32 = 192; down: 8 x 2048/64 =
256) and long K steps with 4 stages (16 KiB of weight per stage) to keep loads in flight.
Measured (CUDA graph replay): T=1 0.05 ms, T=64 0.53 ms (2.2 TB/s, 67% of the roofline),
T=256 0.68 ms (53%); 32- and 64-row blocks were 10-50% slower at these T. Between 16 and 64
pairs per expert (not measured), ``BLOCK_M`` 32 keeps one block per expert mostly. Prefill
(T=4096: 256 pairs per expert, 0.31 TFLOP) is bound by the tensor cores: 128-row blocks by
128 columns (gate/up: 64 gate + 64 up), K steps of 64, 8 warps, 3 stages: 1.28 ms, ~240
TFLOP/s (64-row blocks: 1.45 ms; 256-row: 1.45 ms; 4 stages: 1.45 ms). Column tiles are
walked in ``GROUP_M`` groups of row blocks, so a run of one expert's blocks shares its
weight tiles in L2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rollout.kernels.triton_utils import round_as

_GROUP_M = 8  # row blocks that sweep the column tiles together (L2 reuse of the weights)


@dataclass(frozen=True)
class MoeTiles:
    """Launch shape of the two grouped GEMMs: ``block_m`` sorted pairs per block (the
    alignment), column tile and K step of the gate/up GEMM (``block_n1`` columns of each of
    gate and up) and of the down GEMM, warps and pipeline stages."""

    block_m: int
    block_n1: int
    block_k1: int
    block_n2: int
    block_k2: int
    num_warps: int = 4
    num_stages: int = 4


def moe_tiles(num_pairs: int, num_experts: int, dtype: torch.dtype) -> MoeTiles:
    """The default tiles for ``num_pairs = T * k`` routed pairs (see the module docstring)."""
    if dtype == torch.float32:  # ieee FMAs, half the bytes per element of shared memory
        return MoeTiles(16, 32, 32, 32, 32, num_warps=4, num_stages=2)
    per_expert = num_pairs / num_experts
    if per_expert <= 16:
        return MoeTiles(16, 32, 128, 64, 128)
    if per_expert <= 64:
        return MoeTiles(32, 64, 64, 64, 64)
    return MoeTiles(128, 64, 64, 128, 64, num_warps=8, num_stages=3)


# ---------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Length of ``sorted_pair_ids``: a whole number of blocks holding every expert's run
    padded to ``block_m``, from the shapes alone (no host sync)."""
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return triton.cdiv(bound, block_m) * block_m


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, one_program: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the (token, slot) pairs of ``topk_ids`` [T, k] (values in [0, num_experts),
    not checked: that would sync) by expert and pad each expert's run to ``block_m``.

    Returns ``sorted_pair_ids`` [max_padded] int32 (pair = token * k + slot; padding holds
    the sentinel T*k), ``block_expert_ids`` [max_padded // block_m] int32 (the expert of
    every pair in that block; blocks past the end hold a valid, unused id) and
    ``num_padded`` [1] int32 (sorted pairs in use, a multiple of block_m). Within an
    expert, pairs keep their order (a stable sort): the layout is a function of topk_ids,
    the same from both ways of computing it. ``one_program`` (default: up to
    ``_ALIGN_ONE_PROGRAM_MAX`` pairs): one Triton launch (decode steps, where the dozen torch
    launches would cost more than the GEMMs' weight reads at T=1); else torch ops."""
    num_pairs = topk_ids.numel()
    max_padded = max_padded_pairs(num_pairs, num_experts, block_m)
    if one_program is None:
        one_program = num_pairs <= _ALIGN_ONE_PROGRAM_MAX
    if not one_program or num_pairs == 0:
        return _moe_align_torch(topk_ids, num_experts, block_m, max_padded)
    device = topk_ids.device
    sorted_pair_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    block_expert_ids = torch.empty(max_padded // block_m, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    e_pow2 = triton.next_power_of_2(num_experts)
    block_p = max(16, min(triton.next_power_of_2(num_pairs), 8192 // e_pow2))
    _moe_align_kernel[(1,)](
        topk_ids.contiguous(), sorted_pair_ids, block_expert_ids, num_padded, num_pairs, max_padded, num_experts,
        BLOCK_M=block_m, E_POW2=e_pow2, BLOCK_P=block_p, num_warps=8,
    )
    return sorted_pair_ids, block_expert_ids, num_padded


_ALIGN_ONE_PROGRAM_MAX = 4096  # pairs (T=512 at k=8): past this, torch's parallel sort wins


@triton.jit
def _moe_align_kernel(
    topk_ids_ptr,  # [T*k] contiguous, int64 or int32
    sorted_pair_ids_ptr,  # [max_padded] int32
    block_expert_ids_ptr,  # [max_padded // BLOCK_M] int32
    num_padded_ptr,  # [1] int32
    num_pairs, max_padded, num_experts,
    BLOCK_M: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """One program: count pairs per expert, then place each pair at its expert's padded
    start plus the pairs of that expert before it (a cumulative sum of one-hot rows), then
    write the sentinel where no pair goes. Every address is written once: no barrier."""
    experts = tl.arange(0, E_POW2)
    counts = tl.zeros([E_POW2], dtype=tl.int32)
    for p0 in range(0, num_pairs, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [E_POW2], 0 past num_experts
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded)
    tl.store(num_padded_ptr, total)
    placed = starts  # [E_POW2] where each expert's next pair goes
    for p0 in range(0, num_pairs, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [BLOCK_P, E_POW2]
        before = tl.cumsum(onehot, axis=0) - onehot  # same-expert pairs earlier in the chunk
        dest = tl.sum(onehot * (placed[None, :] + before), axis=1)
        tl.store(sorted_pair_ids_ptr + dest, offs.to(tl.int32), mask=offs < num_pairs)
        placed += tl.sum(onehot, axis=0)
    # Padding: a slot is a pair's iff its offset in its expert's run is below the count.
    for q0 in range(0, max_padded, BLOCK_P):
        offs = q0 + tl.arange(0, BLOCK_P)
        owner = (ends[None, :] <= offs[:, None]).to(tl.int32)  # [BLOCK_P, E_POW2]: runs ended before
        expert = tl.sum(owner, axis=1)  # the run holding offs (E_POW2 past the end)
        mine = (expert[:, None] == experts[None, :]).to(tl.int32)
        used = offs - tl.sum(mine * starts[None, :], axis=1) < tl.sum(mine * counts[None, :], axis=1)
        tl.store(sorted_pair_ids_ptr + offs, tl.zeros_like(offs) + num_pairs, mask=(offs < max_padded) & ~used)
    num_blocks = max_padded // BLOCK_M
    for b0 in range(0, num_blocks, BLOCK_P):
        block = b0 + tl.arange(0, BLOCK_P)
        owner = tl.sum((ends[None, :] <= (block * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ids_ptr + block, tl.minimum(owner, num_experts - 1), mask=block < num_blocks)


def _moe_align_torch(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, max_padded: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_pairs = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would sync on its max
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)  # [E] end of each expert's padded run
    starts = ends - padded
    first = torch.cumsum(counts, 0) - counts  # [E] each expert's first index in sorted order
    sorted_experts, order = torch.sort(flat, stable=True)
    rank = torch.arange(num_pairs, device=device) - first[sorted_experts]
    dest = starts[sorted_experts] + rank  # [T*k], distinct
    sorted_pair_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, max_padded, block_m, device=device)
    # Expert e owns the blocks starting in [starts[e], ends[e]): the count of ends <= start.
    block_expert_ids = torch.searchsorted(ends, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_pair_ids, block_expert_ids.to(torch.int32), ends[-1:].to(torch.int32)


# ---------------------------------------------------------------------------------------
# Grouped GEMMs
# ---------------------------------------------------------------------------------------


@triton.jit
def _block_of(pid, num_blocks, num_cols, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column tile) of program ``pid``, GROUP_M row blocks per column sweep."""
    num_pid_n = tl.cdiv(num_cols, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_m = tl.minimum(num_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_m
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_m
    return pid_m, pid_n


@triton.jit
def _store_silu_mul(acc_g, acc_u, h_ptr, pairs, offs_n, I, m_mask, n_mask):
    """The gate/up kernels' epilogue (bf16 and fp8 experts): h = silu(gate) * up, each
    product rounded where torch rounds it, stored at its pairs' rows of h [T*k, I]."""
    dtype = h_ptr.dtype.element_ty
    gate = round_as(acc_g, dtype)  # the gate and up projections' outputs
    up = round_as(acc_u, dtype)
    silu = round_as(gate / (1.0 + tl.exp(-gate)), dtype)  # torch rounds silu(gate) first
    h = round_as(silu * up, dtype)
    h_ptrs = h_ptr + pairs[:, None].to(tl.int64) * I + offs_n[None, :]
    tl.store(h_ptrs, h.to(dtype), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_gate_up_kernel(
    x_ptr,  # [T, H], last dim contiguous
    w13_ptr,  # [E, 2I, H], last dim contiguous: gate rows [0, I), up rows [I, 2I)
    h_ptr,  # [T*k, I] contiguous, x's dtype
    sorted_pair_ids_ptr,  # [max_padded] int32
    block_expert_ids_ptr,  # [max_padded // BLOCK_M] int32
    num_padded_ptr,  # [1] int32
    num_pairs, num_blocks, H, I,
    stride_xt, stride_we, stride_wn,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # H % BLOCK_K == 0: no K mask
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
    DOT_UPCAST: tl.constexpr,  # bf16 in the interpreter (triton-lang/triton#11584): via fp32
):
    pid_m, pid_n = _block_of(tl.program_id(0), num_blocks, I, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pairs = tl.load(sorted_pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    m_mask = pairs < num_pairs  # padding holds num_pairs
    tokens = (pairs // TOP_K).to(tl.int64)
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    g_ptrs = w13_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + I * stride_wn  # [BLOCK_K, BLOCK_N] each
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
        if DOT_UPCAST:
            a = a.to(tl.float32)
            acc_g = tl.dot(a, g.to(tl.float32), acc_g, input_precision="ieee")
            acc_u = tl.dot(a, u.to(tl.float32), acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, g, acc_g, input_precision=DOT_PRECISION)
            acc_u = tl.dot(a, u, acc_u, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    _store_silu_mul(acc_g, acc_u, h_ptr, pairs, offs_n, I, m_mask, n_mask)


@triton.jit
def _moe_down_kernel(
    h_ptr,  # [T*k, I] contiguous
    w2_ptr,  # [E, H, I], last dim contiguous
    y_ptr,  # [T*k, H] contiguous, h's dtype
    sorted_pair_ids_ptr, block_expert_ids_ptr, num_padded_ptr,
    num_pairs, num_blocks, H, I,
    stride_we, stride_wn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # I % BLOCK_K == 0
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
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
    h_ptrs = h_ptr + pairs[:, None] * I + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w2_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        if EVEN_K:
            a = tl.load(h_ptrs, mask=m_mask[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < I - k0
            a = tl.load(h_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    dtype = y_ptr.dtype.element_ty
    y = round_as(acc, dtype)  # the down projection's output
    y_ptrs = y_ptr + pairs[:, None] * H + offs_n[None, :]
    tl.store(y_ptrs, y.to(dtype), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_sum_kernel(
    y_ptr,  # [T*k, H] contiguous
    topk_weights_ptr,  # [T, k] contiguous, fp32 (or bf16/fp16)
    topk_ids_ptr,  # [T, k] contiguous
    out_ptr,  # [T, H] contiguous
    H,
    TOP_K: tl.constexpr,
    K_POW2: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < H
    dtype = out_ptr.dtype.element_ty
    # The reference's order: ascending expert id, then slot. rank[j]: slots before j.
    slots = tl.arange(0, K_POW2)
    ids = tl.load(topk_ids_ptr + token * TOP_K + slots, mask=slots < TOP_K, other=0).to(tl.int64)
    ids = tl.where(slots < TOP_K, ids, 1 << 62)  # padding lanes sort last
    before = (ids[None, :] < ids[:, None]) | ((ids[None, :] == ids[:, None]) & (slots[None, :] < slots[:, None]))
    rank = tl.sum(before.to(tl.int32), axis=1)  # [K_POW2], a permutation of 0..K_POW2-1
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for step in tl.static_range(TOP_K):
        slot = tl.sum(tl.where(rank == step, slots, 0))
        weight = round_as(tl.load(topk_weights_ptr + token * TOP_K + slot).to(tl.float32), dtype)  # cast to x's dtype
        y = tl.load(y_ptr + (token * TOP_K + slot) * H + offs, mask=mask, other=0.0).to(tl.float32)
        acc = round_as(acc + round_as(weight * y, dtype), dtype)  # summed in x's dtype
    tl.store(out_ptr + token * H + offs, acc.to(dtype), mask=mask)


# ---------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------


def _check(x, w13, w2, topk_weights, topk_ids) -> None:
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3 or topk_weights.dim() != 2:
        raise ValueError(f"fused_moe: ranks x {x.dim()}, w13 {w13.dim()}, w2 {w2.dim()}, "
                         f"topk_weights {topk_weights.dim()} (want 2, 3, 3, 2)")
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    if (w13.shape != (num_experts, 2 * inter, hidden) or w2.shape != (num_experts, hidden, inter)
            or topk_weights.shape[0] != num_tokens or topk_ids.shape != topk_weights.shape):
        raise ValueError(f"fused_moe: shapes do not fit: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)}, topk_weights {tuple(topk_weights.shape)}, "
                         f"topk_ids {tuple(topk_ids.shape)}")
    if (x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or w13.dtype != x.dtype
            or w2.dtype != x.dtype or topk_weights.dtype not in (torch.float32, torch.bfloat16, torch.float16)
            or topk_ids.dtype not in (torch.int64, torch.int32)):
        raise ValueError(f"fused_moe: dtypes x {x.dtype}, w13 {w13.dtype}, w2 {w2.dtype}, topk_weights "
                         f"{topk_weights.dtype}, topk_ids {topk_ids.dtype} (want one float dtype for x "
                         "and the weights, fp32/bf16/fp16 routing weights, int64/int32 ids)")
    if len({t.device for t in (x, w13, w2, topk_weights, topk_ids)}) != 1:
        raise ValueError("fused_moe: tensors on different devices")
    if w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("fused_moe: expert weights need a contiguous last dim (no copy of the weights)")


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    tiles: MoeTiles | None = None,
) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k] (fp32; bf16/fp16
    too), topk_ids [T, k] (int64 or int32, values in [0, E), not checked) -> [T, H] in
    x's dtype. Under tensor parallelism I is this rank's share and the result a partial
    sum, as the reference's. ``tiles`` overrides ``moe_tiles`` (tests, tuning). No host
    sync: capturable in a CUDA graph."""
    _check(x, w13, w2, topk_weights, topk_ids)
    num_tokens, hidden = x.shape
    num_experts, inter = w13.shape[0], w2.shape[2]
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    if num_pairs == 0 or hidden == 0:
        return out
    if inter == 0:
        return out.zero_()
    if x.stride(-1) != 1:
        x = x.contiguous()
    topk_weights, topk_ids = topk_weights.contiguous(), topk_ids.contiguous()
    t = tiles or moe_tiles(num_pairs, num_experts, x.dtype)
    sorted_pair_ids, block_expert_ids, num_padded = moe_align(topk_ids, num_experts, t.block_m)
    num_blocks = block_expert_ids.numel()
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    upcast = x.dtype == torch.bfloat16 and x.device.type == "cpu"
    launch = dict(GROUP_M=_GROUP_M, DOT_PRECISION=precision, DOT_UPCAST=upcast,
                  num_warps=t.num_warps, num_stages=t.num_stages)

    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)  # [T*k, I] by pair
    _moe_gate_up_kernel[(num_blocks * triton.cdiv(inter, t.block_n1),)](
        x, w13, h, sorted_pair_ids, block_expert_ids, num_padded,
        num_pairs, num_blocks, hidden, inter, x.stride(0), w13.stride(0), w13.stride(1),
        TOP_K=top_k, BLOCK_M=t.block_m, BLOCK_N=t.block_n1, BLOCK_K=t.block_k1,
        EVEN_K=hidden % t.block_k1 == 0, **launch,
    )
    y = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)  # [T*k, H] by pair
    _moe_down_kernel[(num_blocks * triton.cdiv(hidden, t.block_n2),)](
        h, w2, y, sorted_pair_ids, block_expert_ids, num_padded,
        num_pairs, num_blocks, hidden, inter, w2.stride(0), w2.stride(1),
        BLOCK_M=t.block_m, BLOCK_N=t.block_n2, BLOCK_K=t.block_k2,
        EVEN_K=inter % t.block_k2 == 0, **launch,
    )
    return combine(y, topk_weights, topk_ids, out)


def combine(y: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` [T, H] = each token's k rows of ``y`` [T*k, H] (by pair) weighted and summed in
    ascending expert id (the reference's order); the last launch of every fused MoE here."""
    num_tokens, hidden = out.shape
    top_k = topk_ids.shape[1]
    block_h = min(triton.next_power_of_2(hidden), 1024)
    _moe_sum_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        y, topk_weights, topk_ids, out, hidden, TOP_K=top_k, K_POW2=triton.next_power_of_2(top_k),
        BLOCK_H=block_h, num_warps=4,
    )
    return out
