"""The trainer's side of the sampled tokens: its logprobs of each completion, and the
rollout-vs-trainer mismatch of a step (``MismatchMeter``, over the library's
``trainers_integration.mismatch``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainers_integration.exact import ExactForward
from trainers_integration.mismatch import mismatch_metrics


def sequence_logprobs(model, seqs: list[tuple[list[int], list[int]]], micro_batch: int, grad: bool,
                      hidden: bool = False, exact: ExactForward | None = None):
    """Per sequence, the trainer's logprobs (temperature 1) of its completion tokens:
    ``seqs`` holds (prompt_ids, completion_ids). Yields (first index, [B, T] logprobs, [B, T]
    mask) per micro-batch, T the longest completion of the micro-batch; with ``hidden``
    also the [B, T, H] last hidden states at the positions that predicted each token (what
    a value head reads). With ``exact`` (an ``ExactForward`` of ``model``) the logprobs come
    from rollout's batch-invariant forward over the model's weights: bitwise the logprobs of
    an engine built with ``batch_invariant=True``."""
    device = next(model.parameters()).device
    for lo in range(0, len(seqs), micro_batch):
        chunk = seqs[lo : lo + micro_batch]
        if exact is not None:
            if hidden:
                raise ValueError("hidden states are not available from the exact forward")
            with torch.set_grad_enabled(grad):
                lps = exact.token_logprobs(dict(model.named_parameters()), [p + c for p, c in chunk],
                                           [len(p) for p, _ in chunk])
            num_c = max(len(c) for _, c in chunk)
            mask = torch.zeros(len(chunk), num_c, device=device)
            for i, (_, c) in enumerate(chunk):
                mask[i, : len(c)] = 1
            yield lo, torch.stack([F.pad(lp, (0, num_c - lp.shape[0])) for lp in lps]), mask
            continue
        lens = [len(p) + len(c) for p, c in chunk]
        width = max(lens)
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
        attn = torch.zeros_like(ids)
        for i, (p, c) in enumerate(chunk):
            ids[i, : lens[i]] = torch.tensor(p + c)
            attn[i, : lens[i]] = 1
        with torch.set_grad_enabled(grad):
            out = model(input_ids=ids, attention_mask=attn, output_hidden_states=hidden)
            logits = out.logits.float()  # [B, L, V]
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        num_c = max(len(c) for _, c in chunk)
        mask = torch.zeros(len(chunk), num_c, device=device)
        rows, states = [], []
        for i, (p, c) in enumerate(chunk):
            # logits at position j predict token j + 1: completion token k sits at len(p) + k.
            sl = slice(len(p) - 1, len(p) - 1 + len(c))
            rows.append(torch.nn.functional.pad(logp[i, sl], (0, num_c - len(c))))
            if hidden:
                h = out.hidden_states[-1][i, sl]
                states.append(torch.nn.functional.pad(h, (0, 0, 0, num_c - len(c))))
            mask[i, : len(c)] = 1
        if hidden:
            yield lo, torch.stack(rows), mask, torch.stack(states)
        else:
            yield lo, torch.stack(rows), mask


def padded(rows: list[list[float]], width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``rows`` right-padded with zeros to ``width``: [len(rows), width] fp32 on ``device``."""
    return torch.tensor([r + [0.0] * (width - len(r)) for r in rows], dtype=torch.float32, device=device)


class MismatchMeter:
    """One step's micro-batches of (trainer logprobs, rollout logprobs, mask), each [b, t],
    measured together by ``trainers_integration.mismatch.mismatch_metrics`` (verl's
    ``training/rollout_probs_diff_*`` and ``rollout_corr/*``), plus
    ``training/rollout_k3_kl``: the examples' name for verl's ``rollout_corr/k3_kl``."""

    def __init__(self) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, trainer_lp: torch.Tensor, rollout_lp: torch.Tensor, mask: torch.Tensor) -> None:
        self.parts.append((trainer_lp.detach(), rollout_lp.detach(), mask.detach()))

    def metrics(self) -> dict[str, float]:
        width = max(lp.shape[1] for lp, _, _ in self.parts)
        trainer, rollout, mask = (torch.cat([F.pad(part[i], (0, width - part[i].shape[1])) for part in self.parts])
                                  for i in range(3))
        m = mismatch_metrics(rollout, trainer, mask)
        m["training/rollout_k3_kl"] = m["rollout_corr/k3_kl"]
        return m
