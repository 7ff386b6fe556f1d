"""GPU behaviour of the engine (marker gpu): each case in a fresh process, so CUDA state
(graphs, virtual memory, the caching allocator) never leaks between cases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def run_case(name: str, tmp_path_factory) -> dict:
    work = tmp_path_factory.getbasetemp() / "gpu_models"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.gpu.engine_cases", name, str(work)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_gpu_greedy_matches_cpu(tmp_path_factory):
    res = run_case("matches_cpu", tmp_path_factory)
    for name, r in res.items():
        assert r == {"graphs": True, "eager": True, "captured": True}, (name, r)


def test_sleep_returns_memory_and_keeps_addresses(tmp_path_factory):
    r = run_case("sleep_frees_memory", tmp_path_factory)
    assert r["returned_fraction_level1"] >= 0.95 and r["returned_fraction_level2"] >= 0.95, r
    assert r["same_output_level1"] and r["same_output_level2"], r
    assert r["params_ptrs_unchanged"] and r["kv_ptr_unchanged"] and r["update_changed_weights"] and r["vmm"], r


def test_shutdown_frees_everything(tmp_path_factory):
    r = run_case("shutdown_frees_everything", tmp_path_factory)
    assert r["returned_fraction"] >= 0.95 and r["graphs_dropped"] and r["addresses_freed"], r
    assert r["new_engine_same_output"], r


def test_graph_replay_after_wake_equals_eager(tmp_path_factory):
    r = run_case("graph_replay_after_wake", tmp_path_factory)
    assert all(r.values()), r


def test_wake_oom_rolls_back(tmp_path_factory):
    r = run_case("wake_oom_rollback", tmp_path_factory)
    assert r["raised"] and r["nothing_mapped"] and r["later_wake_ok"], r


def test_host_copy_allocated_in_background(tmp_path_factory):
    """Issue #19: the first sleep(1) no longer pins its host copy; pinning it from a
    background thread does not break another engine's graph capture."""
    r = run_case("host_copy_in_background", tmp_path_factory)
    assert not r["ready_after_capture"], r  # else the capture did not overlap the pinning: nothing was tested
    assert r["small_captured"] and r["small_matches_cpu"] and r["ready"] and r["host_bytes_ok"] and r["same_output"], r
    first, later = r["sleep1_s"][0], min(r["sleep1_s"][1:])
    assert first <= 2 * later + 0.02, r  # was ~25x (the pinning); the target is 1.3x (rl-cycle reports it)


def test_bf16_triton_logprobs_close_to_torch_path(tmp_path_factory):
    res = run_case("bf16_triton_vs_torch", tmp_path_factory)
    for name, r in res.items():
        assert r["n"] == r["n_ref"] > 0 and r["mean_abs"] < 2e-2, (name, r)


def test_kv_sized_by_memory_utilization_after_profile_run(tmp_path_factory):
    r = run_case("default_kv_sizing", tmp_path_factory)
    assert r["generated"] and 0.25 < r["used_fraction"] < 0.32, r


def test_moe_routes_recorded_inside_cuda_graphs(tmp_path_factory):
    r = run_case("moe_routes_in_graphs", tmp_path_factory)
    assert all(r.values()), r


def test_fp8_update_from_cuda_tensors_equals_a_checkpoint_load(tmp_path_factory):
    r = run_case("fp8_update_equals_load", tmp_path_factory)
    assert r["fp8_params"] > 0 and r["all_equal"] and r["tokens"], r
