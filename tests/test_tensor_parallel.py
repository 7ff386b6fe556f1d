"""Tensor parallelism on CPU: two processes over gloo against one-process references.

Run as a script (``python tests/test_tensor_parallel.py RANK PORT JOB_DIR``) it is one rank
of the two-process job: it reads ``JOB_DIR/job.json``, runs every TP=2 case and writes
``JOB_DIR/rank{RANK}.json``. The pytest side runs the job once and compares.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from rollout import LLM, SamplingParams
from rollout.errors import InvalidRequestError, UnsupportedModelError
from tests.helpers.models import build_model_dir
from tests.helpers.two_ranks import rank_job, run_job

# Compares numbers across computations: run again with another thread count (.ci/run).
pytestmark = pytest.mark.numerics

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 120  # the whole job; a stuck collective fails the test instead of hanging it
MODELS = ("llama", "qwen3", "qwen2")  # untied; q/k norm; tied embeddings with q/k/v bias
PROMPTS = [[5, 17, 42, 99, 3], [7, 8, 9], [300, 1, 250, 12, 77, 64, 33]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
UNSEEDED = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)  # engine generator
ENGINE_ARGS = {"dtype": "float32", "num_kv_blocks": 64, "max_model_len": 128, "block_size": 16}


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


# ---- one rank of the two-process job --------------------------------------------------------
def _error_name(fn) -> str:
    try:
        fn()
    except (InvalidRequestError, UnsupportedModelError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _vocab_parallel_check() -> bool:
    """Embedding and LM head with a vocab (7) that does not divide by 2: padding rows."""
    from rollout.distributed import init_parallel
    from rollout.models.layers.embedding import LMHead, VocabEmbedding

    p = init_parallel(2)
    full = torch.randn(7, 4, generator=torch.Generator().manual_seed(0))
    emb = VocabEmbedding(7, 4, torch.float32, p.tp_rank, 2, p.tp_group)
    head = LMHead(7, 4, torch.float32, None, p.tp_rank, 2, p.tp_group)
    for param in (emb.weight, head.weight):
        param.weight_loader(param, full)
    ids = torch.tensor([0, 3, 4, 6, 1])
    h = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    return bool(torch.equal(emb(ids), full[ids]) and torch.allclose(head(h), h @ full.T, atol=1e-6))


def _rank_main(rank: int, port: int, job_dir: str) -> None:
    with rank_job(rank, port, job_dir) as (job, res):
        res["errors"] = {
            "tp3": _error_name(lambda: LLM(job["llama"], tensor_parallel_size=3, **ENGINE_ARGS)),
            "heads": _error_name(lambda: LLM(job["bad_heads"], tensor_parallel_size=2, **ENGINE_ARGS)),
        }
        res["vocab_parallel"] = _vocab_parallel_check()
        from rollout.distributed import init_parallel

        given = init_parallel(2, tp_group=dist.new_group([0, 1]))
        res["explicit_group"] = [given.tp_rank, given.dp_rank, given.dp_size]
        for name in MODELS:
            # qwen3: ranks asked for different KV sizes agree on the smaller one.
            blocks = 64 - 16 * rank if name == "qwen3" else 64
            llm = LLM(job[name], tensor_parallel_size=2, **{**ENGINE_ARGS, "num_kv_blocks": blocks})
            r = res[name] = {
                "greedy": _tokens(llm.generate(PROMPTS, GREEDY)),
                "seeded": _tokens(llm.generate(PROMPTS, SEEDED)),
                "unseeded": _tokens(llm.generate(PROMPTS, UNSEEDED)),
                "kv_heads": llm.worker.runner.kv_caches[0].shape[-2],
                "num_blocks": llm.worker.runner.scratch_block,  # == the pool's block count
                "parallel": [llm.parallel.tp_rank, llm.parallel.dp_rank, llm.parallel.dp_size],
            }
            if name == "llama":
                llm.sleep(level=1)
                llm.wake_up()
                r["after_wake"] = _tokens(llm.generate(PROMPTS, GREEDY))
                llm.update_weights(load_file(Path(job["llama_new"]) / "model.safetensors"))
                r["after_update"] = _tokens(llm.generate(PROMPTS, GREEDY))
            del llm


# ---- the pytest side ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_new_dir(tmp_path_factory, tokenizer_dir):
    return build_model_dir("llama", tmp_path_factory.mktemp("llama_new"), tokenizer_dir, seed=1)


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory, model_dirs, llama_new_dir):
    """rank -> results of the two-process TP=2 job (run once for the module)."""
    job_dir = tmp_path_factory.mktemp("tp_job")
    bad_heads = job_dir / "bad_heads"  # 3 kv heads can be neither split over 2 ranks nor replicated
    shutil.copytree(model_dirs["llama"], bad_heads)
    config = json.loads((bad_heads / "config.json").read_text())
    bad = {"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 3}
    (bad_heads / "config.json").write_text(json.dumps({**config, **bad}))
    job = {name: str(model_dirs[name]) for name in MODELS}
    job.update(llama_new=str(llama_new_dir), bad_heads=str(bad_heads))
    return run_job(__file__, job, job_dir, timeout=TIMEOUT_S)


def _reference(path, params=GREEDY) -> list[list[int]]:
    return _tokens(LLM(path, **ENGINE_ARGS).generate(PROMPTS, params))


@pytest.mark.parametrize("name", MODELS)
def test_tp2_greedy_equals_tp1(tp_results, model_dirs, name):
    ref = _reference(model_dirs[name])
    assert tp_results[0][name]["greedy"] == ref
    assert tp_results[1][name]["greedy"] == ref


@pytest.mark.parametrize("name", MODELS)
def test_ranks_agree_and_hold_their_shard(tp_results, name):
    r0, r1 = tp_results[0][name], tp_results[1][name]
    for key in ("greedy", "seeded", "unseeded"):
        assert r0[key] == r1[key], key
    assert r0["seeded"] != r0["greedy"]  # temperature 1 actually sampled
    assert r0["kv_heads"] == r1["kv_heads"] == 1  # 2 kv heads over 2 ranks
    assert [r0["parallel"], r1["parallel"]] == [[0, 0, 1], [1, 0, 1]]
    assert r0["num_blocks"] == r1["num_blocks"] == (48 if name == "qwen3" else 64)


def test_explicit_tp_group(tp_results):
    assert [r["explicit_group"] for r in tp_results] == [[0, 0, 1], [1, 0, 1]]


def test_sleep_wake_and_weight_update_under_tp(tp_results, model_dirs, llama_new_dir):
    new_ref = _reference(llama_new_dir)
    for r in tp_results:
        assert r["llama"]["after_wake"] == r["llama"]["greedy"]
        assert r["llama"]["after_update"] == new_ref
    assert new_ref != tp_results[0]["llama"]["greedy"]


def test_vocab_parallel_padding(tp_results):
    assert tp_results[0]["vocab_parallel"] and tp_results[1]["vocab_parallel"]


def test_bad_setups_raise_typed_errors(tp_results, llama_dir):
    for r in tp_results:
        assert r["errors"]["tp3"].startswith("InvalidRequestError") and "world size 2" in r["errors"]["tp3"]
        assert r["errors"]["heads"].startswith("UnsupportedModelError") and "num_key_value_heads" in r["errors"]["heads"]
    assert not dist.is_initialized()
    with pytest.raises(InvalidRequestError, match="process group must be initialised"):
        LLM(llama_dir, tensor_parallel_size=2, **ENGINE_ARGS)
    with pytest.raises(InvalidRequestError, match="tensor_parallel_size"):
        LLM(llama_dir, tensor_parallel_size=0, **ENGINE_ARGS)


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
