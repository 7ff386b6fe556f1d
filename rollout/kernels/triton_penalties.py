"""Repetition, presence and frequency penalties, Triton. Reference: ``penalties.apply_penalties_ref``.

One program per (penalised row, vocab block): it reads the row's logits, its output counts
and prompt mask for that block and writes the penalised logits back in place. Rows without
penalties get no program. Compiled without fused multiply-add, so every operation rounds
where the reference's does and the result is bitwise the reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_V = 1024


@triton.jit(do_not_specialize=["m", "vocab"])
def _apply_penalties_kernel(
    logits_ptr,  # [num_reqs, vocab] fp32, in place
    idx_ptr,  # [m] int64: rows of logits
    rows_ptr,  # [m] int64: rows of the history tables
    values_ptr,  # [3, m] fp32: repetition, presence, frequency
    counts_ptr,  # [max_rows, vocab] int32
    prompt_mask_ptr,  # [max_rows, vocab] bool
    logits_row_stride,
    counts_row_stride,
    mask_row_stride,
    m,
    vocab,
    BLOCK_V: tl.constexpr,
):
    j = tl.program_id(0)
    i = tl.load(idx_ptr + j)
    r = tl.load(rows_ptr + j)
    rep = tl.load(values_ptr + j)
    pres = tl.load(values_ptr + m + j)
    freq = tl.load(values_ptr + 2 * m + j)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = offs < vocab
    x = tl.load(logits_ptr + i * logits_row_stride + offs, mask=ok, other=0.0)
    c = tl.load(counts_ptr + r * counts_row_stride + offs, mask=ok, other=0)
    in_prompt = tl.load(prompt_mask_ptr + r * mask_row_stride + offs, mask=ok, other=0) != 0
    in_output = c > 0
    x = tl.where(in_output | in_prompt, tl.where(x > 0, x / rep, x * rep), x)
    x = x - freq * c.to(tl.float32)
    x = x - pres * in_output.to(tl.float32)
    tl.store(logits_ptr + i * logits_row_stride + offs, x, mask=ok)


def apply_penalties(
    logits: torch.Tensor,  # [num_reqs, vocab] fp32, changed in place
    idx: torch.Tensor,  # [m] int64
    rows: torch.Tensor,  # [m] int64
    values: torch.Tensor,  # [3, m] fp32
    output_counts: torch.Tensor,  # [max_rows, vocab] int32
    prompt_mask: torch.Tensor,  # [max_rows, vocab] bool
) -> None:
    """Same contract as ``apply_penalties_ref``: rows ``idx`` of ``logits`` penalised in place."""
    m = idx.shape[0]
    vocab = logits.shape[1]
    assert logits.dtype == torch.float32 and logits.stride(1) == 1, (logits.dtype, logits.stride())
    assert output_counts.dtype == torch.int32 and prompt_mask.dtype == torch.bool
    assert output_counts.shape[1] == vocab and prompt_mask.shape[1] == vocab
    if m == 0:
        return
    _apply_penalties_kernel[(m, triton.cdiv(vocab, _BLOCK_V))](
        logits, idx.contiguous(), rows.contiguous(), values.contiguous(), output_counts, prompt_mask,
        logits.stride(0), output_counts.stride(0), prompt_mask.stride(0), m, vocab,
        BLOCK_V=_BLOCK_V, num_warps=4, enable_fp_fusion=False,
    )
