"""Debug TP agreement checks and data-parallel shares on CPU: two processes over gloo.

Run as a script (``python tests/test_tp_agreement_and_dp.py RANK PORT JOB_DIR``) it is one
rank of the two-process job (as in test_tensor_parallel.py); pytest runs it once and
compares with one-process references.
"""

from __future__ import annotations

import sys

import pytest
import torch.distributed as dist

from rollout import LLM
from rollout.distributed import dp_rank_and_size, gather_from_dp, split_for_dp
from rollout.distributed.data_parallel import dp_bounds
from rollout.errors import ParallelMismatchError
from tests.helpers.two_ranks import rank_job, run_job
from tests.test_tensor_parallel import (
    ENGINE_ARGS,
    GREEDY,
    PROMPTS,
    SEEDED,
    TIMEOUT_S,
    UNSEEDED,
    _tokens,
)

# Compares numbers across computations: run again with another thread count (.ci/run).
pytestmark = pytest.mark.numerics

DP_PROMPTS = PROMPTS + [[11, 12, 13, 14], [200, 201]]  # 5 prompts: shares of 3 and 2


def _mismatch(fn) -> str:
    try:
        fn()
    except ParallelMismatchError as e:
        return f"ParallelMismatchError: {e}"
    return "no error"


def _rank_main(rank: int, port: int, job_dir: str) -> None:
    with rank_job(rank, port, job_dir) as (job, res):
        # TP=2 with the debug check on.
        llm = LLM(job["llama"], tensor_parallel_size=2, debug_tp_agreement=True, **ENGINE_ARGS)
        res["same"] = _tokens(llm.generate(PROMPTS, GREEDY))
        mine = [p + [rank] for p in PROMPTS] if rank else PROMPTS  # rank 1 gets other prompts
        res["different_prompts"] = _mismatch(lambda: llm.generate(mine, GREEDY))
        res["after_prompt_error"] = _tokens(llm.generate(PROMPTS, GREEDY))  # still usable
        del llm
        # Unseeded sampling from engines with different seeds: the ranks sample apart.
        llm = LLM(job["llama"], tensor_parallel_size=2, debug_tp_agreement=True, seed=rank, **ENGINE_ARGS)
        res["different_tokens"] = _mismatch(lambda: llm.generate(PROMPTS, UNSEEDED))
        del llm
        # TP=1 in a world of 2: two data-parallel replicas.
        llm = LLM(job["llama"], **ENGINE_ARGS)
        res["dp"] = list(dp_rank_and_size(llm.parallel))
        share = split_for_dp(DP_PROMPTS, llm.parallel)
        res["share"] = share
        res["gathered"] = {
            "greedy": gather_from_dp(_tokens(llm.generate(share, GREEDY)), llm.parallel),
            "seeded": gather_from_dp(_tokens(llm.generate(share, SEEDED)), llm.parallel),
        }


@pytest.fixture(scope="module")
def results(tmp_path_factory, model_dirs):
    job_dir = tmp_path_factory.mktemp("agree_job")
    return run_job(__file__, {"llama": str(model_dirs["llama"])}, job_dir, timeout=TIMEOUT_S)


def test_same_prompts_pass_the_check(results, llama_dir):
    ref = _tokens(LLM(llama_dir, **ENGINE_ARGS).generate(PROMPTS, GREEDY))
    for r in results:
        assert r["same"] == ref
        assert r["after_prompt_error"] == ref


def test_different_prompts_raise_on_both_ranks(results):
    for r in results:
        msg = r["different_prompts"]
        assert msg.startswith("ParallelMismatchError") and "ranks given different prompts" in msg
        assert "prompt #3" in msg and "TP ranks 0 and 1" in msg  # the 4th prompt given: 3 already checked


def test_different_tokens_raise_naming_the_step(results):
    for r in results:
        msg = r["different_tokens"]
        assert msg.startswith("ParallelMismatchError") and "at step 1" in msg and "TP ranks 0 and 1" in msg


def test_dp_shares_and_gather_in_prompt_order(results, llama_dir):
    assert [r["dp"] for r in results] == [[0, 2], [1, 2]]
    assert [r["share"] for r in results] == [DP_PROMPTS[:3], DP_PROMPTS[3:]]
    single = LLM(llama_dir, **ENGINE_ARGS)
    for key, params in (("greedy", GREEDY), ("seeded", SEEDED)):
        ref = _tokens(single.generate(DP_PROMPTS, params))
        for r in results:
            assert r["gathered"][key] == ref, key


def test_split_without_a_world():
    assert not dist.is_initialized()
    assert split_for_dp(range(5), None) == [0, 1, 2, 3, 4]
    assert gather_from_dp([1, 2], None) == [1, 2]
    assert [dp_bounds(5, r, 3) for r in range(3)] == [(0, 2), (2, 4), (4, 5)]
    assert [dp_bounds(1, r, 2) for r in range(2)] == [(0, 1), (1, 1)]


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
