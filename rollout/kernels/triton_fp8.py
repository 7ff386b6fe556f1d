"""FP8 (e4m3) block-scaled GEMM as Triton kernels: the fast ``fp8_linear`` beside the torch
reference in ``fp8.py`` (same call, same layout: weight [N, K] ``float8_e4m3fn`` with one
fp32 scale per 128x128 block, activations quantized per token and 128-feature group).

``fp8_linear(x, w_q, w_scale, bias=None)`` is two launches, neither of which waits on the
host (capturable in a CUDA graph):

1. ``_quantize_kernel``: a program per (token, ``GROUPS_PER_PROGRAM`` groups of 128
   features) takes each group's amax and writes the fp8 codes and the fp32 scales
   [T, ceil(K/128)]. The rule is the reference's: ``scale = max(amax, 1e-10) / 448``,
   ``q = e4m3(clamp(x / scale, -448, 448))`` (round to nearest, ties to even), and the
   bytes are bitwise ``quantize_activation_per_token_group``'s on the device it runs on.
   Three details make that hold: the division is IEEE (``div_rn``; Triton's ``/`` is
   ``div.full.f32``, up to 2 ulps off); torch divides a tensor by a Python scalar as a true
   division on CPU but as a multiply by the scalar's fp32 reciprocal on CUDA, so the
   scale follows the device (``scale_by_reciprocal``); and the value is rounded onto the
   e4m3 grid in fp32 with integer and fp32 ops (``_round_to_e4m3``) before the cast to
   fp8, which is then exact. The native cast alone is not nearest-even everywhere: the
   interpreter's rounds ties away from zero and drops the carry out of the mantissa
   (triton 3.9: -124.0 -> -64.0; triton-lang/triton#11897), and Ada's fp32 lowering goes
   through fp16 and rounds twice (triton-lang/triton#11753).
2. ``_fp8_gemm_kernel``: a program per (``BLOCK_M`` tokens, ``BLOCK_N`` output features)
   walks K in ``BLOCK_K`` steps (128 or a divisor of it, so a step lies in one scale
   block). Each step is one ``tl.dot`` of the fp8 tiles from a zero accumulator, scaled by
   ``x_scale[t, kb] * w_scale[nb, kb]`` and added to an fp32 accumulator (``BLOCK_N``
   divides 128, so a tile has one weight scale per K block). The epilogue rounds to the
   output dtype, adds the bias and rounds again, as the reference does (``out.to(dtype)
   + bias``). Tails of T, N and K are masked; the weight and its scales are read through
   their strides, so the row slices of a fused weight (``narrow`` on dim 0, as the linear
   layers pass per shard) need no copy; the weight's last dim must be contiguous.

Numerics. The reference dequantizes both operands to fp32 and does one matmul; the kernel
sums exact fp8 products per 128-wide K block in fp32, then scales each block's sum and
adds it. Both are within about ``(K + 3) * 2^-24`` of the magnitudes ``|x| @ |w|^T`` from
the exact product of the dequantized operands, so they match within fp32 reassociation
(tests/test_triton_fp8.py derives its tolerances from that), then round to the output
dtype identically. On Hopper the tensor cores accumulate fp8 products with about 13
mantissa bits (truncating) inside one ``tl.dot`` (Triton's default on sm_90 does not
promote within a dot); a dot here spans one 128-wide block, whose sum is then promoted to
fp32 (DeepGEMM's promotion interval), so there the difference per block is of order
``2^-11`` of that block's magnitudes: below a bf16 ulp of typical outputs, but it can tip
roundings (the GPU tests allow ``2^-10``; ``tests/gpu/check_fp8.py`` measures it at real
shapes). Needs fp8 ``tl.dot``: CUDA sm_89+ (Ada, Hopper), or the interpreter, which
supports fp8 tensors and upcasts fp8 tiles to fp16 for the dot (exact, summed in fp32):
the same code runs there unchanged, no interpreter-only path.

Tiles (``fp8_tiles``: guesses, not yet measured; K steps of 128 as in vLLM's tuned H100
tables for 128x128-block fp8): decode (T <= 16) is bound by the weight read (4096 x 4096:
16 MiB, ~5 us at 3.35 TB/s), so ``BLOCK_M`` 16 (the smallest tensor-core tile) and narrow
column tiles so that one token still launches about a program per SM (N 4096 / 32 = 128
programs); up to 64 tokens 32-row tiles; beyond, 64 x 128 tiles with 4 warps and 4 stages
(what vLLM's table for N 12288, K 7168 picks at every M >= 256). ``python -m
tests.gpu.check_fp8 --sweep`` times alternatives on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rollout.kernels.fp8 import BLOCK, FP8_DTYPE
from rollout.kernels.triton_utils import round_as

_GROUP_M = 8  # row tiles that sweep the column tiles together (L2 reuse of the weight)
_GROUPS_PER_PROGRAM = 8  # activation groups quantized per program (1024 features)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Fp8Tiles:
    """Launch shape of the GEMM: ``block_m`` tokens by ``block_n`` output features per
    program, K steps of ``block_k``, warps and pipeline stages."""

    block_m: int
    block_n: int
    block_k: int = BLOCK
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self) -> None:
        if self.block_m not in (16, 32, 64, 128, 256):
            raise ValueError(f"block_m {self.block_m} not in (16, 32, 64, 128, 256)")
        # One weight scale per tile and K step: both divide the 128-block.
        if self.block_n not in (16, 32, 64, 128):
            raise ValueError(f"block_n {self.block_n} must divide {BLOCK} (16, 32, 64 or 128)")
        if self.block_k not in (32, 64, 128):
            raise ValueError(f"block_k {self.block_k} must divide {BLOCK} and be >= 32 (fp8 dot)")


def fp8_tiles(num_tokens: int, n: int) -> Fp8Tiles:
    """The default tiles for ``num_tokens`` rows and ``n`` output features (module docstring)."""
    if num_tokens <= 16:
        return Fp8Tiles(16, 64 if n >= 8192 else 32)
    if num_tokens <= 64:
        return Fp8Tiles(32, 64)
    return Fp8Tiles(64, 128)


# ---------------------------------------------------------------------------------------
# Activation quantization
# ---------------------------------------------------------------------------------------


@triton.jit
def _round_to_e4m3(x):
    """fp32 ``x`` (|x| <= 448) rounded to the nearest e4m3 value, ties to even, kept in
    fp32: the cast to fp8 that follows is then exact on every backend."""
    bits = x.to(tl.uint32, bitcast=True)
    # |x| >= 2^-6 (e4m3's normal range): keep 3 of fp32's 23 mantissa bits, nearest-even;
    # a carry out of the mantissa moves into the exponent, as it should.
    normal = (((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) << 20).to(tl.float32, bitcast=True)
    # Below 2^-6 e4m3 steps by 2^-9: adding +-2^14 (whose fp32 spacing is 2^-9) rounds
    # there, ties to even, and subtracting it back is exact. A value that rounds to zero
    # keeps x's sign, as torch's cast does (-1e-5 -> -0).
    big = tl.where(x < 0, -16384.0, 16384.0)
    sub = ((x + big) - big).to(tl.uint32, bitcast=True)
    sub = (sub | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(x) < 0.015625, sub, normal)


@triton.jit
def _quantize_kernel(
    x_ptr,  # [T, K], last dim contiguous
    q_ptr,  # [T, K] fp8 contiguous
    scale_ptr,  # [T, num_groups] fp32 contiguous
    K, num_groups, stride_xt,
    GROUP: tl.constexpr,  # 128
    GROUPS_PER_PROGRAM: tl.constexpr,
    SCALE_BY_RECIPROCAL: tl.constexpr,  # CUDA torch's amax / 448: amax * fp32(1 / 448)
):
    token = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)  # [G]
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [G, GROUP]
    mask = cols < K
    x = tl.load(x_ptr + token * stride_xt + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-10)  # [G]; a zero group: 1e-10 / 448
    if SCALE_BY_RECIPROCAL:
        scale = amax * 0.002232142857142857  # 1 / 448 (rounds to fp32(1) / fp32(448))
    else:
        scale = tl.math.div_rn(amax, 448.0)
    q = tl.math.div_rn(x, scale[:, None])
    q = _round_to_e4m3(tl.minimum(tl.maximum(q, -448.0), 448.0))
    tl.store(q_ptr + token * K + cols, q.to(tl.float8e4nv), mask=mask)
    tl.store(scale_ptr + token * num_groups + groups, scale, mask=groups < num_groups)


def quantize_activation_per_token_group(
    x: torch.Tensor, scale_by_reciprocal: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [T, K] (fp32, bf16 or fp16) -> (fp8 [T, K], fp32 scale [T, ceil(K/128)]),
    bitwise ``fp8.quantize_activation_per_token_group``'s on the same device.
    ``scale_by_reciprocal`` (default: on CUDA) computes the scale as CUDA torch does
    (module docstring); tests pass it to check both rules anywhere."""
    if x.dim() != 2 or x.dtype not in _DTYPES:
        raise ValueError(f"quantize: expected x [num_tokens, features] in {_DTYPES}, "
                         f"got shape {tuple(x.shape)} {x.dtype}")
    num_tokens, k = x.shape
    num_groups = triton.cdiv(k, BLOCK)
    q = torch.empty(num_tokens, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(num_tokens, num_groups, dtype=torch.float32, device=x.device)
    if num_tokens == 0 or k == 0:
        return q, scale
    if x.stride(-1) != 1:
        x = x.contiguous()
    if scale_by_reciprocal is None:
        scale_by_reciprocal = x.device.type == "cuda"
    grid = (num_tokens, triton.cdiv(num_groups, _GROUPS_PER_PROGRAM))
    _quantize_kernel[grid](
        x, q, scale, k, num_groups, x.stride(0),
        GROUP=BLOCK, GROUPS_PER_PROGRAM=_GROUPS_PER_PROGRAM, SCALE_BY_RECIPROCAL=scale_by_reciprocal, num_warps=4,
    )
    return q, scale


# ---------------------------------------------------------------------------------------
# Block-scaled GEMM
# ---------------------------------------------------------------------------------------


@triton.jit
def _tile_of(pid, num_rows, num_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid``, GROUP_M row tiles per column sweep."""
    num_pid_m = tl.cdiv(num_rows, BLOCK_M)
    num_pid_n = tl.cdiv(num_cols, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_m, (pid % width) // group_m


@triton.jit
def _fp8_gemm_kernel(
    xq_ptr,  # [T, K] fp8, last dim contiguous
    xs_ptr,  # [T, ceil(K/128)] fp32
    wq_ptr,  # [N, K] fp8, last dim contiguous (a row slice of a fused weight: any row stride)
    ws_ptr,  # [ceil(N/128), ceil(K/128)] fp32
    bias_ptr,  # [N] in out's dtype (unused without HAS_BIAS)
    out_ptr,  # [T, N] contiguous
    T, N, K,
    stride_xq, stride_xs, stride_xs_k, stride_wq, stride_ws, stride_ws_k,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # divides 128: the tile's rows share one weight scale per K block
    BLOCK_K: tl.constexpr,  # divides 128: a K step lies in one scale block
    GROUP: tl.constexpr,  # 128
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K mask
):
    pid_m, pid_n = _tile_of(tl.program_id(0), T, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < T
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = xq_ptr + offs_m[:, None].to(tl.int64) * stride_xq + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = wq_ptr + offs_n[None, :].to(tl.int64) * stride_wq + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    xs_ptrs = xs_ptr + offs_m.to(tl.int64) * stride_xs  # [BLOCK_M]
    ws_row = ws_ptr + ((pid_n * BLOCK_N) // GROUP) * stride_ws  # this tile's scale row
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < K - k0
            a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        kb = k0 // GROUP
        a_scale = tl.load(xs_ptrs + kb * stride_xs_k, mask=m_mask, other=0.0)  # [BLOCK_M]
        b_scale = tl.load(ws_row + kb * stride_ws_k)
        # One block's exact fp8 products summed from zero, then scaled into fp32.
        acc += tl.dot(a, b) * (a_scale[:, None] * b_scale)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    dtype = out_ptr.dtype.element_ty
    out = round_as(acc, dtype)  # the reference's matmul output in x's dtype
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        out = round_as(out + bias[None, :], dtype)  # then + bias, rounded again
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out_ptrs, out.to(dtype), mask=m_mask[:, None] & n_mask[None, :])


def _check_weight(w_q: torch.Tensor, w_scale: torch.Tensor, k: int) -> None:
    if w_q.dim() != 2 or w_q.dtype != FP8_DTYPE or w_q.shape[1] != k:
        raise ValueError(f"fp8 GEMM: weight must be [N, {k}] {FP8_DTYPE}, got {tuple(w_q.shape)} {w_q.dtype}")
    n = w_q.shape[0]
    want = (triton.cdiv(n, BLOCK), triton.cdiv(k, BLOCK))
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != want:
        raise ValueError(f"fp8 GEMM: weight scale must be {want} float32, got {tuple(w_scale.shape)} {w_scale.dtype}")
    if w_q.stride(1) != 1 and k > 1:
        raise ValueError("fp8 GEMM: the weight needs a contiguous last dim (no copy of the weight)")


def fp8_block_matmul(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32, tiles: Fp8Tiles | None = None,
) -> torch.Tensor:
    """x_q [T, K] fp8 with x_scale [T, ceil(K/128)] fp32, w_q [N, K] fp8 with w_scale
    [ceil(N/128), ceil(K/128)] fp32 -> [T, N] in ``out_dtype`` (+ ``bias`` [N] in
    ``out_dtype``, added after the rounding). The default, fp32 without bias, is
    ``fp8.fp8_block_matmul_ref``'s result. ``tiles`` overrides ``fp8_tiles``."""
    if x_q.dim() != 2 or x_q.dtype != FP8_DTYPE:
        raise ValueError(f"fp8 GEMM: x_q must be [T, K] {FP8_DTYPE}, got {tuple(x_q.shape)} {x_q.dtype}")
    num_tokens, k = x_q.shape
    if x_scale.dtype != torch.float32 or tuple(x_scale.shape) != (num_tokens, triton.cdiv(k, BLOCK)):
        raise ValueError(f"fp8 GEMM: x_scale must be [{num_tokens}, {triton.cdiv(k, BLOCK)}] float32, "
                         f"got {tuple(x_scale.shape)} {x_scale.dtype}")
    _check_weight(w_q, w_scale, k)
    n = w_q.shape[0]
    if out_dtype not in _DTYPES:
        raise ValueError(f"fp8 GEMM: out_dtype {out_dtype} not in {_DTYPES}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != out_dtype):
        raise ValueError(f"fp8 GEMM: bias must be [{n}] {out_dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if len({t.device for t in (x_q, x_scale, w_q, w_scale, *(() if bias is None else (bias,)))}) != 1:
        raise ValueError("fp8 GEMM: tensors on different devices")
    out = torch.empty(num_tokens, n, dtype=out_dtype, device=x_q.device)
    if num_tokens == 0 or n == 0:
        return out
    if x_q.stride(-1) != 1:
        x_q = x_q.contiguous()
    t = tiles or fp8_tiles(num_tokens, n)
    grid = (triton.cdiv(num_tokens, t.block_m) * triton.cdiv(n, t.block_n),)
    _fp8_gemm_kernel[grid](
        x_q, x_scale, w_q, w_scale, out if bias is None else bias, out,
        num_tokens, n, k,
        x_q.stride(0), x_scale.stride(0), x_scale.stride(1), w_q.stride(0), w_scale.stride(0), w_scale.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP=BLOCK,
        GROUP_M=_GROUP_M, EVEN_K=k % t.block_k == 0, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return out


def fp8_linear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
    tiles: Fp8Tiles | None = None,
) -> torch.Tensor:
    """``fp8.fp8_linear_ref``'s call and result (module docstring: numerics): ``x`` [..., K]
    (fp32, bf16 or fp16) quantized per token and 128-feature group, times the
    block-quantized ``w_q`` [N, K] (``w_scale`` [ceil(N/128), ceil(K/128)]), -> [..., N] in
    x's dtype (+ ``bias`` [N] in x's dtype). No host sync: capturable in a CUDA graph."""
    if x.dim() == 0 or x.dtype not in _DTYPES:
        raise ValueError(f"fp8_linear: expected x [..., K] in {_DTYPES}, got shape {tuple(x.shape)} {x.dtype}")
    _check_weight(w_q, w_scale, x.shape[-1])  # before the quantization launch
    x_q, x_scale = quantize_activation_per_token_group(x.reshape(-1, x.shape[-1]))
    out = fp8_block_matmul(x_q, x_scale, w_q, w_scale, bias, out_dtype=x.dtype, tiles=tiles)
    return out.view(*x.shape[:-1], w_q.shape[0])
