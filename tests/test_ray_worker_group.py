"""trainers_integration.ray: a WorkerGroup of two CPU ranks (gloo) on a local Ray cluster
that this module starts on loopback and stops at the end. The workers
(``tests/helpers/ray_workers.py``) each hold a tiny engine; every group call has a
timeout, so a stuck rank fails a test instead of hanging it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import pytest

from rollout.errors import InvalidRequestError
from tests.helpers.engine_state import PROMPTS, greedy, make_llm
from tests.helpers.ray_cluster import ROOT, WORKER_ENV, start_local_ray
from tests.helpers.ray_workers import EngineWorker, as_plain
from trainers_integration.ray import (
    WorkerDiedError,
    WorkerError,
    WorkerGroup,
    WorkerGroupConfig,
    WorkerGroupError,
    WorkerTimeoutError,
    one_per_replica,
    rank_shares,
)

SPLIT_PROMPTS = PROMPTS + [[11, 12, 13, 14], [200, 201], [7, 8, 9]]  # 5 prompts: shares of 3 and 2
FAST = {"env_vars": WORKER_ENV, "setup_timeout_s": 120.0, "call_timeout_s": 60.0, "failure_grace_s": 2.0,
        "collective_timeout_s": 60.0}


def _config(**overrides) -> WorkerGroupConfig:
    return WorkerGroupConfig(**{"num_workers": 2, **FAST, **overrides})


def _tokens(outs: list[dict]) -> list[list[int]]:
    return [o["token_ids"] for o in outs]


def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def ray_cluster():
    if importlib.util.find_spec("ray") is None:
        pytest.fail("ray is not installed: pip install 'rollout[ray]'")
    ray = start_local_ray(num_cpus=8)  # logical slots: the module's groups of two overlap
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def group(ray_cluster, a_dir):
    with WorkerGroup(_config(), EngineWorker, args=(str(a_dir),)) as g:
        yield g


# ---- no cluster needed ----------------------------------------------------------------------
def test_shares_respect_tensor_parallel_groups():
    assert rank_shares(5, 2, 1) == [(0, 3), (3, 5)]
    assert rank_shares(5, 4, 2) == [(0, 3), (0, 3), (3, 5), (3, 5)]  # ranks of a TP group share
    assert rank_shares(1, 4, 1) == [(0, 1), (1, 1), (1, 1), (1, 1)]  # empty shares still called
    assert one_per_replica(["r0", "r1", "r2", "r3"], 2) == ["r0", "r2"]
    with pytest.raises(ValueError, match="does not divide"):
        WorkerGroupConfig(num_workers=3, tensor_parallel_size=2)


def test_ray_is_imported_lazily(monkeypatch):
    code = "import sys, trainers_integration, trainers_integration.ray; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ImportError, match=r"rollout\[ray\]"):
        WorkerGroup(_config(), EngineWorker)


# ---- one group of two ranks, shared -------------------------------------------------------------
@pytest.mark.slow
def test_group_is_one_gloo_world_on_loopback(group):
    infos = group.call("info")
    assert [i["rank"] for i in infos] == [0, 1] and {i["world"] for i in infos} == {2}
    assert {i["backend"] for i in infos} == {"gloo"} and {i["rank_sum"] for i in infos} == {1}  # an all-reduce
    assert [i["RANK"] for i in infos] == ["0", "1"] and [i["LOCAL_RANK"] for i in infos] == ["0", "1"]
    assert {i["MASTER_ADDR"] for i in infos} == {"127.0.0.1"}
    if sys.platform == "linux":
        assert {i["GLOO_SOCKET_IFNAME"] for i in infos} == {"lo"}
    assert {i["OMP_NUM_THREADS"] for i in infos} == {"1"}  # the config's env_vars
    assert len({i["pid"] for i in infos}) == 2


@pytest.mark.slow
def test_split_generate_returns_outputs_in_prompt_order(group, a_dir):
    want = as_plain(greedy(make_llm(a_dir), SPLIT_PROMPTS))
    got = group.split("generate", SPLIT_PROMPTS)
    assert _tokens(got) == _tokens(want)
    for g, w in zip(got, want):
        assert g["logprobs"] == pytest.approx(w["logprobs"], abs=1e-4)
    seen = group.call("seen_prompts")
    assert seen[0][-1] == SPLIT_PROMPTS[:3] and seen[1][-1] == SPLIT_PROMPTS[3:]  # each rank its own share


@pytest.mark.slow
def test_error_on_one_rank_reaches_the_driver_naming_it(group):
    with pytest.raises(WorkerError) as e:
        group.call("fail_on", 1)
    assert e.value.rank == 1 and e.value.exc_type == "ValueError" and e.value.method == "fail_on()"
    assert "rank 1 raised ValueError" in str(e.value) and "planned failure on rank 1" in str(e.value)
    assert "in fail_on" in e.value.remote_traceback  # the worker's own traceback
    assert not group.is_broken and group.call("fail_on", 5) == [0, 1]  # the others finished: still usable
    # Only plain data crosses: a tensor result is refused on the rank, a tensor argument at the driver.
    with pytest.raises(WorkerError, match="torch.Tensor") as e:
        group.call("tensor")
    assert e.value.rank == 0 and e.value.exc_type == "InvalidRequestError"
    import torch

    with pytest.raises(InvalidRequestError, match=r"generate\(\) arguments\[0\]\[0\]=.*torch.Tensor"):
        group.split("generate", [torch.tensor([1, 2])])
    with pytest.raises(InvalidRequestError, match="invalid method='nope'"):
        group.call("nope")


@pytest.mark.slow
def test_each_rank_refuses_what_the_driver_would(group, ray_cluster):
    """Calls straight to the rank actors, past the driver's own checks: each rank refuses
    names outside its allowlist and arguments that are not plain data, before running
    anything, and stays usable."""
    actor = group._actors[0]
    seen = group.call("seen_prompts")
    bad_calls = [
        ("__class__", (), {}), ("__init__", ("x",), {}), ("_private", (), {}), ("llm", (), {}),
        ("rank", (), {}), ("nope", (), {}), (b"info", (), {}),
        ("fail_on", (object(),), {}), ("fail_on", ([[[0]]] * 1,), {"rank": {1: 2}}),
        ("generate", (_nested(40),), {}), ("fail_on", "not a tuple", {}),
    ]
    for method, args, kwargs in bad_calls:
        ok, err = ray_cluster.get(actor.call.remote(method, args, kwargs), timeout=30)
        assert not ok and err["type"] == "InvalidRequestError", (method, err)
    assert group.call("seen_prompts") == seen  # nothing ran: generate() never saw its bad argument
    assert group.call("fail_on", 5) == [0, 1]


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.slow
def test_weight_update_through_the_group_changes_both_ranks(group, b_dir, a_out, b_out):
    assert [_tokens(r) for r in group.call("greedy", PROMPTS)] == [_tokens(as_plain(a_out))] * 2
    synced = group.call("sync_from", str(b_dir), 7)  # each rank loads its trainer and syncs in-process
    assert all(s["num_tensors"] > 0 and s["weight_version"] == 7 and s["asleep"] for s in synced)
    after = group.call("greedy", PROMPTS)
    assert [_tokens(r) for r in after] == [_tokens(as_plain(b_out))] * 2
    assert _tokens(as_plain(b_out)) != _tokens(as_plain(a_out))


# ---- groups of their own --------------------------------------------------------------------
@pytest.mark.slow
def test_tensor_parallel_group_is_one_replica(ray_cluster, a_dir):
    with WorkerGroup(_config(tensor_parallel_size=2), EngineWorker, args=(str(a_dir),),
                     kwargs={"tensor_parallel_size": 2}) as g:
        assert g.dp_size == 1
        got = g.split("generate", SPLIT_PROMPTS)
        assert [s[-1] for s in g.call("seen_prompts")] == [SPLIT_PROMPTS] * 2  # both TP ranks: all prompts
    assert _tokens(got) == _tokens(as_plain(greedy(make_llm(a_dir), SPLIT_PROMPTS)))


def test_shutdown_closes_each_worker_before_the_world(ray_cluster, a_dir, tmp_path):
    marker = tmp_path / "closed"
    with WorkerGroup(_config(), EngineWorker, args=(str(a_dir),), kwargs={"closed_marker": str(marker)}) as g:
        assert len(g.call("seen_prompts")) == 2
    for rank in (0, 1):
        text = (tmp_path / f"closed.{rank}").read_text()
        assert "world_up=True" in text and "'device': 0" in text, text


@pytest.mark.slow
def test_a_killed_worker_fails_the_call_within_the_timeout(ray_cluster, a_dir):
    g = WorkerGroup(_config(), EngineWorker, args=(str(a_dir),))
    pids = [i["pid"] for i in g.call("info")]
    t0 = time.monotonic()
    with pytest.raises(WorkerDiedError) as e:
        g.call("exit_on", 1)  # rank 1 exits; rank 0 blocks as if stuck in a collective with it
    elapsed = time.monotonic() - t0
    assert e.value.rank == 1 and "rank 1 died during exit_on()" in str(e.value)
    assert "ranks [0] still running" in str(e.value)
    assert elapsed < 30, elapsed  # death seen at once, then failure_grace_s (2 s) for rank 0, not 60 s
    assert g.is_broken
    with pytest.raises(WorkerGroupError, match="unusable"):
        g.call("info")  # at once, without touching the actors
    g.shutdown()  # kills the stuck rank 0 rather than waiting for it
    assert _wait_for(lambda: all(_pid_gone(p) for p in pids), 20), pids


@pytest.mark.slow
def test_a_hung_call_times_out(ray_cluster, a_dir):
    with WorkerGroup(_config(call_timeout_s=3.0), EngineWorker, args=(str(a_dir),)) as g:
        t0 = time.monotonic()
        with pytest.raises(WorkerTimeoutError) as e:
            g.call("hang", 120.0)
        assert time.monotonic() - t0 < 20
        assert e.value.ranks == [0, 1] and g.is_broken
