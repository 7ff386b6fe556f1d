"""Tensor parallelism with fewer KV heads than ranks: each rank holds one KV head, replicated.

Models with one KV head (MQA) at TP=2 against TP=1 and HF, a weight update under TP, the
QKV loader's slicing for every rank of larger groups (against HF's q-head -> kv-head map)
and the typed errors of setups that cannot be split.

Run as a script (``python tests/test_tp_kv_replication.py RANK PORT JOB_DIR``) it is one rank
of the two-process job: it reads ``JOB_DIR/job.json`` and writes ``JOB_DIR/rank{RANK}.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rollout import LLM, SamplingParams
from rollout.distributed import ParallelState
from rollout.errors import UnsupportedModelError
from rollout.models.layers.linear import QKVLinear
from rollout.models.llama import LlamaForCausalLM, split_heads
from tests.helpers.engine_state import model_dir_with
from tests.helpers.hf_oracle import HFOracle
from tests.helpers.models import build_model_dir
from tests.helpers.two_ranks import rank_job, run_job

# Compares numbers across computations: run again with another thread count (.ci/run).
pytestmark = pytest.mark.numerics

TIMEOUT_S = 120  # the whole job; a stuck collective fails the test instead of hanging it
# name -> (helper variant, q heads): one kv head each; qwen2 has q/k/v biases, tied embeddings.
MODELS = {"llama_mqa": ("llama", 4), "qwen2_mqa": ("qwen2", 2)}
PROMPTS = [[5, 17, 42, 99, 3], [7, 8, 9], [300, 1, 250, 12, 77, 64, 33]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
ENGINE_ARGS = {"dtype": "float32", "num_kv_blocks": 32, "max_model_len": 128, "block_size": 16}


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


def _mqa_dir(src: Path, dst: Path, num_heads: int) -> Path:
    """The helper's tiny model cut down to its first ``num_heads`` q heads and first kv head."""
    config = json.loads((src / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rows = {"q_proj": num_heads * head_dim, "k_proj": head_dim, "v_proj": head_dim}
    tensors = {}
    for name, t in load_file(src / "model.safetensors").items():
        module = name.split(".")[-2]
        if module in rows:
            t = t[: rows[module]]
        elif module == "o_proj" and name.endswith("weight"):
            t = t[:, : num_heads * head_dim]
        tensors[name] = t
    model_dir_with(src, tensors, dst)
    config.update(num_attention_heads=num_heads, num_key_value_heads=1, head_dim=head_dim)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# ---- one rank of the two-process job --------------------------------------------------------
def _rank_main(rank: int, port: int, job_dir: str) -> None:
    with rank_job(rank, port, job_dir) as (job, res):
        for name in MODELS:
            llm = LLM(job[name], tensor_parallel_size=2, **ENGINE_ARGS)
            res[name] = {"greedy": _tokens(llm.generate(PROMPTS, GREEDY)),
                         "kv_heads": llm.worker.runner.kv_caches[0].shape[-2]}
            if name == "llama_mqa":
                llm.update_weights(load_file(Path(job["llama_mqa_new"]) / "model.safetensors"))
                res[name]["after_update"] = _tokens(llm.generate(PROMPTS, GREEDY))
            del llm


# ---- the pytest side ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mqa_dirs(tmp_path_factory, model_dirs, tokenizer_dir):
    """name -> model directory; "llama_mqa_new": llama_mqa's architecture, other weights."""
    dirs = {name: _mqa_dir(model_dirs[base], tmp_path_factory.mktemp(name), heads)
            for name, (base, heads) in MODELS.items()}
    seed1 = build_model_dir("llama", tmp_path_factory.mktemp("llama_seed1"), tokenizer_dir, seed=1)
    dirs["llama_mqa_new"] = _mqa_dir(seed1, tmp_path_factory.mktemp("llama_mqa_new"), MODELS["llama_mqa"][1])
    return dirs


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory, mqa_dirs):
    job_dir = tmp_path_factory.mktemp("tp_kv_job")
    return run_job(__file__, {name: str(path) for name, path in mqa_dirs.items()}, job_dir, timeout=TIMEOUT_S)


def _reference(path) -> list[list[int]]:
    return _tokens(LLM(path, **ENGINE_ARGS).generate(PROMPTS, GREEDY))


@pytest.mark.parametrize("name", MODELS)
def test_tp2_with_one_kv_head_equals_tp1_and_hf(tp_results, mqa_dirs, name):
    ref = _reference(mqa_dirs[name])
    hf = HFOracle(mqa_dirs[name])
    assert ref == [hf.greedy(p, GREEDY.max_tokens) for p in PROMPTS]
    for r in tp_results:
        assert r[name]["greedy"] == ref
        assert r[name]["kv_heads"] == 1  # each rank's KV cache holds the one (replicated) head


def test_weight_update_under_tp_with_replicated_kv_head(tp_results, mqa_dirs):
    new_ref = _reference(mqa_dirs["llama_mqa_new"])
    assert new_ref != tp_results[0]["llama_mqa"]["greedy"]
    for r in tp_results:
        assert r["llama_mqa"]["after_update"] == new_ref


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "tp_size"),
                         [(4, 1, 2), (4, 2, 4), (8, 2, 4), (8, 1, 4), (4, 2, 2), (8, 4, 2)])
def test_qkv_loader_gives_each_rank_the_kv_head_of_its_q_heads(num_heads, num_kv_heads, tp_size):
    """Every rank's q heads meet, after loading full HF tensors, the kv head HF pairs them with
    (q head i -> kv head i // (num_heads // num_kv_heads), as ``repeat_kv``)."""
    hidden, head_dim = 8, 4
    gen = torch.Generator().manual_seed(0)
    full = {s: torch.randn(n * head_dim, hidden + 1, generator=gen) for s, n in
            (("q", num_heads), ("k", num_kv_heads), ("v", num_kv_heads))}  # weight | bias columns
    q_local, kv_local = split_heads(num_heads, num_kv_heads, tp_size)
    for rank in range(tp_size):
        layer = QKVLinear(hidden, head_dim, num_heads, num_kv_heads, True, torch.float32, rank, tp_size)
        for s, tensor in full.items():
            for param, part in ((layer.weight, tensor[:, :hidden]), (layer.bias, tensor[:, hidden])):
                assert param.hf_shape(s) == part.shape
                param.weight_loader(param, part, s)
        held = torch.cat([layer.weight, layer.bias[:, None]], dim=1)
        q, k, v = (t.view(-1, head_dim, hidden + 1) for t in held.split([layer.q_size, layer.kv_size, layer.kv_size]))
        assert (q.shape[0], k.shape[0], v.shape[0]) == (q_local, kv_local, kv_local)
        want = {s: t.view(-1, head_dim, hidden + 1) for s, t in full.items()}  # [heads, head_dim, hidden + 1]
        for j in range(q_local):
            i = rank * q_local + j  # the model's q head
            hf_kv = i // (num_heads // num_kv_heads)
            local_kv = j // (q_local // kv_local)  # the pairing of the rank's own GQA
            assert torch.equal(q[j], want["q"][i])
            assert torch.equal(k[local_kv], want["k"][hf_kv]) and torch.equal(v[local_kv], want["v"][hf_kv])


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "tp_size", "message"), [
    (4, 2, 3, r"num_attention_heads \(4\) is not divisible by tensor_parallel_size 3"),
    (2, 1, 4, r"num_attention_heads \(2\) is not divisible by tensor_parallel_size 4"),
    (12, 3, 2, r"num_key_value_heads \(3\) is neither divisible by tensor_parallel_size 2 nor a divisor"),
    (12, 3, 4, r"num_key_value_heads \(3\) is neither divisible by tensor_parallel_size 4 nor a divisor"),
    (12, 4, 6, r"num_key_value_heads \(4\) is neither divisible by tensor_parallel_size 6 nor a divisor"),
])
def test_heads_that_cannot_be_split_raise_typed_errors(model_dirs, num_heads, num_kv_heads, tp_size, message):
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dirs["llama"])
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = num_heads, num_kv_heads, 4
    parallel = ParallelState(tp_size, tp_group=object(), tp_rank=0)  # construction never communicates
    with pytest.raises(UnsupportedModelError, match=message):
        LlamaForCausalLM(config, torch.float32, parallel)


def test_replicated_and_divided_kv_heads_per_rank():
    assert split_heads(4, 1, 2) == (2, 1)
    assert split_heads(8, 2, 8) == (1, 1)
    assert split_heads(8, 4, 2) == (4, 2)  # the divisible path, unchanged
    assert split_heads(32, 8, 1) == (32, 8)


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
