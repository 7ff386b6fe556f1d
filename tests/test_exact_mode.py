"""Exact on-policy mode (``LLM(batch_invariant=True)``) on CPU: what it promises, bit for bit.

- A request's tokens and logprobs are bitwise the same alone, in any batch, after a
  prefix-cache hit, after preemption and recompute, chunked at any size, and run to run.
- ``score()`` of a generated sequence equals the logprobs returned while generating it.
- ``trainers_integration.exact.ExactForward`` (the trainer's differentiable forward over
  its own weights, same model code, same kernels) returns those logprobs bitwise, from a
  plain HF module and from FSDP2-sharded ranks; its gradients equal HF's within tolerance.
- Under tensor parallelism (TP=2, gloo) the same holds batch to batch and run to run.

Every equality here is ``==`` on fp32 values: the mode promises it by construction (each
token computed by its own calls, whose shapes depend only on that token), so no tolerance.
"""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch
import transformers

from rollout import LLM, SamplingParams
from tests.helpers.two_ranks import rank_job, run_job
from trainers_integration.exact import ExactForward

pytestmark = pytest.mark.numerics

ARCHS = ["llama", "llama3_tied", "qwen2", "qwen3"]
PROMPTS = [list(range(5, 45)), [100, 200, 300], list(range(7, 30)), list(range(5, 41)) + [9, 9], [50] * 17]
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=10, logprobs=2),
    SamplingParams(temperature=0.8, max_tokens=12, logprobs=0, seed=5),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.9, min_p=0.02, max_tokens=10, logprobs=1, seed=11),
    SamplingParams(temperature=0.7, max_tokens=9, logprobs=0, seed=3, logprobs_mode="scaled"),
    SamplingParams(temperature=1.2, max_tokens=8, logprobs=0, seed=8, logprobs_mode="raw", n=2),
]


def _exact(model_dir, **kw) -> LLM:
    kw.setdefault("num_kv_blocks", 64)
    return LLM(str(model_dir), dtype="float32", batch_invariant=True, **kw)


def _result(out):
    return [(c.token_ids, c.token_logprobs, [sorted(d) for d in (c.logprobs or [])]) for c in out.outputs]


@pytest.fixture(scope="module")
def alone(model_dirs):
    """arch -> each (prompt, params) pair generated alone on a fresh engine."""
    res = {}
    for arch in ARCHS:
        res[arch] = [_result(_exact(model_dirs[arch]).generate([p], sp)[0]) for p, sp in zip(PROMPTS, PARAMS)]
    return res


# Engine layouts that change how a token is batched: chunk size, preemption, prefix cache.
LAYOUTS = [
    {},
    {"max_num_batched_tokens": 7},  # prompts chunked into pieces of 7 and less
    {"block_size": 4, "num_kv_blocks": 20, "max_num_batched_tokens": 16, "enable_prefix_caching": False},  # preemption
    {"enable_prefix_caching": False},
    {"max_num_seqs": 2},
]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_request_is_bitwise_the_same_in_any_batch(arch, model_dirs, alone):
    rng = random.Random(arch)
    for layout in LAYOUTS:
        llm = _exact(model_dirs[arch], **layout)
        for _ in range(2):  # the second round hits the prefix cache of the first
            order = rng.sample(range(len(PROMPTS)), k=rng.randint(2, len(PROMPTS)))
            outs = llm.generate([PROMPTS[i] for i in order], [PARAMS[i] for i in order])
            for i, out in zip(order, outs):
                assert _result(out) == alone[arch][i], (layout, i)
        if layout.get("num_kv_blocks") == 20:
            assert llm.stats().num_preemptions > 0, "the layout meant to force preemption did not"
    # Through the request-level API, requests joining while others decode.
    llm = _exact(model_dirs[arch])
    ids = {}
    for i in (2, 0):
        ids[llm.add_request(PROMPTS[i], PARAMS[i])] = i
    got = {}
    for step in range(200):
        if step == 3:
            ids[llm.add_request(PROMPTS[4], PARAMS[4])] = 4
        for out in llm.step():
            if out.finished:
                got[ids[out.request_id]] = _result(out)
        if len(got) == 3 and not llm.has_unfinished_requests():
            break
    assert got == {i: alone[arch][i] for i in (0, 2, 4)}


@pytest.mark.parametrize("arch", ARCHS)
def test_score_equals_the_generated_logprobs(arch, model_dirs, alone):
    llm = _exact(model_dirs[arch])
    for i in (1, 3, 4):  # processed at T without filters, scaled at T, raw (temperature 1)
        sp = PARAMS[i]
        temperature = 1.0 if sp.logprobs_mode == "raw" else sp.temperature
        for ids, lps, _ in alone[arch][i]:
            assert llm.score([PROMPTS[i] + ids], [len(PROMPTS[i])], temperature=temperature)[0] == lps


def _hf(model_dir) -> torch.nn.Module:
    """The trainer's model, on the device the engines run on (a GPU where there is one)."""
    from rollout.platforms import get_platform

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.to(get_platform(None).default_device())


@pytest.mark.parametrize("arch", ARCHS)
def test_trainer_forward_equals_the_engine_bitwise(arch, model_dirs, alone):
    hf = _hf(model_dirs[arch])
    fwd = ExactForward.for_module(hf)
    params = dict(hf.named_parameters())
    seqs, plens, want, temps = [], [], [], []
    for i in (1, 3, 4):
        sp = PARAMS[i]
        for ids, lps, _ in alone[arch][i]:
            seqs.append(PROMPTS[i] + ids)
            plens.append(len(PROMPTS[i]))
            want.append(lps)
            temps.append(1.0 if sp.logprobs_mode == "raw" else sp.temperature)
    for t in set(temps):
        idx = [j for j, tj in enumerate(temps) if tj == t]
        got = fwd.token_logprobs(params, [seqs[j] for j in idx], [plens[j] for j in idx], temperature=t)
        for j, g in zip(idx, got):
            assert g.tolist() == want[j], (arch, t, j)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_trainer_gradients_match_hf(arch, model_dirs):
    """The backward is autograd through the same ops: its gradients equal HF's within fp32
    reduction-order noise (rel. 1e-4 of the largest entry: both sum the same terms in
    different orders over ~100 tokens)."""
    seqs = [PROMPTS[0] + [7, 8, 9, 10], PROMPTS[2] + [3, 4]]
    plens = [len(PROMPTS[0]), len(PROMPTS[2])]
    hf = _hf(model_dirs[arch])
    ours = sum(lp.sum() for lp in ExactForward.for_module(hf).token_logprobs(dict(hf.named_parameters()), seqs, plens))
    ours.backward()
    g_ours = {n: p.grad.clone() for n, p in hf.named_parameters()}
    hf.zero_grad()
    total = 0.0
    for s, p in zip(seqs, plens):
        dev = next(hf.parameters()).device
        logits = hf(torch.tensor([s], device=dev)).logits[0, p - 1 : len(s) - 1].float()
        total = total + torch.log_softmax(logits, -1).gather(-1, torch.tensor(s[p:], device=dev)[:, None]).sum()
    total.backward()
    assert ours.item() == pytest.approx(total.item(), abs=1e-4)
    for n, p in hf.named_parameters():
        scale = p.grad.abs().max().item() + 1e-12
        assert (g_ours[n] - p.grad).abs().max().item() <= 1e-4 * scale, n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs exist only on a GPU")
def test_cuda_graphs_and_eager_are_bitwise_equal(model_dirs, alone):
    llm = _exact(model_dirs["llama"], enforce_eager=True)
    assert llm.stats().cuda_graph_sizes == ()
    assert [_result(llm.generate([p], sp)[0]) for p, sp in zip(PROMPTS, PARAMS)] == alone["llama"]


def test_bad_trainer_inputs_are_typed(model_dirs):
    from rollout.errors import InvalidRequestError, WeightUpdateError

    hf = _hf(model_dirs["llama"])
    fwd = ExactForward.for_module(hf)
    params = dict(hf.named_parameters())
    with pytest.raises(InvalidRequestError):
        fwd.token_logprobs(params, [[1, 2, 3]], [0])
    with pytest.raises(InvalidRequestError):
        fwd.token_logprobs(params, [[]], [1])
    with pytest.raises(InvalidRequestError):
        fwd.token_logprobs(params, [[1, 2]], [1], temperature=0.0)
    del params["model.norm.weight"]
    with pytest.raises(WeightUpdateError, match="model.norm.weight"):
        fwd.token_logprobs(params, [[1, 2, 3]], [1])


# ---- two ranks: TP=2 engines, and an FSDP2 trainer ------------------------------------------
def _tp_case(job: dict) -> dict:
    sps = [PARAMS[i] for i in (1, 2, 4)]
    prompts = [PROMPTS[i] for i in (1, 2, 4)]
    alone = [[_result(_exact(job["dir"], tensor_parallel_size=2).generate([p], sp)[0]) for p, sp in zip(prompts, sps)]
             for _ in range(2)]
    batched = [_result(o) for o in _exact(job["dir"], tensor_parallel_size=2, max_num_batched_tokens=9).generate(prompts, sps)]
    return {"run_to_run": alone[0] == alone[1], "batch_to_batch": batched == alone[0]}


def _fsdp2_case(job: dict) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = _hf(job["dir"])
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    sp = PARAMS[1]
    out = _exact(job["dir"]).generate([PROMPTS[0]], sp)[0].outputs[0]
    lps = ExactForward.for_module(model).token_logprobs(
        dict(model.named_parameters()), [PROMPTS[0] + out.token_ids], [len(PROMPTS[0])], temperature=sp.temperature,
    )[0]
    lps.sum().backward()
    grads_sharded = all(isinstance(p.grad, DTensor) for p in model.parameters())
    return {"sharded": sharded, "equal": lps.tolist() == out.token_logprobs, "grads_sharded": grads_sharded}


def _zero3_case(job: dict) -> dict:
    """ZeRO-3 partitions the parameters: the exact forward reads them inside a gather (no
    gradient: ZeRO-3 reduces gradients through its own module hooks, which a functional
    forward bypasses)."""
    try:
        import deepspeed
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        return {"skipped": f"deepspeed does not import: {type(e).__name__}: {e}"}
    from safetensors.torch import load_file

    deepspeed.init_distributed(dist_backend="gloo")  # reuses the initialised process group
    config = transformers.AutoConfig.from_pretrained(job["dir"])
    config.pad_token_id = None  # HF's init zeroes the padding row, which a partitioned param lacks
    with deepspeed.zero.Init(config_dict_or_path={"zero_optimization": {"stage": 3}, "train_batch_size": 2}):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    sd = load_file(os.path.join(job["dir"], "model.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
        if torch.distributed.get_rank() == 0:
            for name, p in params.items():
                p.copy_(sd[name])
    sp = PARAMS[1]
    out = _exact(job["dir"]).generate([PROMPTS[0]], sp)[0].outputs[0]
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(params.values())):
        lps = ExactForward.for_module(model, device="cpu").token_logprobs(
            params, [PROMPTS[0] + out.token_ids], [len(PROMPTS[0])], temperature=sp.temperature,
        )[0]
    return {"partitioned": all(p.numel() == 0 for p in model.parameters()), "equal": lps.tolist() == out.token_logprobs}


def _rank_main(rank: int, port: int, job_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with rank_job(rank, port, job_dir) as (job, res):
        res["tp"] = _tp_case(job)
        res["fsdp2"] = _fsdp2_case(job)
        res["zero3"] = _zero3_case(job)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, model_dirs):
    job_dir = tmp_path_factory.mktemp("exact_job")
    return run_job(__file__, {"dir": str(model_dirs["llama"])}, job_dir, timeout=240)


def test_tp2_is_invariant_batch_to_batch_and_run_to_run(two_ranks):
    for res in two_ranks:
        assert res["tp"] == {"run_to_run": True, "batch_to_batch": True}


def test_fsdp2_trainer_forward_equals_the_engine(two_ranks):
    for res in two_ranks:
        assert res["fsdp2"] == {"sharded": True, "equal": True, "grads_sharded": True}


def test_zero3_trainer_forward_equals_the_engine(two_ranks):
    for res in two_ranks:
        if "skipped" in res["zero3"]:
            pytest.skip(res["zero3"]["skipped"])
        assert res["zero3"] == {"partitioned": True, "equal": True}


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
