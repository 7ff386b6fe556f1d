"""trainers_integration.mismatch against hand-computed values: identical policies give
zero mismatch and weights of one, a known pair gives known numbers, padded and ragged
forms of the same tokens agree, padding is never read, the cap truncates, bad inputs are
InvalidRequestError. The inputs are exact probabilities' logs, so fp64 agrees with the
hand arithmetic to rounding (rel 1e-12); fp32 inputs only add their own rounding."""

from __future__ import annotations

import math

import pytest
import torch

from rollout.errors import InvalidRequestError
from trainers_integration.mismatch import METRIC_NAMES, mismatch_metrics, tis_weights

log = math.log
EXACT = {"rel": 1e-12, "abs": 1e-15}

# Three sampled tokens in two sequences, as probabilities (rollout p, trainer q):
#   seq 0: (0.8, 0.6), (0.25, 0.75)   ratios q/p = 0.75, 3
#   seq 1: (0.9, 0.3)                 ratio 1/3
P = [[0.8, 0.25], [0.9]]
Q = [[0.6, 0.75], [0.3]]
ROLLOUT = [[log(p) for p in row] for row in P]
TRAINER = [[log(q) for q in row] for row in Q]


def padded(rows, fill):
    return torch.tensor([row + [fill] * (2 - len(row)) for row in rows], dtype=torch.float64)


MASK = torch.tensor([[1, 1], [1, 0]])


def test_identical_inputs_give_zero_mismatch_and_unit_weights():
    lp = torch.tensor([[-0.1, -2.0, -7.5], [-0.3, -1.0, -4.0]])
    m = mismatch_metrics(lp, lp.clone())
    assert list(m) == list(METRIC_NAMES)
    for key in ("training/rollout_probs_diff_max", "training/rollout_probs_diff_mean", "training/rollout_probs_diff_std",
                "rollout_corr/kl", "rollout_corr/k3_kl", "rollout_corr/rollout_is_std",
                "rollout_corr/rollout_is_ratio_fraction_high", "rollout_corr/rollout_is_ratio_fraction_low"):
        assert m[key] == 0.0, key
    for key in ("rollout_corr/rollout_is_mean", "rollout_corr/rollout_is_max", "rollout_corr/rollout_is_min",
                "rollout_corr/rollout_is_eff_sample_size"):
        assert m[key] == 1.0, key
    assert torch.equal(tis_weights(lp, lp), torch.ones(2, 3))
    assert torch.equal(tis_weights(lp, lp, level="sequence"), torch.ones(2, 3))


def test_one_known_pair():
    # p = 0.5, q = 0.25: |q - p| = 0.25; log r = log 0.5; k1 = log p - log q = log 2;
    # k3 = r - log r - 1 = 0.5 + log 2 - 1; one token, so std 0 and ESS 1.
    m = mismatch_metrics([[log(0.5)]], [[log(0.25)]])
    assert m["training/rollout_probs_diff_max"] == pytest.approx(0.25, **EXACT)
    assert m["training/rollout_probs_diff_mean"] == pytest.approx(0.25, **EXACT)
    assert m["training/rollout_probs_diff_std"] == 0.0  # torch.std would give NaN for one token
    assert m["rollout_corr/kl"] == pytest.approx(log(2), **EXACT)
    assert m["rollout_corr/k3_kl"] == pytest.approx(0.5 + log(2) - 1, **EXACT)
    assert m["rollout_corr/rollout_is_mean"] == pytest.approx(0.5, **EXACT)
    assert m["rollout_corr/rollout_is_std"] == 0.0
    assert m["rollout_corr/rollout_is_eff_sample_size"] == pytest.approx(1.0, **EXACT)
    assert tis_weights([[log(0.5)]], [[log(0.25)]]).tolist() == [[0.5]]


def test_three_tokens_token_level():
    m = mismatch_metrics(padded(ROLLOUT, 0.0), padded(TRAINER, 0.0), MASK, tis_cap=2.0)
    diffs = [0.2, 0.5, 0.6]
    mean = sum(diffs) / 3
    assert m["training/rollout_probs_diff_max"] == pytest.approx(0.6, **EXACT)
    assert m["training/rollout_probs_diff_mean"] == pytest.approx(mean, **EXACT)
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)  # Bessel, as torch.std in verl
    assert m["training/rollout_probs_diff_std"] == pytest.approx(std, **EXACT)
    ratios = [0.75, 3.0, 1 / 3]
    assert m["rollout_corr/kl"] == pytest.approx(-sum(log(r) for r in ratios) / 3, **EXACT)
    assert m["rollout_corr/k3_kl"] == pytest.approx(sum(r - log(r) - 1 for r in ratios) / 3, **EXACT)
    # before the cap: mean, max, min of the ratios; 3 > 2 is truncated, 1/3 < 1/2 is low
    assert m["rollout_corr/rollout_is_mean"] == pytest.approx(sum(ratios) / 3, **EXACT)
    assert m["rollout_corr/rollout_is_max"] == pytest.approx(3.0, **EXACT)
    assert m["rollout_corr/rollout_is_min"] == pytest.approx(1 / 3, **EXACT)
    assert m["rollout_corr/rollout_is_ratio_fraction_high"] == pytest.approx(1 / 3, **EXACT)
    assert m["rollout_corr/rollout_is_ratio_fraction_low"] == pytest.approx(1 / 3, **EXACT)
    # std and ESS of the ratios clamped to [1/2, 2]: 0.75, 2, 0.5
    c = [0.75, 2.0, 0.5]
    m1, m2 = sum(c) / 3, sum(x * x for x in c) / 3
    assert m["rollout_corr/rollout_is_std"] == pytest.approx(math.sqrt(m2 - m1 * m1), **EXACT)
    assert m["rollout_corr/rollout_is_eff_sample_size"] == pytest.approx(m1 * m1 / m2, **EXACT)


def test_tis_weights_cap_token_and_sequence():
    w = tis_weights(padded(ROLLOUT, 0.0), padded(TRAINER, 0.0), MASK, cap=2.0)
    assert w.dtype == torch.float32 and not w.requires_grad
    assert w.flatten().tolist() == pytest.approx([0.75, 2.0, 1 / 3, 0.0])  # 3 capped at 2; padding 0
    assert tis_weights(ROLLOUT, TRAINER, cap=4.0).flatten().tolist() == pytest.approx([0.75, 3.0, 1 / 3, 0.0])
    # sequence level: seq 0 weighs 0.75 * 3 = 2.25 (capped to 2), seq 1 weighs 1/3
    seq = tis_weights(ROLLOUT, TRAINER, cap=2.0, level="sequence")
    assert seq.flatten().tolist() == pytest.approx([2.0, 2.0, 1 / 3, 0.0])
    m = mismatch_metrics(ROLLOUT, TRAINER, tis_cap=2.0, tis_level="sequence")
    assert m["rollout_corr/rollout_is_max"] == pytest.approx(2.25, **EXACT)  # before the cap
    assert m["rollout_corr/rollout_is_min"] == pytest.approx(1 / 3, **EXACT)
    assert m["rollout_corr/rollout_is_mean"] == pytest.approx((2.25 * 2 + 1 / 3) / 3, **EXACT)  # over tokens
    assert m["rollout_corr/rollout_is_ratio_fraction_high"] == 0.5  # over sequences
    assert m["rollout_corr/rollout_is_ratio_fraction_low"] == 0.5
    # the probability differences and the KLs do not depend on the level
    tok = mismatch_metrics(ROLLOUT, TRAINER, tis_cap=2.0)
    for key in METRIC_NAMES[:5]:
        assert m[key] == tok[key]


def test_a_huge_ratio_is_clamped_as_verl_does():
    m = mismatch_metrics([[-100.0]], [[0.0]])  # log r = 100: exp(20) at most
    assert m["rollout_corr/rollout_is_max"] == pytest.approx(math.exp(20.0), **EXACT)
    assert tis_weights([[-100.0]], [[0.0]], cap=3.0).tolist() == [[3.0]]


def test_padded_and_ragged_agree_and_padding_is_never_read():
    ragged = mismatch_metrics(ROLLOUT, TRAINER)
    for fill in (0.0, -1e30, 1e30, float("nan"), float("inf"), float("-inf")):
        for mask in (MASK, MASK.bool(), MASK.float()):
            assert mismatch_metrics(padded(ROLLOUT, fill), padded(TRAINER, fill), mask) == ragged
    # ragged rows as tensors, and a ragged mask that drops one token of seq 0
    as_tensors = mismatch_metrics([torch.tensor(r, dtype=torch.float64) for r in ROLLOUT],
                                  [torch.tensor(t, dtype=torch.float64) for t in TRAINER])
    assert as_tensors == ragged
    dropped = mismatch_metrics([[ROLLOUT[0][0], float("nan")], ROLLOUT[1]], TRAINER, [[1, 0], [1]])
    assert dropped == mismatch_metrics([ROLLOUT[0][:1], ROLLOUT[1]], [TRAINER[0][:1], TRAINER[1]])
    w_ragged = tis_weights(ROLLOUT, TRAINER)
    assert torch.equal(tis_weights(padded(ROLLOUT, float("nan")), padded(TRAINER, 7.0), MASK), w_ragged)
    # an empty sequence adds nothing
    assert mismatch_metrics([*ROLLOUT, []], [*TRAINER, []]) == ragged


def test_fp32_inputs_agree_within_their_rounding():
    m64 = mismatch_metrics(padded(ROLLOUT, 0.0), padded(TRAINER, 0.0), MASK)
    m32 = mismatch_metrics(padded(ROLLOUT, 0.0).float(), padded(TRAINER, 0.0).float(), MASK)
    for key in METRIC_NAMES:
        assert m32[key] == pytest.approx(m64[key], rel=1e-6, abs=1e-7), key


def test_trainer_logprobs_with_grad_are_read_without_a_graph():
    trainer = padded(TRAINER, 0.0).requires_grad_()
    m = mismatch_metrics(padded(ROLLOUT, 0.0), trainer, MASK)
    assert m == mismatch_metrics(ROLLOUT, TRAINER)
    assert not tis_weights(padded(ROLLOUT, 0.0), trainer, MASK).requires_grad
    assert trainer.grad is None


@pytest.mark.parametrize("args, kwargs, field", [
    ((torch.zeros(2, 3), torch.zeros(2, 4)), {}, "logprobs"),                      # shapes differ
    ((torch.zeros(6), torch.zeros(6)), {}, "rollout_logprobs"),                    # not [B, T]
    ((torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)), {}, "rollout_logprobs"),  # not floating
    ((torch.zeros(2, 3), [[0.0] * 3] * 2), {}, "logprobs"),                        # forms mixed
    ((torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, 2)), {}, "mask"),        # mask shape
    ((torch.zeros(2, 3), torch.zeros(2, 3), torch.full((2, 3), 0.5)), {}, "mask"),  # mask not 0/1
    ((torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3)), {}, "mask"),       # no valid token
    (([[0.0, 0.0]], [[0.0]]), {}, "sequence 0"),                                   # ragged lengths differ
    (([[0.0], [0.0]], [[0.0]]), {}, "logprobs"),                                   # sequence counts differ
    (([[0.0, 0.0]], [[0.0, 0.0]], [[1]]), {}, "sequence 0"),                       # ragged mask length
    (([[0.0]], [["x"]]), {}, "trainer_logprobs[0]"),                               # not numbers
    (([], []), {}, "mask"),                                                        # no sequence at all
    (([[]], [[]]), {}, "mask"),                                                    # no token at all
    (([[0.0, float("nan")]], [[0.0, 0.0]]), {}, "logprobs"),                       # NaN at a valid token
    ((torch.zeros(2, 3), torch.zeros(2, 3)), {"tis_cap": 0.5}, "tis cap"),         # cap under 1
    ((torch.zeros(2, 3), torch.zeros(2, 3)), {"tis_cap": float("inf")}, "tis cap"),
    ((torch.zeros(2, 3), torch.zeros(2, 3)), {"tis_level": "geometric"}, "tis level"),
])
def test_bad_inputs_are_invalid_request_errors(args, kwargs, field):
    with pytest.raises(InvalidRequestError) as info:
        mismatch_metrics(*args, **kwargs)
    assert info.value.field == field
    weight_kwargs = {{"tis_cap": "cap", "tis_level": "level"}[k]: v for k, v in kwargs.items()}
    with pytest.raises(InvalidRequestError):
        tis_weights(*args, **weight_kwargs)


def test_non_finite_error_names_the_first_bad_position():
    rollout = torch.zeros(2, 3)
    rollout[1, 2] = float("-inf")
    trainer = torch.zeros(2, 3)
    trainer[1, 0] = float("nan")
    trainer[0, 1] = float("nan")  # masked: ignored
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    with pytest.raises(InvalidRequestError, match=r"2 NaN/inf at valid tokens, first at \(row, col\) \(1, 0\)"):
        mismatch_metrics(rollout, trainer, mask)
