"""Paged attention and the KV-cache write as Triton kernels; same semantics as the torch
references in ``attention.py`` (``paged_attention_ref``, ``write_kv_ref``).

``paged_attention`` is one launch over a whole step: prefill chunks, prefix-hit chunks and
decodes together. A program owns one KV head of one request and a tile of that request's
query tokens; its rows are (query token, query head of the KV head's group) pairs, at least
16 of them, so even a decode (one token, a group of 4 heads) runs its two matmuls on tensor
cores (``tl.dot``). It walks the KV pages through the block table ``BLOCK_N`` keys at a
time with an fp32 online softmax.

Grid ``(num_tokens // BLOCK_Q + num_reqs, num_kv_heads, num_splits)``. Axis 0 enumerates
query tiles without a host sync: request ``i``'s tiles start at
``query_start_loc[i] // BLOCK_Q + i`` (an upper bound on the tiles of the requests before
it), and each program finds its request by binary search over ``query_start_loc``;
programs past their request's last tile exit at once.

Split-KV: with few programs and long contexts, axis 2 cuts each tile's KV range into
``num_splits`` contiguous runs of whole KV tiles. Each split writes its row max, row sum and
unnormalized accumulator to fp32 scratch, and ``_combine_splits_kernel`` merges them. Given
``split_counters`` (zeros, one per (query tile, KV head)), the merge happens in the same
launch instead: each split counts itself in with an atomic add after its stores, and the
last to arrive merges all splits of its rows and resets the counter to zero. Both paths run
one merge routine in split order 0..S-1, so they give the same bits whichever split is last.

Batch invariance: a query row's result depends only on its own request (its tokens, its
cache and where the row sits in it), the tile height ``BLOCK_M`` and ``num_splits``; the KV
cut is ``ceil(num_kv_tiles / num_splits)`` tiles per split, where ``num_kv_tiles`` comes
from the row's own tile. ``BLOCK_M`` defaults to 16 rows for a decode-only step
(``max_query_len == 1``) and 64 otherwise, and the two heights lower to different MMA
instructions: on an H100 a decode row then differs by an ulp now and then between a
decode-only and a mixed step. Passing BOTH ``num_splits`` and ``block_m`` makes a request's
output independent of which other requests share the step (bitwise; a GPU test checks
it). ``num_splits=None`` picks the split count from the batch and is not invariant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_DECODE_BLOCK_M = 16  # rows of a decode-only step: the smallest tensor-core tile
_MIXED_BLOCK_M = 64  # rows of a step with prefill chunks
_MAX_SPLITS = 32
_SPLIT_BELOW_PER_SM = 2  # split-KV only below this many programs per SM ...
_PROGRAMS_PER_SM = 4  # ... and then aims at about this many
_MIN_TILES_PER_SPLIT = 4  # a split gets at least this many KV tiles of max_seq_len
_NUM_SMS_OFF_GPU = 132  # the interpreter has no SMs; assume an H100 so the policy is the same


@triton.jit
def _find_request(query_start_loc_ptr, num_reqs, pid_q, BLOCK_Q: tl.constexpr):
    """The last request i with query_start_loc[i] // BLOCK_Q + i <= pid_q."""
    lo = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= pid_q:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _merge_splits(
    part_max_ptr, part_sum_ptr, part_acc_ptr, rows, row_mask, mask, offs_d, num_splits, stride_part_split,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The normalized output [BLOCK_R, BLOCK_D] fp32 of ``rows`` (partial offsets
    ``tok * stride_part_tok + head``, int64) from their splits' partials, merged in split
    order (a fixed order: the result does not depend on scheduling)."""
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for split in range(num_splits):
        part = split * stride_part_split + rows  # [BLOCK_R]
        # .cg (L2, not L1): in the fused combine other SMs wrote these during this launch.
        m_s = tl.load(part_max_ptr + part, mask=row_mask, other=float("-inf"), cache_modifier=".cg")
        l_s = tl.load(part_sum_ptr + part, mask=row_mask, other=0.0, cache_modifier=".cg")
        acc_s = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0,
                        cache_modifier=".cg")
        # An empty split (max -inf) weighs 0; split 0 holds key 0, which every query sees.
        m_new = tl.maximum(m_i, m_s)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        beta = tl.exp2(m_s - m_ref)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m_i = m_new
    return acc / tl.where(row_mask, l_i, 1.0)[:, None]  # padding rows: no 0 / 0


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    # Triton's interpreter multiplies bf16 operands of tl.dot as raw bits (it stores bf16
    # as uint16; triton-lang/triton#11584): off GPU, bf16 operands go through fp32.
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


# Ints that change from step to step are not specialised (Triton compiles a variant per
# "== 1" / "% 16 == 0" of each int): one compilation per launch shape (tiles, split or not)
# serves every batch size, instead of new ones compiling in the middle of a rollout.
_VARYING = ["num_reqs", "stride_bt_req", "stride_part_split"]


@triton.jit(do_not_specialize=_VARYING)
def _paged_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    query_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_reqs, max_blocks] int32
    query_start_loc_ptr,  # [num_reqs + 1] int32
    seq_lens_ptr,  # [num_reqs] int32
    part_max_ptr,  # [num_splits, num_tokens, num_heads] fp32 (SPLIT only)
    part_sum_ptr,  # [num_splits, num_tokens, num_heads] fp32 (SPLIT only)
    part_acc_ptr,  # [num_splits, num_tokens, num_heads, HEAD_DIM] fp32 (SPLIT only)
    counters_ptr,  # [>= num_q_tiles * num_kv_heads] int32 zeros (FUSED_COMBINE only)
    scale,
    num_reqs,
    stride_q_tok, stride_q_head,
    stride_o_tok, stride_o_head,
    stride_k_block, stride_k_slot, stride_k_head,
    stride_v_block, stride_v_slot, stride_v_head,
    stride_bt_req,
    stride_part_split, stride_part_tok,  # of part_max/part_sum; part_acc is HEAD_DIM times
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM
    PAGE_SIZE: tl.constexpr,  # the cache's block_size
    BLOCK_M: tl.constexpr,  # rows: BLOCK_Q tokens x GROUP heads, padded
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,  # keys per KV tile
    SPLIT: tl.constexpr,  # write partials (num_splits > 1) instead of the output
    FUSED_COMBINE: tl.constexpr,  # SPLIT: the last split to finish merges them
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs: no tf32 rounding
    DOT_UPCAST: tl.constexpr,  # bf16 in the interpreter, see _dot
):
    pid_q = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    req = _find_request(query_start_loc_ptr, num_reqs, pid_q, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    q_tile = pid_q - (q_start // BLOCK_Q + req)
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context_len = seq_len - q_len  # the queries are the last q_len positions

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_idx = q_tile * BLOCK_Q + offs_m // GROUP  # token within the request
    head = kv_head * GROUP + offs_m % GROUP
    row_mask = (offs_m < BLOCK_Q * GROUP) & (q_idx < q_len)
    d_mask = offs_d < HEAD_DIM
    tok = (q_start + q_idx).to(tl.int64)
    q = tl.load(
        query_ptr + tok[:, None] * stride_q_tok + head[:, None] * stride_q_head + offs_d[None, :],
        mask=row_mask[:, None] & d_mask[None, :], other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    q_pos = context_len + q_idx  # [BLOCK_M] absolute positions

    # Keys this tile can see are [0, kv_len); split `split` takes a run of whole KV tiles.
    kv_len = tl.minimum(seq_len, context_len + (q_tile + 1) * BLOCK_Q)
    num_kv_tiles = tl.cdiv(kv_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_kv_tiles, num_splits)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_kv_tiles)

    block_table = block_tables_ptr + req.to(tl.int64) * stride_bt_req
    qk_scale = scale * 1.4426950408889634  # exp2 domain
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t in range(tile_lo, tile_hi):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < kv_len
        # Page by page: each key's physical block from the block table.
        block_ids = tl.load(block_table + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        in_page = offs_n % PAGE_SIZE
        k_off = block_ids * stride_k_block + in_page * stride_k_slot + kv_head * stride_k_head
        v_off = block_ids * stride_v_block + in_page * stride_v_slot + kv_head * stride_v_head
        k = tl.load(
            k_cache_ptr + k_off[None, :] + offs_d[:, None],
            mask=n_mask[None, :] & d_mask[:, None], other=0.0,
        ).to(q.dtype)  # [BLOCK_D, BLOCK_N]
        s = _dot(q, k, DOT_PRECISION, DOT_UPCAST) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps max -inf; subtract 0 instead (p = 0, no NaN).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_cache_ptr + v_off[:, None] + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :], other=0.0,
        ).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
        m_i = m_new

    store_mask = row_mask[:, None] & d_mask[None, :]
    out_ptrs = out_ptr + tok[:, None] * stride_o_tok + head[:, None] * stride_o_head + offs_d[None, :]
    if SPLIT:
        rows = tok * stride_part_tok + head  # [BLOCK_M]
        part = split.to(tl.int64) * stride_part_split + rows
        tl.store(part_max_ptr + part, m_i, mask=row_mask)
        tl.store(part_sum_ptr + part, l_i, mask=row_mask)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=store_mask)
        if FUSED_COMBINE:
            # Every thread's partial stores come before the release of the count (the atomic
            # is one thread's); acq_rel: the last to arrive sees the other splits' stores.
            tl.debug_barrier()
            counter = counters_ptr + pid_q * tl.num_programs(1) + kv_head
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == num_splits - 1:
                tl.atomic_xchg(counter, 0)  # all splits are in: zero again for the next launch
                out = _merge_splits(part_max_ptr, part_sum_ptr, part_acc_ptr, rows, row_mask, store_mask,
                                    offs_d, num_splits, stride_part_split, HEAD_DIM, BLOCK_M, BLOCK_D)
                tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        out = acc / tl.where(row_mask, l_i, 1.0)[:, None]  # padding rows: no 0 / 0
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit(do_not_specialize=["num_reqs", "num_splits", "stride_part_split"])
def _combine_splits_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    part_max_ptr,  # [num_splits, num_tokens, num_heads] fp32, exp2 domain
    part_sum_ptr,  # [num_splits, num_tokens, num_heads] fp32
    part_acc_ptr,  # [num_splits, num_tokens, num_heads, HEAD_DIM] fp32, unnormalized
    query_start_loc_ptr,  # [num_reqs + 1] int32
    num_reqs,
    num_splits,
    stride_o_tok, stride_o_head,
    stride_part_split, stride_part_tok,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,  # next power of two >= NUM_HEADS
    BLOCK_D: tl.constexpr,
):
    """One program per token, all its heads: the partials merged by ``_merge_splits``."""
    tok = tl.program_id(0).to(tl.int64)
    if tok >= tl.load(query_start_loc_ptr + num_reqs):  # padding rows past the last request
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < NUM_HEADS
    mask = h_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    out = _merge_splits(part_max_ptr, part_sum_ptr, part_acc_ptr, tok * stride_part_tok + offs_h, h_mask, mask,
                        offs_d, num_splits, stride_part_split, HEAD_DIM, BLOCK_H, BLOCK_D)
    tl.store(
        out_ptr + tok * stride_o_tok + offs_h[:, None] * stride_o_head + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=mask,
    )


@dataclass(frozen=True)
class Tiling:
    """Launch shape of the attention kernel: ``block_m`` rows (query tokens x heads of a
    group) per program, ``block_n`` keys per KV tile, warps and pipeline stages. ``None``
    fields take the defaults of ``default_tiling``; rollout/bench/tune_attention.py sweeps them."""

    block_m: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None


def default_tiling(decode_only: bool, head_dim: int) -> Tiling:
    return Tiling(block_m=_DECODE_BLOCK_M if decode_only else _MIXED_BLOCK_M,
                  block_n=64 if head_dim <= 128 else 32, num_warps=4, num_stages=2)


def choose_num_splits(num_programs: int, max_seq_len: int, num_sms: int, block_n: int) -> int:
    """Split-KV policy for ``num_splits=None``. ``num_programs``: (query tile, KV head)
    pairs with work. Split only below ``_SPLIT_BELOW_PER_SM`` programs per SM, into about
    ``_PROGRAMS_PER_SM`` programs per SM (rounded down), each split keeping at least
    ``_MIN_TILES_PER_SPLIT`` KV tiles of the longest sequence. Measured on an H100
    (rollout/bench/tune_attention.py, decode steps in CUDA graphs): 128 programs over 2048
    keys read the KV at ~0.53 of the copy bandwidth unsplit and ~0.81 in 4 splits, while
    512 programs lose 3-4% to any split."""
    if num_programs >= _SPLIT_BELOW_PER_SM * num_sms:
        return 1
    useful = max_seq_len // (_MIN_TILES_PER_SPLIT * block_n)
    wanted = _PROGRAMS_PER_SM * num_sms // num_programs
    return max(1, min(wanted, useful, _MAX_SPLITS))


@dataclass(frozen=True)
class LaunchPlan:
    block_m: int
    block_q: int  # query tokens per program
    block_n: int
    num_warps: int
    num_stages: int
    num_q_tiles: int  # grid axis 0 (an upper bound, see the module docstring)
    num_splits: int


def plan_launch(
    num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, num_reqs: int, *, max_query_len: int,
    max_seq_len: int, device: torch.device, num_splits: int | None = None, block_m: int | None = None,
    tiling: Tiling | None = None,
) -> LaunchPlan:
    """The launch ``paged_attention`` makes for a step of this shape."""
    group = num_heads // num_kv_heads
    base = default_tiling(max_query_len <= 1, head_dim)
    tiling = tiling or Tiling()
    # At least one token's group of heads per program.
    block_m = max(block_m or tiling.block_m or base.block_m, triton.next_power_of_2(group))
    block_n = tiling.block_n or base.block_n
    block_q = block_m // group
    num_q_tiles = num_tokens // block_q + num_reqs
    if num_splits is None:
        working = min(num_q_tiles, num_reqs * triton.cdiv(max(max_query_len, 1), block_q))
        num_splits = choose_num_splits(working * num_kv_heads, max_seq_len, _num_sms(device), block_n)
    return LaunchPlan(block_m, block_q, block_n, tiling.num_warps or base.num_warps,
                      tiling.num_stages or base.num_stages, num_q_tiles, num_splits)


def _check_split_counters(counters: torch.Tensor, needed: int, device: torch.device) -> None:
    if (counters.dtype != torch.int32 or counters.device != device or counters.numel() < needed
            or not counters.is_contiguous()):
        raise ValueError(
            f"split_counters: got {counters.numel()} {counters.dtype} on {counters.device}"
            f"{'' if counters.is_contiguous() else ' (not contiguous)'}, need >= {needed} contiguous "
            f"torch.int32 on {device}"
        )


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _NUM_SMS_OFF_GPU


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_reqs, max_blocks] int32, device
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32, device
    seq_lens: torch.Tensor,  # [num_reqs] int32, device: context + this step's tokens
    scale: float,
    *,
    max_query_len: int,  # host ints from the step's metadata: no device sync here
    max_seq_len: int,
    num_splits: int | None = None,
    block_m: int | None = None,
    tiling: Tiling | None = None,
    split_counters: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], query's dtype
    """Causal paged attention of a mixed step; see the module docstring for the design.

    ``num_splits``: KV partitions per (query tile, KV head); 1 writes the output directly,
    more adds a small combine launch (none with ``split_counters``). None chooses from the
    batch (``choose_num_splits``); a captured CUDA graph keeps the choice made at capture.
    ``block_m``: rows (query tokens x heads of a group) per program, a power of two >= 16;
    None: 16 for a decode-only step, 64 otherwise.
    Fixed ``num_splits`` and ``block_m`` give each request a result independent of the
    rest of the batch. Rows past ``query_start_loc[-1]`` (padding tokens) are not written.
    ``tiling``: overrides the launch shape (tuning); ``block_m`` wins over its block_m.
    ``split_counters``: int32 zeros on the query's device, at least ``plan.num_q_tiles *
    num_kv_heads`` of them (``plan_launch``), to merge the splits in the attention launch
    instead of a second one (same bits). Every launch leaves them zero, so one persistent
    buffer serves every launch on its stream (a CUDA graph captures its address); two
    launches must not use it at the same time. None: the separate combine launch.
    """
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    num_reqs = seq_lens.shape[0]
    if num_heads % num_kv_heads or kv_cache.shape[4] != head_dim:
        raise ValueError(f"query {tuple(query.shape)} does not fit kv_cache {tuple(kv_cache.shape)}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if block_m is not None and (block_m < 16 or block_m & (block_m - 1)):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    if query.stride(-1) != 1:
        query = query.contiguous()
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache's last dimension must be contiguous")
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or num_reqs == 0:
        return out

    plan = plan_launch(num_tokens, num_heads, num_kv_heads, head_dim, num_reqs, max_query_len=max_query_len,
                       max_seq_len=max_seq_len, device=query.device, num_splits=num_splits, block_m=block_m,
                       tiling=tiling)
    num_splits = plan.num_splits
    split = num_splits > 1
    if split_counters is not None:
        _check_split_counters(split_counters, plan.num_q_tiles * num_kv_heads, query.device)
    fused_combine = split and split_counters is not None
    if split:
        part_max = torch.empty(num_splits, num_tokens, num_heads, dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(num_splits, num_tokens, num_heads, head_dim, dtype=torch.float32, device=query.device)
    else:
        part_max = part_sum = part_acc = out  # unused

    k_cache, v_cache = kv_cache[0], kv_cache[1]
    block_d = triton.next_power_of_2(max(head_dim, 16))
    _paged_attention_kernel[(plan.num_q_tiles, num_kv_heads, num_splits)](
        out, query, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
        part_max, part_sum, part_acc, split_counters if fused_combine else out,
        scale, num_reqs,
        query.stride(0), query.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        num_tokens * num_heads, num_heads,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE_SIZE=block_size,
        BLOCK_M=plan.block_m, BLOCK_Q=plan.block_q, BLOCK_N=plan.block_n, SPLIT=split,
        FUSED_COMBINE=fused_combine, DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        DOT_UPCAST=query.dtype == torch.bfloat16 and query.device.type == "cpu",
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    if split and not fused_combine:
        block_h = triton.next_power_of_2(num_heads)
        _combine_splits_kernel[(num_tokens,)](
            out, part_max, part_sum, part_acc, query_start_loc, num_reqs, num_splits,
            out.stride(0), out.stride(1),
            num_tokens * num_heads, num_heads,
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d,
            num_warps=8 if block_h * block_d >= 4096 else 4,
        )
    return out


@triton.jit
def _write_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    slot_mapping_ptr,  # [num_tokens] int64, block_id * block_size + offset; < 0: skip
    stride_key_tok, stride_key_head,
    stride_value_tok, stride_value_head,
    stride_k_block, stride_k_slot, stride_k_head,
    stride_v_block, stride_v_slot, stride_v_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    block_id = slot // PAGE_SIZE
    in_page = slot % PAGE_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(key_ptr + tok * stride_key_tok + offs_h[:, None] * stride_key_head + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + tok * stride_value_tok + offs_h[:, None] * stride_value_head + offs_d[None, :], mask=mask)
    k_dst = k_cache_ptr + block_id * stride_k_block + in_page * stride_k_slot
    v_dst = v_cache_ptr + block_id * stride_v_block + in_page * stride_v_slot
    tl.store(k_dst + offs_h[:, None] * stride_k_head + offs_d[None, :], k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst + offs_h[:, None] * stride_v_head + offs_d[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64
) -> None:
    """Scatter this step's K/V into their slots, cast to the cache dtype, like
    ``write_kv_ref``; unlike it, a NEGATIVE slot is skipped (a token whose K/V must not be
    kept; the engine's own CUDA-graph padding rows write to the scratch block instead)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    block_d = triton.next_power_of_2(head_dim)
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, PAGE_SIZE=kv_cache.shape[2],
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=block_d,
        num_warps=4 if num_kv_heads * block_d >= 1024 else 1,
    )
