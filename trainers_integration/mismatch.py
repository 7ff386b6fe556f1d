"""The rollout-vs-trainer mismatch probe: how far the engine's logprobs of the sampled
tokens are from the trainer's recomputation of the same tokens, and the truncated
importance-sampling (TIS) weights that correct for it.

Two calls, any framework::

    metrics = mismatch_metrics(rollout_lp, trainer_lp, mask)    # dict[str, float], verl's names
    weights = tis_weights(rollout_lp, trainer_lp, mask, cap=2.0)  # [B, T], multiply the PG loss

Inputs come in one of two forms, the same for both logprob arguments:

- padded: two floating [B, T] tensors on one device, ``mask`` None (every token valid) or a
  [B, T] tensor of bools or 0/1 on that device;
- ragged: two lists of B sequences (lists of floats or 1-D tensors), sequence i the same
  length in both; ``mask`` None or ragged with the same lengths.

The padded and ragged forms of the same tokens give the same numbers. Masked positions
(padding) are never read: they may hold anything, NaN included. The math runs in fp64
under ``torch.no_grad``; nothing here keeps a graph or touches process-wide state.

Refused with ``rollout.errors.InvalidRequestError`` before anything is computed: a mix of
the two forms, tensors of different shapes, dtypes that are not floating, devices that
differ, ragged sequences of different lengths, a mask that is not 0/1, a mask with no valid
token, a cap under 1, an unknown level, and a NaN or inf logprob at a *valid* position
(its row and column are named). A non-finite logprob of a sampled token is always a bug on
one side (the sampled token had a probability); reporting NaN metrics would let it slip
into averaged dashboards, so the probe refuses instead.

Names and definitions follow verl (volcengine/verl at commit
b178a3cd56f58b2d502255daba591e92833930a7); learned from, not copied:

- ``training/rollout_probs_diff_max`` / ``_mean`` / ``_std``: |exp(trainer) - exp(rollout)|
  over the valid tokens (verl/utils/debug/metrics.py, ``calculate_debug_metrics``; std is
  torch.std's, with Bessel's correction, and 0.0 for a single token where torch.std gives NaN).
- ``rollout_corr/kl`` and ``rollout_corr/k3_kl``: the k1 and k3 estimates of
  KL(rollout || trainer) on the rollout's samples, k3 = r - log r - 1 with
  r = pi_trainer / pi_rollout (verl/trainer/ppo/rollout_corr_helper.py,
  ``compute_offpolicy_metrics``, which adds the ``rollout_corr/`` prefix).
- ``rollout_corr/rollout_is_*``: the IS ratio r before the cap (log r clamped to +-20 as
  verl's SAFETY_BOUND), ``_mean`` / ``_max`` / ``_min``; ``_ratio_fraction_high``: the
  fraction above the cap, i.e. the fraction TIS truncates; ``_ratio_fraction_low``: below
  1 / cap; ``_std`` and ``_eff_sample_size`` (E[w]^2 / E[w^2], in (0, 1]) of r clamped to
  [1 / cap, cap] (rollout_corr_helper.py, ``compute_rollout_correction_weights`` and
  ``compute_is_metrics``; verl adds 1e-8 to the ESS denominator, not needed here since
  E[w] >= 1 / cap). ``level="sequence"`` is verl's sequence-level IS: one weight per
  sequence, exp of the sum of its tokens' log ratios; max, min and the fractions are over
  sequences (those with a valid token), mean, std and ESS over tokens, as verl.

The prefixes are verl's own (``training/`` for the debug metrics, ``rollout_corr/`` for the
correction ones), so a dashboard built for verl reads these as they are; to log them under
another namespace, rename the keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

from rollout.errors import InvalidRequestError

SAFETY_BOUND = 20.0  # |log r| clamp before exp, as verl's rollout_corr_helper.SAFETY_BOUND
TIS_LEVELS = ("token", "sequence")

Logprobs = Union[torch.Tensor, Sequence[Union[Sequence[float], torch.Tensor]]]
Mask = Union[torch.Tensor, Sequence[Union[Sequence[float], torch.Tensor]], None]


@torch.no_grad()
def mismatch_metrics(
    rollout_logprobs: Logprobs, trainer_logprobs: Logprobs, mask: Mask = None, *,
    tis_cap: float = 2.0, tis_level: str = "token",
) -> dict[str, float]:
    """verl's rollout-vs-trainer metrics over the valid tokens (see the module docstring for
    each name and the accepted inputs): the probability differences, the k1/k3 KL of the
    rollout policy from the trainer's, and the TIS ratio statistics for ``tis_cap`` and
    ``tis_level`` ("token" or "sequence"). One host sync."""
    _check_tis(tis_cap, tis_level)
    rollout, trainer, valid = _as_padded(rollout_logprobs, trainer_logprobs, mask)
    vf = valid.double()                                # [B, T], 1.0 on valid tokens
    n = vf.sum()
    diff = (trainer.exp() - rollout.exp()).abs()       # [B, T], 0 on padding (both zeroed)
    diff_mean = diff.sum() / n
    diff_var = (((diff - diff_mean) ** 2) * vf).sum() / (n - 1).clamp(min=1)
    log_ratio = trainer - rollout                      # log r, r = pi_trainer / pi_rollout; 0 on padding
    k3 = (log_ratio.exp() - log_ratio - 1).sum() / n   # each term >= 0, 0 on padding

    log_w, unit_log_w, unit_valid = _log_weights(log_ratio, valid, tis_level)
    w = log_w.exp()                                    # [B, T] r before the cap
    unit_w = unit_log_w.exp()                          # [U] per token or per sequence
    num_units = unit_valid.double().sum()
    clamped = w.clamp(1.0 / tis_cap, tis_cap)
    m1 = (clamped * vf).sum() / n
    m2 = (clamped.square() * vf).sum() / n
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=w.device)
    values = torch.stack([
        diff.max(),
        diff_mean,
        torch.where(n > 1, diff_var.sqrt(), 0.0),
        -(log_ratio.sum() / n),
        k3,
        (w * vf).sum() / n,
        torch.where(unit_valid, unit_w, -inf).max(),
        torch.where(unit_valid, unit_w, inf).min(),
        torch.where(n > 1, (m2 - m1.square()).clamp(min=0.0).sqrt(), 0.0),
        ((unit_w > tis_cap) & unit_valid).double().sum() / num_units,
        ((unit_w < 1.0 / tis_cap) & unit_valid).double().sum() / num_units,
        m1.square() / m2,
    ]).tolist()
    return dict(zip(METRIC_NAMES, values, strict=True))


METRIC_NAMES = (
    "training/rollout_probs_diff_max",
    "training/rollout_probs_diff_mean",
    "training/rollout_probs_diff_std",
    "rollout_corr/kl",
    "rollout_corr/k3_kl",
    "rollout_corr/rollout_is_mean",
    "rollout_corr/rollout_is_max",
    "rollout_corr/rollout_is_min",
    "rollout_corr/rollout_is_std",
    "rollout_corr/rollout_is_ratio_fraction_high",
    "rollout_corr/rollout_is_ratio_fraction_low",
    "rollout_corr/rollout_is_eff_sample_size",
)


@torch.no_grad()
def tis_weights(
    rollout_logprobs: Logprobs, trainer_logprobs: Logprobs, mask: Mask = None, *,
    cap: float = 2.0, level: str = "token",
) -> torch.Tensor:
    """Truncated importance-sampling weights, ``min(pi_trainer / pi_rollout, cap)``: per token
    (``level="token"``, the fix of "Your efficient RL framework secretly brings you off-policy
    RL training"; verl's ``rollout_is="token"``) or one per sequence, the product of its
    tokens' ratios (``"sequence"``). Returns a detached [B, T] fp32 tensor on the inputs'
    device (T the longest sequence for ragged input), 0.0 at masked positions: multiply the
    per-token policy-gradient loss by it."""
    _check_tis(cap, level)
    rollout, trainer, valid = _as_padded(rollout_logprobs, trainer_logprobs, mask)
    log_w, _, _ = _log_weights(trainer - rollout, valid, level)
    return torch.where(valid, log_w.exp().clamp(max=cap), 0.0).float()


def _log_weights(log_ratio: torch.Tensor, valid: torch.Tensor, level: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log r per token ([B, T], clamped to +-SAFETY_BOUND) and per unit of ``level`` (token:
    [B * T] with their validity; sequence: [B], valid when the sequence has a valid token).
    ``log_ratio`` is 0 at masked positions, so a sequence's sum covers its valid tokens."""
    if level == "token":
        log_w = log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND)
        return log_w, log_w.reshape(-1), valid.reshape(-1)
    seq = log_ratio.sum(dim=-1).clamp(-SAFETY_BOUND, SAFETY_BOUND)  # [B]
    return seq[:, None].expand_as(log_ratio), seq, valid.any(dim=-1)


def _check_tis(cap: float, level: str) -> None:
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 1.0 <= cap < float("inf"):
        raise InvalidRequestError("tis cap", cap, "a finite number >= 1 (1: no correction above the rollout's ratio)")
    if level not in TIS_LEVELS:
        raise InvalidRequestError("tis level", level, f"one of {TIS_LEVELS}")


def _as_padded(rollout: Logprobs, trainer: Logprobs, mask: Mask
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both forms -> (rollout, trainer, valid): [B, T] fp64 with 0.0 at masked positions and
    the [B, T] bool mask, after every check of the module docstring."""
    if isinstance(rollout, torch.Tensor) and isinstance(trainer, torch.Tensor):
        valid = _padded_mask(rollout, trainer, mask)
    elif _is_ragged(rollout) and _is_ragged(trainer):
        rollout, trainer, valid = _from_ragged(rollout, trainer, mask)
    else:
        kinds = f"<{type(rollout).__name__}, {type(trainer).__name__}>"
        raise InvalidRequestError("logprobs", kinds, "two [B, T] tensors or two lists of per-sequence logprobs")
    num_valid, num_bad, first_bad = _count(rollout, trainer, valid)
    if num_valid == 0:
        raise InvalidRequestError("mask", f"<{tuple(valid.shape)}, no valid token>", "at least one valid token")
    if num_bad:
        raise InvalidRequestError("logprobs", f"<{num_bad} NaN/inf at valid tokens, first at (row, col) {first_bad}>",
                                  "finite logprobs wherever the mask is set (padding may hold anything)")
    rollout = torch.where(valid, rollout.double(), 0.0)
    trainer = torch.where(valid, trainer.double(), 0.0)
    return rollout, trainer, valid


def _padded_mask(rollout: torch.Tensor, trainer: torch.Tensor, mask: Mask) -> torch.Tensor:
    for name, t in (("rollout_logprobs", rollout), ("trainer_logprobs", trainer)):
        if not t.is_floating_point() or t.dim() != 2:
            raise InvalidRequestError(name, f"<{t.dtype}, {tuple(t.shape)}>", "a floating [B, T] tensor")
    if rollout.shape != trainer.shape or rollout.device != trainer.device:
        shown = f"<rollout {tuple(rollout.shape)} on {rollout.device}, trainer {tuple(trainer.shape)} on {trainer.device}>"
        raise InvalidRequestError("logprobs", shown, "the same [B, T] shape on the same device")
    if mask is None:
        return torch.ones(rollout.shape, dtype=torch.bool, device=rollout.device)
    if not isinstance(mask, torch.Tensor) or mask.shape != rollout.shape or mask.device != rollout.device:
        shown = f"<{type(mask).__name__} {tuple(getattr(mask, 'shape', ()))} on {getattr(mask, 'device', None)}>"
        raise InvalidRequestError("mask", shown, f"None or a {tuple(rollout.shape)} tensor on {rollout.device}")
    return _bool_mask(mask)


def _bool_mask(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise InvalidRequestError("mask", f"<{mask.dtype} with values other than 0 and 1>", "bools or 0/1")
    return mask != 0


def _is_ragged(x: object) -> bool:
    return isinstance(x, (list, tuple))


def _from_ragged(rollout: Sequence, trainer: Sequence, mask: Mask
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if len(rollout) != len(trainer):
        raise InvalidRequestError("logprobs", f"<{len(rollout)} rollout, {len(trainer)} trainer sequences>",
                                  "as many trainer sequences as rollout ones")
    if mask is not None and (not _is_ragged(mask) or len(mask) != len(rollout)):
        raise InvalidRequestError("mask", f"<{type(mask).__name__}>", f"None or a list of {len(rollout)} per-sequence masks")
    device = next((row.device for row in (*rollout, *trainer) if isinstance(row, torch.Tensor)), torch.device("cpu"))
    r_rows = _rows("rollout_logprobs", rollout, device)
    t_rows = _rows("trainer_logprobs", trainer, device)
    m_rows = None if mask is None else _rows("mask", mask, device)
    for i, (r, t) in enumerate(zip(r_rows, t_rows)):
        if len(r) != len(t) or (m_rows is not None and len(m_rows[i]) != len(r)):
            lens = (len(r), len(t)) if m_rows is None else (len(r), len(t), len(m_rows[i]))
            raise InvalidRequestError(f"sequence {i}", f"<lengths {lens}>", "the same length in every argument")
    pad = torch.nn.utils.rnn.pad_sequence
    if not r_rows:
        empty = torch.zeros(0, 0, dtype=torch.float64, device=device)
        return empty, empty, empty.bool()
    ones = [torch.ones(len(r), dtype=torch.bool, device=device) for r in r_rows]
    valid = pad(ones, batch_first=True, padding_value=False)
    if m_rows is not None:
        valid &= _bool_mask(pad(m_rows, batch_first=True))
    return pad(r_rows, batch_first=True), pad(t_rows, batch_first=True), valid


def _rows(name: str, seqs: Sequence, device: torch.device) -> list[torch.Tensor]:
    rows = []
    for i, seq in enumerate(seqs):
        try:
            row = torch.as_tensor(seq, dtype=torch.float64, device=device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise InvalidRequestError(f"{name}[{i}]", f"<{type(seq).__name__}>", "a list of numbers or a 1-D tensor",
                                      str(e)) from None
        if row.dim() != 1:
            raise InvalidRequestError(f"{name}[{i}]", f"<shape {tuple(row.shape)}>", "a list of numbers or a 1-D tensor")
        rows.append(row)
    return rows


def _count(rollout: torch.Tensor, trainer: torch.Tensor, valid: torch.Tensor) -> tuple[int, int, tuple[int, int] | None]:
    """Valid tokens, non-finite logprobs among them and the first one's (row, col): one sync."""
    bad = valid & ~(rollout.isfinite() & trainer.isfinite())
    flat = bad.reshape(-1)
    first = flat.int().argmax() if flat.numel() else torch.zeros((), dtype=torch.long, device=flat.device)
    num_valid, num_bad, first_idx = torch.stack([valid.sum(), bad.sum(), first.long()]).tolist()
    return num_valid, num_bad, (divmod(first_idx, valid.shape[1]) if num_bad else None)
