"""rollout-bench under tensor parallelism on CPU: decode-step at TP=2 as two torchrun
processes over gloo (as the GPU session runs it on two GPUs), the per-rank roofline stats,
and the workloads that refuse torchrun."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from rollout.bench import cli, roofline
from rollout.bench.common import ROOT
from rollout.bench.configs import hf_config
from rollout.distributed.parallel_state import ParallelState
from rollout.models.loader import build_model

TIMEOUT_S = 180  # the whole torchrun job; a stuck collective fails the test instead of hanging it


def _shard_stats(k: int) -> tuple[roofline.ModelStats, int]:
    """Stats of rank 0's shard of "tiny" over k ranks, and the shard's norm parameters. Built
    without a world: constructing the layers makes no collective (a placeholder group)."""
    cfg = hf_config("tiny")
    parallel = ParallelState(k, tp_group=object() if k > 1 else None)
    model = build_model(cfg, torch.float32, torch.device("cpu"), parallel=parallel)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    return roofline.ModelStats.from_model(model, cfg, tensor_parallel_size=k), norms


def test_roofline_stats_are_one_ranks_shard():
    (one, norms), (two, _), (four, _) = _shard_stats(1), _shard_stats(2), _shard_stats(4)
    assert one.tensor_parallel_size == 1 and one.heads == 4 and one.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    # K=2: every linear layer and the vocab rows halve, the norms are replicated whole.
    assert two.matmul_params == (one.matmul_params - norms) // 2 + norms
    assert two.weight_bytes == two.matmul_params * 4 and two.lm_head_params * 2 == one.lm_head_params
    assert two.heads == 2 and two.kv_bytes_per_token * 2 == one.kv_bytes_per_token
    assert two.vocab == one.vocab  # the logits are gathered whole on every rank
    # K=4 > 2 kv heads: each rank holds one kv head, replicated, so its KV is K=2's and its
    # weights more than a quarter.
    assert four.heads == 1 and four.kv_bytes_per_token == two.kv_bytes_per_token
    assert four.matmul_params > (one.matmul_params - norms) // 4 + norms
    # The step formula is unchanged; with per-rank stats it is one GPU's step.
    cost = roofline.decode_step(two, batch=2, total_context=30)
    assert cost.bytes == two.weight_bytes + two.kv_bytes_per_token * 32 + 2 * two.vocab * two.itemsize


def test_only_decode_step_runs_tensor_parallel(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):  # K=2 needs torchrun
        cli.parse_args(["decode-step", "--tensor-parallel-size", "2"])
    with pytest.raises(SystemExit):
        cli.parse_args(["nano-bench", "--tensor-parallel-size", "2"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):  # under torchrun, even at K=1
        cli.parse_args(["rl-cycle"])
    assert cli.parse_args(["decode-step", "--tensor-parallel-size", "2"])[1].tensor_parallel_size == 2


def test_decode_step_tensor_parallel_under_torchrun(tmp_path):
    out = tmp_path / "tp2.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "rollout.bench.cli", "decode-step", "--model", "tiny", "--device", "cpu", "--tensor-parallel-size", "2",
           "--scale", "0.01", "--batches", "1,256", "--kv-cache-gb", "0.01", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if sys.platform == "linux":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    # Its own session, so a timeout kills torchrun's workers too, not only torchrun.
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    # Rank 0 alone prints the table and writes the JSON.
    assert stdout.count("== decode-step (tiny, cpu, TP=2 of 2 ranks) ==") == 1, stdout
    assert stdout.count("saved ") == 1, stdout
    assert [p.name for p in tmp_path.iterdir()] == ["tp2.json"]
    rec = json.loads(out.read_text())
    assert rec["tensor_parallel_size"] == rec["options"]["tensor_parallel_size"] == 2
    assert rec["world_size"] == rec["env"]["world_size"] == 2
    assert [r["batch"] for r in rec["rows"]] == [1, 3]
    for r in rec["rows"]:
        assert math.isfinite(r["step_ms"]) and r["step_ms"] > 0 and math.isfinite(r["roofline_ms"])
        assert r["steady"] is True  # on both ranks: B tokens per step, no preemption
        assert len(r["step_ms_by_rank"]) == 2 and r["step_ms_by_rank"][0] == r["step_ms"]
    stats = rec["model_stats"]  # the roofline is one rank's: half the heads and KV of tiny
    assert stats["tensor_parallel_size"] == 2 and stats["heads"] == 2
    assert stats["kv_bytes_per_token"] == 2 * 2 * 1 * 16 * 4  # layers, K and V, kv heads, head_dim, fp32 (cpu)
