"""Helpers shared by the Triton kernels (device functions only)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_as(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (bf16 or fp16; nearest, ties to even), kept in fp32.

    The torch references round intermediates to the activation dtype (``h.to(dtype)``,
    bf16 products). Written as ``x.to(dtype).to(tl.float32)``, the compiler folds that
    round trip away and fuses products into FMAs; done here with integer ops on the bits
    (and an exact add below fp16's normal range), it cannot. NaN payloads are not kept."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    elif dtype == tl.float16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0xFFF + ((bits >> 13) & 1)) >> 13) << 13
        normal = bits.to(tl.float32, bitcast=True)
        # Subnormal fp16 values are multiples of 2**-24: adding +-0.5 (whose fp32 spacing is
        # 2**-24) rounds there, ties to even, and subtracting it back is exact.
        half = tl.where(x < 0, -0.5, 0.5)
        subnormal = (x + half) - half
        x = tl.where(tl.abs(x) < 6.103515625e-05, subnormal, normal)
        inf = tl.where(x < 0, float("-inf"), float("inf"))
        x = tl.where(tl.abs(x) > 65504.0, inf, x)  # rounded past fp16's max
    return x
