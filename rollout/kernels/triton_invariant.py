"""Batch-invariant Triton kernels (exact on-policy mode on GPU): the guarantee of
``invariant.py`` (a token's result never depends on the rest of the call) at speed.

What makes a GPU result depend on the batch is a reduction whose order changes with it: a
GEMM library picks its tiles, split-K and instruction from M, an attention kernel splits the
keys by how many programs the batch leaves idle. Here every reduction has one fixed order:

``matmul_invariant`` (every linear and the LM head): one program per [BLOCK_M, BLOCK_N]
output tile, its K loop from 0 upward in BLOCK_K steps, accumulating in fp32 in the
``tl.dot`` accumulator; no split-K. The tiles are chosen from the weight's shape and dtype
only (``_matmul_tiles``), never from M: a row's accumulation order is then the same alone,
at any row of any tile, in any batch, and in the trainer's forward (same weights, same
tiles). Other rows of a tile are independent lanes of the same MMA (masked rows load 0).
BLOCK_M is the same for every M because tile heights lower to different MMA instructions
(16 rows: mma.sync; 64: wgmma), which round differently.

``paged_attention_invariant``: a program owns a tile of BLOCK_M (query token, head of one
KV head's group) rows of one request, like ``triton_attention``, with one fixed tile height
and no split-KV. It walks the keys in BLOCK_N blocks from position 0 in order, up to the
tile's last row's position, with an fp32 online softmax. A key block a row cannot see (past
its position) leaves that row's state bitwise unchanged: its scores are -inf, so the max
does not move (alpha is then exactly 1, forced, not computed), p is 0 and the row adds
exact zeros to its sum and accumulator. So a row's result is the same whether its tile
ends at its own position (a decode) or further (a prefill chunk of any size or offset, the
trainer's whole sequence), and whichever requests share the step.

``fused_moe_invariant``: ``triton_moe``'s kernels with one tiling (``_moe_tiles``, from
the dtype only). There a program computes a block of BLOCK_M (token, slot) pairs of one
expert times a column tile of its weights, its K loop from 0 upward with no split-K, and a
token's k products are summed by one program in ascending expert id; only the tile height,
which ``triton_moe.moe_tiles`` picks from the tokens per expert, made a token's bits depend
on the batch. With it fixed, a pair's row is an independent lane of the same MMA at any row
of any block, as in the matmul; which block it lands in (the alignment) moves it, never
changes how it is computed. No host sync: decode steps stay in CUDA graphs. The router
needs nothing new: its linear is ``linear_invariant`` and ``moe.route`` is torch's softmax
(one warp per row for E <= 1024, configured from E alone) and top-k (a single-block radix
select per row: the multi-block path, which the number of rows can select, needs E >= 300;
Qwen3-MoE has 128). tests/gpu/check_invariant.py checks both rows across batch sizes.

RMSNorm (``triton_layernorm.rms_norm``: one program per row, block and warps from the
hidden size), rotary (one program per token) and SiLU-and-mul (elementwise) are invariant
as they are. The trainer's forward (``trainers_integration/exact.py``) runs these same
kernels under autograd: the wrappers here keep the Triton forward (so its bits are the
engine's) and differentiate a torch recomputation in the backward, which need not be
invariant.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rollout.kernels.activation import silu_and_mul_ref
from rollout.kernels.attention import paged_attention_ref, write_kv_ref
from rollout.kernels.layernorm import rms_norm_ref
from rollout.kernels.moe import fused_moe_ref
from rollout.kernels.rotary import rotary_ref
from rollout.kernels.triton_activation import silu_and_mul as _silu_and_mul_triton
from rollout.kernels.triton_attention import _find_request
from rollout.kernels.triton_attention import write_kv as _write_kv_triton
from rollout.kernels.triton_layernorm import rms_norm as _rms_norm_triton
from rollout.kernels.triton_moe import MoeTiles
from rollout.kernels.triton_moe import fused_moe as _fused_moe_triton
from rollout.kernels.triton_rotary import rotary as _rotary_triton
from rollout.kernels.triton_utils import round_as

# ---------------------------------------------------------------------------------------
# Matmul
# ---------------------------------------------------------------------------------------

_MM_BLOCK_M = 64  # one wgmma (m64) per warpgroup on H100, for every M
_MM_WIDE_N = 16384  # from this many output columns, 128-wide tiles still fill the SMs
_MM_GROUP_M = 8  # row tiles that sweep the columns together (L2 reuse of the weight)


def _matmul_tiles(n: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a weight of ``n`` rows.

    A function of the weight (its rows and dtype), never of M, so a token's bits do not
    depend on the batch. H100 reasoning (to be timed: tests/gpu/check_invariant.py):
    decode (M <= 256) is bound by reading the weight once, so it needs programs on most of
    the 132 SMs with enough loads in flight: 64-wide column tiles give N/64 programs (24 for
    a 1536-row projection, 280 for 17920), four stages keep 64-96 KiB in flight per SM.
    Prefill (M in thousands) is bound by the tensor cores: 64x128 tiles (one warpgroup's
    wgmma m64n128k16) where N is wide, 64x64 otherwise, about half of cuBLAS's 128x256 rate.
    fp32 runs ieee FMAs (no tf32: the reference's precision), smaller K steps for shared memory."""
    if dtype == torch.float32:
        return _MM_BLOCK_M, 64, 32, 4, 3
    return _MM_BLOCK_M, 128 if n >= _MM_WIDE_N else 64, 64, 4, 4


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(
    x_ptr,  # [M, K], last dim contiguous
    w_ptr,  # [N, K], last dim contiguous
    bias_ptr,  # [N]; unused unless HAS_BIAS
    out_ptr,  # [M, N] contiguous, x's dtype
    M, N, K,
    stride_xm, stride_wn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0 (a property of the weight): no K mask
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
    DOT_UPCAST: tl.constexpr,  # bf16 in the interpreter (triton-lang/triton#11584): via fp32
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles share each column tile's weight in L2. It picks
    # which program computes a tile, never how.
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_m
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # always from 0, in order: the one reduction order
        if EVEN_K:
            a = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < K - k0
            a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    dtype = out_ptr.dtype.element_ty
    if dtype != tl.float32:
        acc = round_as(acc, dtype)  # nearest-even in the interpreter too
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(dtype), mask=m_mask[:, None] & n_mask[None, :])


def matmul_invariant(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T + bias``: x [M, K], w [N, K], bias [N] -> [M, N] in x's dtype, fp32
    accumulation; each row's bits depend only on that row and the weights. Not
    differentiable (``linear_invariant`` is)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"matmul_invariant: x {tuple(x.shape)} and w {tuple(w.shape)} do not fit")
    if x.dtype != w.dtype or (bias is not None and (bias.shape != (w.shape[0],) or bias.dtype != x.dtype)):
        raise ValueError(f"matmul_invariant: dtypes/shapes x {x.dtype}, w {w.dtype}, "
                         f"bias {None if bias is None else (bias.dtype, tuple(bias.shape))}")
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    if x.stride(1) != 1:
        x = x.contiguous()
    if w.stride(1) != 1:
        w = w.contiguous()
    block_m, block_n, block_k, num_warps, num_stages = _matmul_tiles(n, w.dtype)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _matmul_kernel[grid](
        x, w, bias if bias is not None else w, out, m, n, k, x.stride(0), w.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=_MM_GROUP_M,
        EVEN_K=k % block_k == 0,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        DOT_UPCAST=x.dtype == torch.bfloat16 and x.device.type == "cpu",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


class _LinearInvariant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias):
        ctx.save_for_backward(x, w)
        ctx.has_bias = bias is not None
        return matmul_invariant(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        grad_x = grad @ w if ctx.needs_input_grad[0] else None
        grad_w = grad.t() @ x if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear_invariant(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` through ``matmul_invariant``: x [..., K] -> [..., N]. Differentiable; the
    backward is plain torch matmuls (not invariant, it need not be)."""
    x2 = x.reshape(-1, x.shape[-1])
    if _needs_grad(x, w, bias):
        out = _LinearInvariant.apply(x2, w, bias)
    else:
        out = matmul_invariant(x2, w, bias)
    return out.view(*x.shape[:-1], w.shape[0])


# ---------------------------------------------------------------------------------------
# Paged attention
# ---------------------------------------------------------------------------------------

_ATTN_BLOCK_M = 64  # rows per program, every step (see the module docstring)


@triton.jit(do_not_specialize=["num_reqs", "stride_bt_req"])
def _paged_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    query_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_reqs, max_blocks] int32
    query_start_loc_ptr,  # [num_reqs + 1] int32
    seq_lens_ptr,  # [num_reqs] int32
    scale,
    num_reqs,
    stride_q_tok, stride_q_head,
    stride_o_tok, stride_o_head,
    stride_k_block, stride_k_slot, stride_k_head,
    stride_v_block, stride_v_slot, stride_v_head,
    stride_bt_req,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM
    PAGE_SIZE: tl.constexpr,  # the cache's block_size
    BLOCK_M: tl.constexpr,  # rows: BLOCK_Q tokens x GROUP heads, padded
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,  # keys per block: the fixed grain of the key loop
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    # Axis 0 enumerates query tiles without a host sync, as in triton_attention: request
    # i's tiles start at query_start_loc[i] // BLOCK_Q + i.
    pid_q = tl.program_id(0)
    kv_head = tl.program_id(1)
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
    q_idx = q_tile * BLOCK_Q + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_mask = (offs_m < BLOCK_Q * GROUP) & (q_idx < q_len)
    d_mask = offs_d < HEAD_DIM
    tok = (q_start + q_idx).to(tl.int64)
    q = tl.load(query_ptr + tok[:, None] * stride_q_tok + head[:, None] * stride_q_head + offs_d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    q_pos = context_len + q_idx  # [BLOCK_M] absolute positions

    kv_len = tl.minimum(seq_len, context_len + (q_tile + 1) * BLOCK_Q)  # the tile's last row sees these
    block_table = block_tables_ptr + req.to(tl.int64) * stride_bt_req
    qk_scale = scale * 1.4426950408889634  # exp2 domain
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t in range(0, tl.cdiv(kv_len, BLOCK_N)):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < kv_len
        block_ids = tl.load(block_table + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        in_page = offs_n % PAGE_SIZE
        k_off = block_ids * stride_k_block + in_page * stride_k_slot + kv_head * stride_k_head
        v_off = block_ids * stride_v_block + in_page * stride_v_slot + kv_head * stride_v_head
        k = tl.load(k_cache_ptr + k_off[None, :] + offs_d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0).to(q.dtype)  # [BLOCK_D, BLOCK_N]
        if DOT_UPCAST:
            s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, k, input_precision=DOT_PRECISION)
        s = s * qk_scale  # [BLOCK_M, BLOCK_N]
        s = tl.where((offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Key 0 is in block 0 and every row sees it, so m_new is finite from then on.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        # A block a row cannot see leaves its max: alpha is exactly 1, not exp2(0) computed.
        alpha = tl.where(m_new == m_i, 1.0, tl.exp2(m_i - m_ref))
        p = tl.exp2(s - m_ref[:, None])  # 0 where not visible
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        if DOT_UPCAST:
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(row_mask, l_i, 1.0)[:, None]  # padding rows: no 0 / 0
    out_ptrs = out_ptr + tok[:, None] * stride_o_tok + head[:, None] * stride_o_head + offs_d[None, :]
    dtype = out_ptr.dtype.element_ty
    if dtype != tl.float32:
        out = round_as(out, dtype)
    tl.store(out_ptrs, out.to(dtype), mask=row_mask[:, None] & d_mask[None, :])


def _paged_attention_launch(
    query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, max_query_len: int, max_seq_len: int,
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    num_reqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads if num_kv_heads else 0
    if not group or num_heads % num_kv_heads or kv_cache.shape[4] != head_dim or group > _ATTN_BLOCK_M:
        raise ValueError(f"query {tuple(query.shape)} does not fit kv_cache {tuple(kv_cache.shape)}")
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache's last dimension must be contiguous")
    if query.stride(-1) != 1:
        query = query.contiguous()
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or num_reqs == 0:
        return out
    block_q = _ATTN_BLOCK_M // group
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _paged_attention_kernel[(num_tokens // block_q + num_reqs, num_kv_heads)](
        out, query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, num_reqs,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(max(head_dim, 16)), PAGE_SIZE=block_size,
        BLOCK_M=_ATTN_BLOCK_M, BLOCK_Q=block_q, BLOCK_N=64 if head_dim <= 128 else 32,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        DOT_UPCAST=query.dtype == torch.bfloat16 and query.device.type == "cpu",
        num_warps=4, num_stages=2,
    )
    return out


def _paged_attention_diff_ref(query, kv_cache, block_tables, query_start_loc, seq_lens, scale, max_query_len,
                              max_seq_len):
    # The backward's recomputation: the torch reference is differentiable in query and cache.
    return paged_attention_ref(query, kv_cache, block_tables, query_start_loc.cpu(), seq_lens.cpu(), scale)


def paged_attention_invariant(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_reqs, max_blocks] int32, device
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32, device
    seq_lens: torch.Tensor,  # [num_reqs] int32, device: context + this step's tokens
    scale: float,
    max_query_len: int,
    max_seq_len: int,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], query's dtype
    """Causal paged attention of a mixed step (``paged_attention_ref``'s semantics), each
    query token's bits independent of the step's layout (module docstring). Reads device
    tensors only (CUDA graphs). Differentiable in ``query`` and ``kv_cache``: the backward
    recomputes with ``paged_attention_ref``."""
    args = (query, kv_cache, block_tables, query_start_loc, seq_lens, scale, max_query_len, max_seq_len)
    if _needs_grad(query, kv_cache):
        return _KernelForwardRefBackward.apply(_paged_attention_launch, _paged_attention_diff_ref, *args)
    return _paged_attention_launch(*args)


def write_kv_invariant(key, value, kv_cache, slot_mapping) -> None:
    """The K/V-cache write (a copy: invariant). Under autograd (the trainer writes into a
    non-leaf cache) the differentiable ``index_copy_`` of ``write_kv_ref``; otherwise the
    Triton write, which skips slot < 0 (CUDA-graph padding)."""
    if _needs_grad(key, value, kv_cache):
        write_kv_ref(key, value, kv_cache, slot_mapping)
    else:
        _write_kv_triton(key, value, kv_cache, slot_mapping)


# ---------------------------------------------------------------------------------------
# Fused mixture-of-experts
# ---------------------------------------------------------------------------------------


def _moe_tiles(dtype: torch.dtype) -> MoeTiles:
    """The one tiling of ``fused_moe_invariant``: a function of the dtype, never of the
    number of tokens. Blocks of ``_MM_BLOCK_M`` pairs (one wgmma height, as the matmul's).
    Not timed yet (tests/gpu/check_invariant.py times it): narrow column tiles keep a decode step's few
    experts on many SMs (T=1, k=8, I=768: 8 x 768/32 = 192 gate/up programs) as the fast
    kernel's decode tiles do; prefill then runs 64x(32+32) tiles, below the fast kernel's
    128x(64+64). fp32 runs ieee FMAs with smaller K steps, as the matmul's."""
    if dtype == torch.float32:
        return MoeTiles(_MM_BLOCK_M, 32, 32, 32, 32, num_warps=4, num_stages=2)
    return MoeTiles(_MM_BLOCK_M, 32, 64, 64, 64, num_warps=4, num_stages=4)


def _fused_moe_launch(x, w13, w2, topk_weights, topk_ids):
    return _fused_moe_triton(x, w13, w2, topk_weights, topk_ids, tiles=_moe_tiles(x.dtype))


def fused_moe_invariant(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
) -> torch.Tensor:
    """``moe.fused_moe_ref``'s call (x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights
    [T, k], topk_ids [T, k] -> [T, H] in x's dtype), each token's bits independent of the
    other tokens (module docstring). Differentiable in x, the expert weights and the routing
    weights: the backward recomputes with ``fused_moe_ref``."""
    args = (x, w13, w2, topk_weights, topk_ids)
    if _needs_grad(x, w13, w2, topk_weights):
        return _KernelForwardRefBackward.apply(_fused_moe_launch, fused_moe_ref, *args)
    return _fused_moe_launch(*args)


# ---------------------------------------------------------------------------------------
# The elementwise and per-row ops: Triton forward, torch backward
# ---------------------------------------------------------------------------------------


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _KernelForwardRefBackward(torch.autograd.Function):
    """``kernel(*args)`` forward; the backward differentiates ``ref(*args)`` recomputed with
    torch ops (same maths, not the same bits: gradients need not be invariant)."""

    @staticmethod
    def forward(ctx, kernel, ref, *args):
        ctx.ref = ref
        ctx.tensor_at = [i for i, a in enumerate(args) if torch.is_tensor(a)]
        ctx.others = [None if torch.is_tensor(a) else a for a in args]
        ctx.save_for_backward(*[args[i] for i in ctx.tensor_at])
        return kernel(*args)

    @staticmethod
    def backward(ctx, *grads):
        args = list(ctx.others)
        wrt = []
        for i, t in zip(ctx.tensor_at, ctx.saved_tensors):
            if ctx.needs_input_grad[2 + i]:
                t = t.detach().requires_grad_()
                wrt.append((i, t))
            args[i] = t
        with torch.enable_grad():
            outs = ctx.ref(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], [t for _, t in wrt], [g for _, g in pairs],
                                  allow_unused=True)
        result: list[torch.Tensor | None] = [None] * len(args)
        for (i, _), g in zip(wrt, got):
            result[i] = g
        return (None, None, *result)


def rms_norm_invariant(x, weight, eps, residual=None):
    """``triton_layernorm.rms_norm`` (one program per row: invariant), differentiable."""
    if _needs_grad(x, weight, residual):
        return _KernelForwardRefBackward.apply(_rms_norm_triton, rms_norm_ref, x, weight, eps, residual)
    return _rms_norm_triton(x, weight, eps, residual)


def rotary_invariant(positions, query, key, cos_sin_cache, q_norm_weight=None, k_norm_weight=None, eps=1e-6):
    """``triton_rotary.rotary`` (one program per token), differentiable."""
    args = (positions, query, key, cos_sin_cache, q_norm_weight, k_norm_weight, eps)
    if _needs_grad(query, key, q_norm_weight, k_norm_weight):
        return _KernelForwardRefBackward.apply(_rotary_triton, rotary_ref, *args)
    return _rotary_triton(*args)


def silu_and_mul_invariant(x):
    """``triton_activation.silu_and_mul`` (elementwise), differentiable."""
    if _needs_grad(x):
        return _KernelForwardRefBackward.apply(_silu_and_mul_triton, silu_and_mul_ref, x)
    return _silu_and_mul_triton(x)


def log_softmax_invariant(logits: torch.Tensor) -> torch.Tensor:
    """fp32 ``log_softmax`` over the vocab: torch's own, the call the sampler makes for the
    logprobs it returns, so the trainer's match them bit for bit. On CUDA torch runs one
    thread block per row with a block size chosen from the vocab size alone: the same bits
    for a row in any batch (tests/gpu/check_invariant.py checks it)."""
    return torch.log_softmax(logits.float(), dim=-1)

