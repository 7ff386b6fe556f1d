"""RMSNorm with optional fused residual add, Triton. Reference: ``layernorm.rms_norm_ref``.

Numerics follow the reference (HF): the residual sum is rounded to the input dtype (and
that rounded sum is what gets normalised and returned), the mean square and the scaling
run in fp32, the normalised row is rounded to the input dtype and only then multiplied by
``weight`` (one more rounding, to ``promote_types(weight, x)``, as torch's ``weight * h``).
Each rounding goes through ``round_as`` so the compiler cannot drop it. bf16/fp16
results differ from the reference only where the fp32 sum of squares (reduction order) or
rsqrt differ in the last bit and that tips the rounding of the normalised row: one ulp
there, at most two in the output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rollout.kernels.triton_utils import round_as

# One row lives in registers: past this many bytes per row, spilling makes it slow.
_MAX_ROW_BYTES = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [num_tokens, hidden]
    residual_ptr,  # [num_tokens, hidden]; unused unless HAS_RESIDUAL
    weight_ptr,  # [hidden]
    out_ptr,  # [num_tokens, hidden]
    residual_out_ptr,  # [num_tokens, hidden]: x + residual; unused unless HAS_RESIDUAL
    x_row_stride,
    residual_row_stride,
    out_row_stride,
    residual_out_row_stride,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,  # >= hidden, a power of two
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < hidden
    dtype = x_ptr.dtype.element_ty
    h = tl.load(x_ptr + row * x_row_stride + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * residual_row_stride + offs, mask=mask, other=0.0)
        # The sum rounded to the input dtype, as the reference's ``x + residual``.
        h = round_as(h + r.to(tl.float32), dtype)
        tl.store(residual_out_ptr + row * residual_out_row_stride + offs, h.to(dtype), mask=mask)
    mean_sq = tl.sum(h * h, axis=0) / hidden
    normed = round_as(h * tl.rsqrt(mean_sq + eps), dtype)  # HF: ``h.to(input_dtype)``
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = round_as(w * normed, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_row_stride + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

def rms_norm(
    x: torch.Tensor,  # [..., hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # same shape and dtype as x
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``norm(x)``, or with ``residual``: ``(norm(x + residual), x + residual)``.

    Out of place: the inputs are left untouched. 2-D rows may be strided (the last dim
    contiguous); the outputs are contiguous, with ``x``'s shape."""
    hidden = x.shape[-1]
    assert weight.shape == (hidden,) and weight.is_contiguous(), (x.shape, weight.shape)
    if x.dim() != 2:
        res = rms_norm(x.reshape(-1, hidden), weight, eps,
                       None if residual is None else residual.reshape(-1, hidden))
        if residual is None:
            return res.view(x.shape)
        return res[0].view(x.shape), res[1].view(x.shape)
    if x.stride(-1) != 1:
        x = x.contiguous()
    block_h = triton.next_power_of_2(hidden)
    if block_h * x.element_size() > _MAX_ROW_BYTES:
        raise ValueError(f"rms_norm: hidden size {hidden} is too large for one block")
    num_tokens = x.shape[0]
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, (residual.shape, residual.dtype)
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
        residual_out = torch.empty_like(x, memory_format=torch.contiguous_format)
        residual_in = residual
    else:
        residual_in = residual_out = x  # never read nor written: HAS_RESIDUAL is False
    if num_tokens == 0:
        return out if residual is None else (out, residual_out)
    num_warps = min(max(block_h * x.element_size() // 2048, 1), 16)  # 4 warps at 4096 bf16
    _rms_norm_kernel[(num_tokens,)](
        x, residual_in, weight, out, residual_out,
        x.stride(0), residual_in.stride(0), out.stride(0), residual_out.stride(0),
        hidden, eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_H=block_h,
        num_warps=num_warps,
    )
    return out if residual is None else (out, residual_out)
