"""sleep(1) under tensor parallelism when one rank cannot allocate its host copy of the
weights: every rank raises HostMemoryError and none releases anything, so the group stays
in one state (awake, generating as before) instead of half asleep and hanging at its next
collective; the next sleep(1), with memory back, works on both ranks.

Two real processes over gloo (``tests/helpers/two_ranks.py``); rank 1's platform fails its
host allocations until told otherwise (a registered platform, as in test_host_buffer.py).
Run as a script it is one rank of that job.
"""

from __future__ import annotations

import sys

import torch

from tests.helpers.two_ranks import rank_job, run_job

DEVICE = "host_fail_cpu"
TIMEOUT_S = 180


def _rank_main(rank: int, port: int, job_dir: str) -> None:
    import rollout.platforms as platforms
    from rollout.errors import HostMemoryError
    from rollout.platforms import register_platform
    from rollout.platforms.cpu import CpuPlatform
    from tests.helpers.engine_state import greedy, make_llm

    state = {"fail": rank == 1}

    class FailingHostPlatform(CpuPlatform):
        name = device_type = DEVICE

        def parse_device(self, device):
            return torch.device("cpu")

        def allocate_host(self, nbytes: int) -> torch.Tensor:
            if state["fail"]:
                raise RuntimeError("out of pinned host memory (this test's rank 1)")
            return torch.empty(nbytes, dtype=torch.uint8)

    platforms.reload_plugins()
    register_platform(FailingHostPlatform)
    with rank_job(rank, port, job_dir) as (job, res):
        llm = make_llm(job["llama"], device=DEVICE, tensor_parallel_size=2)
        ref = greedy(llm)
        try:
            llm.sleep(1)
            res["first_sleep"] = "no error"
        except HostMemoryError as e:
            res["first_sleep"] = f"HostMemoryError: {e}"
        res["awake_after_failure"] = not llm.is_sleeping
        res["same_after_failure"] = greedy(llm) == ref  # a collective: both ranks must be awake
        state["fail"] = False
        llm.sleep(1)
        res["asleep"] = llm.is_sleeping
        llm.wake_up()
        res["same_after_wake"] = greedy(llm) == ref
        llm.shutdown()


def test_a_rank_without_host_memory_keeps_the_whole_group_awake(tmp_path, llama_dir):
    results = run_job(__file__, {"llama": str(llama_dir)}, tmp_path, timeout=TIMEOUT_S)
    own, other = results[1]["first_sleep"], results[0]["first_sleep"]
    assert own.startswith("HostMemoryError") and "pinned host memory" in own, results
    assert other.startswith("HostMemoryError") and "another rank" in other, results
    for r in results:
        assert r["awake_after_failure"] and r["same_after_failure"], results
        assert r["asleep"] and r["same_after_wake"], results


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
