"""SiLU-and-mul over a fused gate/up projection, Triton. Reference: ``activation.silu_and_mul_ref``.

Rounding follows the reference: ``silu(gate)`` is computed in fp32 and rounded to the
activation dtype (as torch's silu), then multiplied by ``up`` with one more rounding (both
through ``round_as``). The GPU's fast ``exp`` differs from torch's in the last fp32 bits,
which can tip the rounding of ``silu(gate)``: one ulp there, at most two in the output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rollout.kernels.triton_utils import round_as


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [num_tokens, 2 * d]: gate | up
    out_ptr,  # [num_tokens, d] contiguous
    x_row_stride,
    d,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < d
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * x_row_stride + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_row_stride + d + offs, mask=mask, other=0.0).to(tl.float32)
    silu = round_as(gate / (1.0 + tl.exp(-gate)), dtype)  # torch rounds silu(gate) first
    tl.store(out_ptr + row * d + offs, round_as(silu * up, dtype).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x``: [..., 2 * d] as (gate, up) -> [..., d], a new contiguous tensor."""
    assert x.shape[-1] % 2 == 0, x.shape
    d = x.shape[-1] // 2
    out_shape = (*x.shape[:-1], d)
    x = x.reshape(-1, 2 * d)
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_tokens = x.shape[0]
    out = torch.empty((num_tokens, d), dtype=x.dtype, device=x.device)
    if num_tokens == 0 or d == 0:
        return out.view(out_shape)
    block_d = min(triton.next_power_of_2(d), 1024)
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(d, block_d))](
        x, out, x.stride(0), d, BLOCK_D=block_d, num_warps=4,
    )
    return out.view(out_shape)
