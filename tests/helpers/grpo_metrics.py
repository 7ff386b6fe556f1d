"""The checks both GRPO example smoke tests (torchrun and Ray) make on the ``METRICS``
lines of a two-step run with two data-parallel ranks."""

from __future__ import annotations

import json
import math

TOLERANCE = 1e-3  # engine vs trainer logprobs, both fp32 on CPU (seen: ~1e-5)


def metrics_lines(stdout: str) -> list[dict]:
    return [json.loads(line.split("METRICS ", 1)[1]) for line in stdout.splitlines() if line.startswith("METRICS ")]


def check_two_steps(steps: list[dict], log: str) -> None:
    assert [m["step"] for m in steps] == [0, 1], log[-3000:]
    for m in steps:
        assert m["dp_size"] == 2
        assert math.isfinite(m["loss"])
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
    assert steps[-1]["check/weights_delta"] > 0  # the optimizer actually moved the weights
