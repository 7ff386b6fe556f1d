"""trainers_integration/: HF modules, FSDP2 and ZeRO-3 streaming, the colocated cycle (CPU).

Run as a script (``python tests/test_trainers_integration.py RANK PORT JOB_DIR``) it is one
rank of a two-process gloo job: an FSDP2 (and, where DeepSpeed imports, a ZeRO-3) copy of
model B streams its full weights into the rank's own engine loaded with model A, and the
greedy outputs go to ``JOB_DIR/rank{RANK}.json``. The pytest side runs it once and compares
with an engine loaded with B.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import torch
import transformers

from tests.helpers.two_ranks import rank_job, run_job

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # as a script
    sys.path.insert(0, str(ROOT))

from rollout.errors import EngineSleepingError, WeightUpdateError
from tests.helpers.engine_state import assert_same_greedy, changed, greedy, make_llm, snapshot
from trainers_integration import (
    hf_name,
    iter_full_weights,
    iter_gathered_weights,
    iter_hf_weights,
    rollout_phase,
    update_weights_in_buckets,
)
from trainers_integration.deepspeed_zero3 import layer_key
from trainers_integration.fsdp2 import iter_full_weight_buckets

# Compares numbers across computations: run again with another thread count (.ci/run).
pytestmark = pytest.mark.numerics

TIMEOUT_S = 90  # the whole two-process job; a stuck collective fails instead of hanging
SMALL_BUCKET = 20_000  # bytes: several buckets for the tiny models (one 384x64 fp32 embedding is 98 KB)


def _hf_model(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


# ---- one rank of the two-process job --------------------------------------------------------
def _fsdp2_case(job: dict) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = _hf_model(job["b_dir"])
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = all(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in model.parameters())
    sizes = [sum(t.numel() * t.element_size() for _, t in b) for b in iter_full_weight_buckets(model, SMALL_BUCKET)]
    llm = make_llm(job["a_dir"])
    llm.sleep(1)
    with rollout_phase(llm, iter_full_weights(model, SMALL_BUCKET), version=3, bucket_bytes=SMALL_BUCKET) as stats:
        out = greedy(llm)
        differ = _differs_from(llm, job["b_dir"])
    return {"sharded": sharded, "num_buckets": len(sizes), "out": out, "num_tensors": stats["num_tensors"],
            "version": stats["weight_version"], "asleep_after": llm.is_sleeping, "differ": differ}


def _differs_from(llm, model_dir) -> list[str]:
    """Engine parameters not bitwise equal to those of an engine loaded from ``model_dir``:
    streamed weights are compared as weights, exactly."""
    return sorted(changed(snapshot(make_llm(model_dir)), snapshot(llm)))


def _zero3_case(job: dict) -> dict:
    try:
        import deepspeed
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        return {"skipped": f"deepspeed does not import: {type(e).__name__}: {e}"}
    from safetensors.torch import load_file

    deepspeed.init_distributed(dist_backend="gloo")  # reuses the initialised process group
    config = transformers.AutoConfig.from_pretrained(job["b_dir"])
    config.pad_token_id = None  # HF's init zeroes the padding row, which a partitioned param lacks
    with deepspeed.zero.Init(config_dict_or_path={"zero_optimization": {"stage": 3}, "train_batch_size": 2}):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    sd_b = load_file(Path(job["b_dir"]) / "model.safetensors")
    params = dict(model.named_parameters())
    partitioned = all(p.numel() == 0 and hasattr(p, "ds_id") for p in params.values())
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
        if torch.distributed.get_rank() == 0:
            for name, p in params.items():
                p.copy_(sd_b[name])
    llm = make_llm(job["a_dir"])
    n, _ = update_weights_in_buckets(llm, iter_gathered_weights(model), SMALL_BUCKET)
    return {"partitioned": partitioned, "num_tensors": n, "out": greedy(llm), "differ": _differs_from(llm, job["b_dir"]),
            "still_partitioned": all(p.numel() == 0 for p in model.parameters())}


def _rank_main(rank: int, port: int, job_dir: str) -> None:
    # FSDP2 and DeepSpeed read the world from the environment as well.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with rank_job(rank, port, job_dir) as (job, res):
        res["fsdp2"] = _fsdp2_case(job)
        res["zero3"] = _zero3_case(job)


# ---- the pytest side ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dist_results(tmp_path_factory, a_dir, b_dir):
    job_dir = tmp_path_factory.mktemp("trainers_job")
    return run_job(__file__, {"a_dir": str(a_dir), "b_dir": str(b_dir)}, job_dir, timeout=TIMEOUT_S)



def test_fsdp2_ranks_stream_full_weights(dist_results, b_out):
    for res in dist_results:
        r = res["fsdp2"]
        assert r["sharded"], "fully_shard did not shard every parameter into a DTensor"
        assert r["num_buckets"] > 1
        assert r["differ"] == []
        # Another process with another thread count: tokens exact, logprobs within tolerance.
        assert_same_greedy(r["out"], b_out)
        assert r["num_tensors"] == 2 * 9 + 3  # 9 per layer; embed, norm, lm_head
        assert r["version"] == 3 and r["asleep_after"]


def test_zero3_ranks_stream_gathered_weights(dist_results, b_out):
    for res in dist_results:
        r = res["zero3"]
        if "skipped" in r:
            pytest.skip(r["skipped"])
        assert r["partitioned"] and r["still_partitioned"]
        assert r["num_tensors"] == 2 * 9 + 3
        assert r["differ"] == []
        assert_same_greedy(r["out"], b_out)


# ---- plain / HF modules ---------------------------------------------------------------------
class _Wrapper(torch.nn.Module):
    """Stands in for DDP (``module.``) around torch.compile (``_orig_mod.``)."""

    def __init__(self, inner: torch.nn.Module, attr: str):
        super().__init__()
        self.add_module(attr, inner)


def test_hf_name_strips_wrappers_and_maps_prefixes():
    assert hf_name("module._orig_mod.model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert hf_name("model.layers.1._checkpoint_wrapped_module.self_attn.q_proj.weight") == (
        "model.layers.1.self_attn.q_proj.weight")
    assert hf_name("model.module.weight") == "model.module.weight"  # only a leading "module."
    assert hf_name("policy.model.norm.weight", {"policy.": "", "policy.lm": "x"}) == "model.norm.weight"


def test_hf_module_streams_into_engine(a_dir, b_dir, sd_b, b_out):
    model_b = _hf_model(b_dir)
    wrapped = _Wrapper(_Wrapper(model_b, "_orig_mod"), "module")
    pairs = list(iter_hf_weights(wrapped))
    assert sorted(n for n, _ in pairs) == sorted(sd_b)
    assert all(not t.requires_grad and torch.equal(t, sd_b[n]) for n, t in pairs)
    llm = make_llm(a_dir)
    assert llm.update_weights(iter_hf_weights(wrapped), version=5) == len(sd_b)
    assert greedy(llm) == b_out and llm.weight_version == 5
    assert all(p.grad is None for p in model_b.parameters())  # the trainer's model is untouched


def test_update_in_buckets_versions_and_bounds(a_dir, sd_b, b_out):
    llm = make_llm(a_dir)
    calls = []
    update = llm.update_weights
    llm.update_weights = lambda chunk, version=None: calls.append(
        (sum(t.numel() * t.element_size() for _, t in chunk), version)) or update(chunk, version=version)
    n, nbytes = update_weights_in_buckets(llm, sd_b.items(), SMALL_BUCKET)
    assert n == len(sd_b) and nbytes == sum(t.numel() * t.element_size() for t in sd_b.values())
    assert len(calls) > 1 and {v for _, v in calls} == {1}
    big = max(t.numel() * t.element_size() for t in sd_b.values())
    assert all(size <= max(SMALL_BUCKET, big) for size, _ in calls)
    assert greedy(llm) == b_out and llm.weight_version == 1
    with pytest.raises(ValueError):
        update_weights_in_buckets(llm, sd_b.items(), 0)


@pytest.mark.parametrize("failure", ["bad name", "stream raises"])
def test_update_in_buckets_failing_part_way_refuses_a_mix_of_versions(a_dir, sd_b, b_out, failure):
    """Chunks before the failure are loaded, the rest is not: generating would mix two
    versions, so the engine refuses until the weights are loaded again, then serves B."""
    llm = make_llm(a_dir)
    items = list(sd_b.items())
    half = len(items) // 2

    def stream():
        yield from items[:half]
        if failure == "stream raises":
            raise RuntimeError("the trainer's gather failed")
        yield ("model.layers.0.no_such.weight", torch.zeros(2))
        yield from items[half:]

    with pytest.raises(WeightUpdateError if failure == "bad name" else RuntimeError):
        update_weights_in_buckets(llm, stream(), SMALL_BUCKET)
    with pytest.raises(EngineSleepingError, match="stale") as err:
        greedy(llm)
    num_stale = int(str(err.value).split(": ", 1)[1].split()[0])
    assert 0 < num_stale < len(items)  # the chunks before the failure did load
    llm.update_weights(items)  # the trainer retries: the engine is whole again
    assert greedy(llm) == b_out


# ---- ZeRO-3 without DeepSpeed: grouping and copies ------------------------------------------
def test_zero3_gathers_per_layer_with_a_stand_in():
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1), dtype=torch.float32)
    params = list(model.parameters())
    for p in params:
        p.ds_id = 0  # looks partitioned: every group must be gathered
    index = {id(p): i for i, p in enumerate(params)}
    gathered: list[list[int]] = []

    class Gather:  # records each group gathered
        def __init__(self, group):
            gathered.append([index[id(p)] for p in group])

        def __enter__(self):
            pass

        def __exit__(self, *exc):
            pass

    out = list(iter_gathered_weights(_Wrapper(model, "module"), gather=Gather))
    assert [n for n, _ in out] == [n for n, _ in model.named_parameters()]
    keys = [layer_key(n) for n, _ in model.named_parameters()]
    assert len(gathered) == len(dict.fromkeys(keys))  # one gather per layer / top-level module
    assert sorted(i for g in gathered for i in g) == list(range(len(params)))
    assert "model.layers.0" in keys and "model.embed_tokens" in keys
    assert all(t.data_ptr() != p.data_ptr() for (_, t), p in zip(out, params))  # copies, made inside


# ---- the colocated cycle ---------------------------------------------------------------------
def test_rollout_phase_round_trip(a_dir, sd_a, sd_b, a_out, b_out, caplog):
    llm = make_llm(a_dir)
    llm.sleep(1)
    with caplog.at_level(logging.INFO, logger="trainers_integration.colocate"), \
            rollout_phase(llm, sd_b.items(), version=7) as stats:
        assert not llm.is_sleeping
        assert greedy(llm) == b_out and llm.weight_version == 7
    assert llm.is_sleeping
    assert {"sync_s", "wake_s", "sleep_s", "bytes_freed", "num_tensors", "bytes_synced"} <= stats.keys()
    assert stats["bytes_freed"] > 0 and stats["num_tensors"] == len(sd_b) and stats["sync_s"] >= 0
    boundaries = [r.getMessage() for r in caplog.records if r.name == "trainers_integration.colocate"]
    assert len(boundaries) == 4 and all("MiB" in m for m in boundaries)

    with rollout_phase(llm, None, level=2) as stats:  # level-1 sleep kept B's weights
        assert greedy(llm) == b_out and llm.weight_version == 7
    assert stats["num_tensors"] == 0 and llm.is_sleeping

    # A bad update: the engine sleeps again, at the caller's level, and still works.
    with pytest.raises(WeightUpdateError), rollout_phase(llm, [("no.such.weight", torch.zeros(2))], level=2):
        pass
    assert llm.is_sleeping and llm.memory_usage()["weights"]["host"] == 0  # level 2: no host copy made
    with rollout_phase(llm, sd_a.items()) as stats:  # level 2 discarded them: reload A
        assert greedy(llm) == a_out
    assert llm.is_sleeping and stats["weight_version"] == 8


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
