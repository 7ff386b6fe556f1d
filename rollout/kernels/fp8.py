"""FP8 (e4m3) block quantization and the torch reference of the block-scaled GEMM.

The layout is the DeepSeek-V3 / Qwen FP8 checkpoints': a weight [N, K] is stored as
``float8_e4m3fn`` with one fp32 scale per 128x128 block, ``weight_scale_inv`` [ceil(N/128),
ceil(K/128)], so that ``w ~= w_q * scale`` blockwise (the name is the checkpoints': the
scale multiplies on dequantization). Activations are quantized dynamically per token and
group of 128 features (1x128 blocks), scale [T, ceil(K/128)]. A scale is ``amax / 448``
(448 = the largest finite e4m3), so each block's largest magnitude maps onto 448; partial
blocks at the tails (N or K not a multiple of 128) take the amax of the elements they hold.

The GEMM here dequantizes both operands to fp32 and multiplies: the numerics any faster
kernel (a Triton block GEMM, the op set's ``fp8_linear``) is tested against.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
BLOCK = 128
# A block of zeros gets scale EPS / 448 instead of 0 (no 0/0): it still dequantizes to 0.
_EPS = 1e-10


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_amax(x: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    """[ceil(N/bn), ceil(K/bk)] fp32 max |x| per block of the 2-D ``x`` (tails padded with 0)."""
    n, k = x.shape
    nb, kb = _cdiv(n, block_n), _cdiv(k, block_k)
    padded = torch.zeros(nb * block_n, kb * block_k, dtype=torch.float32, device=x.device)
    padded[:n, :k] = x.abs()
    return padded.view(nb, block_n, kb, block_k).amax(dim=(1, 3))


def _expand(scale: torch.Tensor, n: int, k: int, block_n: int, block_k: int) -> torch.Tensor:
    """Block scales [nb, kb] -> one per element [n, k]."""
    return scale.repeat_interleave(block_n, dim=0)[:n].repeat_interleave(block_k, dim=1)[:, :k]


def _quantize(x: torch.Tensor, block_n: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    x32 = x.float()
    scale = _block_amax(x32, block_n, block_k).clamp(min=_EPS) / FP8_MAX
    q = (x32 / _expand(scale, *x32.shape, block_n, block_k)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_weight_blockwise(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [N, K] (any float dtype) -> (fp8 [N, K], fp32 scale [ceil(N/block), ceil(K/block)])."""
    assert w.dim() == 2, f"expected a 2-D weight, got shape {tuple(w.shape)}"
    return _quantize(w, block, block)


def quantize_activation_per_token_group(x: torch.Tensor, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [T, K] -> (fp8 [T, K], fp32 scale [T, ceil(K/group)]): one scale per token and
    group of ``group`` features."""
    assert x.dim() == 2, f"expected [num_tokens, features], got shape {tuple(x.shape)}"
    return _quantize(x, 1, group)


def dequantize_blockwise(
    q: torch.Tensor, scale: torch.Tensor, block_n: int = BLOCK, block_k: int = BLOCK,
) -> torch.Tensor:
    """fp32 ``q * scale`` with one scale per ``block_n x block_k`` block."""
    return q.float() * _expand(scale, *q.shape, block_n, block_k)


def fp8_block_matmul_ref(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, block: int = BLOCK,
) -> torch.Tensor:
    """fp32 ``dequant(x) @ dequant(w).T``: x_q [T, K] fp8 with x_scale [T, ceil(K/block)],
    w_q [N, K] fp8 with w_scale [ceil(N/block), ceil(K/block)] -> [T, N] fp32."""
    x = dequantize_blockwise(x_q, x_scale, 1, block)
    w = dequantize_blockwise(w_q, w_scale, block, block)
    return x @ w.T


def fp8_linear_ref(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """A linear layer over a block-quantized weight: ``x`` [..., K] quantized per token and
    128-feature group, the reference GEMM in fp32, the result in ``x``'s dtype (+ bias)."""
    x2 = x.reshape(-1, x.shape[-1])
    x_q, x_scale = quantize_activation_per_token_group(x2)
    out = fp8_block_matmul_ref(x_q, x_scale, w_q, w_scale).to(x.dtype).view(*x.shape[:-1], w_q.shape[0])
    return out if bias is None else out + bias
