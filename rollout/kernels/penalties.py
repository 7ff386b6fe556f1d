"""Repetition, presence and frequency penalties on fp32 logits (vLLM's semantics), torch reference.

For a penalised row ``i`` (its state in row ``r`` of the history tables):

* ``repetition`` (> 0, 1 = off): every token seen in the prompt or the output so far has
  its logit divided by it when positive, multiplied by it otherwise (once per token, as
  HF's ``RepetitionPenaltyLogitsProcessor``);
* ``frequency``: ``frequency * count`` subtracted, ``count`` the token's output occurrences;
* ``presence``: subtracted once from every token that occurs in the output.

In that order, each an fp32 operation of its own (two roundings for ``l - f * c``, no fused
multiply-add), so ``triton_penalties.apply_penalties`` gives the same bits.
"""

from __future__ import annotations

import torch


def apply_penalties_ref(
    logits: torch.Tensor,  # [num_reqs, vocab] fp32, changed in place
    idx: torch.Tensor,  # [m] int64: the penalised rows of ``logits``
    rows: torch.Tensor,  # [m] int64: their rows in ``output_counts`` / ``prompt_mask``
    values: torch.Tensor,  # [3, m] fp32: repetition, presence, frequency penalty
    output_counts: torch.Tensor,  # [max_rows, vocab] int32: occurrences in the output so far
    prompt_mask: torch.Tensor,  # [max_rows, vocab] bool: occurs in the prompt
) -> None:
    """Penalise rows ``idx`` of ``logits`` in place; other rows are not read or written."""
    counts = output_counts[rows]  # [m, vocab] int32
    in_output = counts > 0
    seen = in_output | prompt_mask[rows]  # [m, vocab] bool
    rep, pres, freq = (v[:, None] for v in values)  # [m, 1] each
    x = logits[idx]  # [m, vocab]
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - freq * counts.float()
    x = x - pres * in_output.float()
    logits[idx] = x
