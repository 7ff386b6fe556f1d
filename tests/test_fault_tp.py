"""Faults of a tensor-parallel group (issue #15): a peer that stops answering, a peer that
dies. The survivor raises ``PeerFailureError`` within the group's timeout instead of hanging.

Run as a script (``python tests/test_fault_tp.py RANK PORT JOB_DIR``) it is one rank of a
two-process gloo job whose world (and so every TP group the engine makes) times out after
``TIMEOUT_S``. Both ranks drive one long greedy request through the request-level API
(``add_request`` / ``step``); after ``NUM_STEPS`` steps rank 1 misbehaves:

- stall: it stops stepping (alive, sockets open) until rank 0 has given up; rank 0's next
  collective waits out the timeout. Without the timeout passed into the engine's own
  groups this would wait torch's default (30 min for gloo).
- death: it ``os._exit``s in the middle of the generate; rank 0's next collective finds
  the connection reset.

Rank 0 records what it raised, how long the failing step took, whether a second step fails
the same way and whether ``shutdown`` still works; rank 1 writes no results (it died).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from rollout import LLM, SamplingParams
from rollout.errors import PeerFailureError
from tests.helpers.two_ranks import rank_job, run_job

TIMEOUT_S = 10  # the world's collective timeout, inherited by the engine's TP group
NUM_STEPS = 4  # steps both ranks run before rank 1 misbehaves
DEATH_EXIT_CODE = 17
ENGINE_ARGS = {"dtype": "float32", "num_kv_blocks": 32, "max_model_len": 256, "block_size": 16}
LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)  # far from done after NUM_STEPS
PROMPT = [5, 17, 42, 99, 3]


# ---- one rank of the two-process job --------------------------------------------------------
def _start(job: dict) -> LLM:
    llm = LLM(job["model"], tensor_parallel_size=2, **ENGINE_ARGS)
    llm.add_request({"prompt_token_ids": PROMPT}, LONG, request_id="long")
    for _ in range(NUM_STEPS):
        llm.step()
    return llm


def _step_until_failure(llm: LLM) -> dict:
    """Rank 0: step until a step raises; what it raised and how long that step took."""
    while llm.has_unfinished_requests():
        t0 = time.monotonic()
        try:
            llm.step()
        except Exception as e:  # recorded, whatever it is: the pytest side asserts the type
            res = {"error": type(e).__name__, "message": str(e), "seconds": time.monotonic() - t0,
                   "cause": type(e.__cause__).__name__}
            break
    else:
        return {"error": None}
    t0 = time.monotonic()
    try:
        llm.step()
        res["again"] = None
    except Exception as e:
        res["again"] = type(e).__name__
    res["again_seconds"] = time.monotonic() - t0
    try:
        aborted = llm.shutdown()
        res["shutdown"] = [o.outputs[0].finish_reason for o in aborted]
    except Exception as e:
        res["shutdown"] = f"{type(e).__name__}: {e}"
    return res


def _wait_for(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


def _rank_main(rank: int, port: int, job_dir: str) -> None:
    given_up = Path(job_dir) / "rank0_gave_up"
    with rank_job(rank, port, job_dir) as (job, res):
        llm = _start(job)  # stall: rank 1 stops answering, alive
        if rank == 0:
            res["stall"] = _step_until_failure(llm)
            given_up.touch()
        else:
            _wait_for(given_up, 6 * TIMEOUT_S)
            llm.shutdown()
        del llm

        llm = _start(job)  # death: rank 1 exits mid-generate
        if rank == 1:
            os._exit(DEATH_EXIT_CODE)  # no cleanup, no goodbye: sockets close with the process
        res["death"] = _step_until_failure(llm)


# ---- the pytest side ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fault_results(tmp_path_factory, llama_dir):
    """Rank 0's results and the job's wall time (run once for the module)."""
    job = {"model": str(llama_dir), "timeout_s": TIMEOUT_S}
    t0 = time.monotonic()
    r0, r1 = run_job(__file__, job, tmp_path_factory.mktemp("fault_tp"), timeout=90,
                     exit_codes=(0, DEATH_EXIT_CODE))
    assert r1 is None  # rank 1 died before writing anything
    return r0, time.monotonic() - t0


def _check_peer_failure(res: dict) -> None:
    assert res["error"] == PeerFailureError.__name__, res
    assert res["cause"] == "RuntimeError"  # gloo's own error, kept as __cause__
    assert "all_reduce over process group 'tp0' (global ranks [0, 1])" in res["message"]
    assert f"on rank 0: a peer died or did not answer within {TIMEOUT_S}s" in res["message"]
    assert res["again"] == PeerFailureError.__name__ and res["again_seconds"] < 2  # the group stays broken
    assert res["shutdown"] == ["abort"]  # the survivor still tears down cleanly


def test_stalled_peer_raises_after_the_group_timeout(fault_results):
    res, _ = fault_results
    _check_peer_failure(res["stall"])
    assert "Timed out" in res["stall"]["message"]
    assert TIMEOUT_S - 1 <= res["stall"]["seconds"] <= TIMEOUT_S + 5


def test_dead_peer_raises_at_once(fault_results):
    res, _ = fault_results
    _check_peer_failure(res["death"])
    assert res["death"]["seconds"] < TIMEOUT_S / 2  # a reset connection, no need to wait


def test_job_ends_in_bounded_time(fault_results):
    _, seconds = fault_results
    print(f"\nfault job: {seconds:.1f}s wall (group timeout {TIMEOUT_S}s)")
    assert seconds < TIMEOUT_S + 60


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
