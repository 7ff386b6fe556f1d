"""Qwen3-MoE against HF transformers: routing and expert kernels, greedy tokens and logprobs,
routed experts, weight updates by HF names (per expert and stacked), TP=2 over gloo.

Run as a script (``python tests/test_qwen3_moe.py RANK PORT JOB_DIR``) it is one rank of
the two-process TP=2 job (see ``tests/helpers/two_ranks.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from rollout import LLM, SamplingParams
from rollout.kernels.moe import fused_moe_ref, route, route_weights
from rollout.models.backends import TORCH_OPS, AttentionMetadata, create_attention_backend
from rollout.models.forward_context import ForwardContext, set_forward_context
from rollout.models.layers.moe import ExpertRoutes, SparseMoeBlock
from rollout.models.qwen3_moe import sparse_layers
from rollout.models.weights import WeightMap
from tests.helpers.hf_oracle import HFOracle, random_prompt
from tests.helpers.two_ranks import rank_job, run_job

# Compares numbers across computations: run again with another thread count (.ci/run).
pytestmark = pytest.mark.numerics

VOCAB = 384
# Two configs: sparse step 1 with a dense layer from mlp_only_layers (MoE layers 0, 1, 3),
# renormalised top-k; sparse step 2 (MoE layers 1, 3), raw top-k probabilities.
CONFIGS = {
    "norm": dict(decoder_sparse_step=1, mlp_only_layers=[2], norm_topk_prob=True),
    "raw": dict(decoder_sparse_step=2, mlp_only_layers=[0], norm_topk_prob=False),
}
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
    eos_token_id=2, bos_token_id=None, pad_token_id=0,
)
NUM_TOKENS = 10
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
ENGINE_ARGS = {"dtype": "float32", "num_kv_blocks": 128}
TIMEOUT_S = 180
TP_PROMPTS = [[5, 17, 42, 99, 3], [7, 8, 9], [300, 1, 250, 12, 77, 64, 33]]


def build_moe_dir(name: str, path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random fp32 Qwen3-MoE of config ``name``, as tests/helpers/models.py builds the
    others: seeded weights (0.2 std keeps greedy argmax and the router's top-k off near-ties),
    ``save_pretrained`` (one tensor per expert on disk), the local tokenizer beside it."""
    config = transformers.Qwen3MoeConfig(**_COMMON, **CONFIGS[name])
    gen = torch.Generator().manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 if p.dim() > 1 else 1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    model.generation_config.eos_token_id = 2
    model.save_pretrained(path)
    for f in Path(tokenizer_dir).iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return path


def eager_oracle(path: Path) -> HFOracle:
    """HF's model with its eager experts loop (the numerics ``fused_moe_ref`` promises; on
    CPU HF would otherwise pick ``grouped_mm``)."""
    oracle = HFOracle(path)
    oracle.model.set_experts_implementation("eager")
    return oracle


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory, tokenizer_dir):
    return {name: build_moe_dir(name, tmp_path_factory.mktemp(f"moe_{name}"), tokenizer_dir) for name in CONFIGS}


@pytest.fixture(scope="module")
def moe_b_dir(tmp_path_factory, tokenizer_dir):
    return build_moe_dir("norm", tmp_path_factory.mktemp("moe_norm_b"), tokenizer_dir, seed=1)


@pytest.fixture(scope="module")
def oracles(moe_dirs):
    return {name: eager_oracle(path) for name, path in moe_dirs.items()}


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


# ---- kernels: route and fused_moe_ref against per-token loops and HF's modules --------------
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_matches_naive_loop_and_hf_router(renormalize, dtype):
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(13, 64, generator=gen).to(dtype), torch.randn(8, 64, generator=gen).to(dtype)
    logits = F.linear(hidden, weight)
    topk_weights, topk_ids = route(logits, 2, renormalize)
    assert topk_weights.dtype == torch.float32 and topk_ids.dtype == torch.int64
    for t in range(logits.shape[0]):  # naive: sort the fp32 softmax of the row
        probs = logits[t].float().softmax(-1)
        order = sorted(range(8), key=lambda e: -float(probs[e]))[:2]
        want = probs[order] / probs[order].sum() if renormalize else probs[order]
        assert topk_ids[t].tolist() == order
        torch.testing.assert_close(topk_weights[t], want, atol=1e-7, rtol=0)
    # HF's router: same ids, and its weights (cast to the logits' dtype) bitwise.
    config = transformers.Qwen3MoeConfig(**_COMMON, norm_topk_prob=renormalize)
    router = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter(config).to(dtype)
    with torch.no_grad():
        router.weight.copy_(weight)
        _, hf_weights, hf_ids = router(hidden)
    assert torch.equal(hf_ids, topk_ids)
    assert torch.equal(hf_weights, topk_weights.to(dtype))
    # Replay at the chosen ids gives the same weights bitwise.
    assert torch.equal(route_weights(logits, topk_ids, renormalize), topk_weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_ref_matches_naive_loop_and_hf_experts(dtype):
    gen = torch.Generator().manual_seed(1)
    num_tokens, hidden, inter, num_experts = 11, 64, 32, 8
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.2).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) * 0.2).to(dtype)
    topk_weights, topk_ids = route(torch.randn(num_tokens, num_experts, generator=gen), 2, True)
    out = fused_moe_ref(x, w13, w2, topk_weights, topk_ids)
    assert out.dtype == dtype
    naive = torch.zeros(num_tokens, hidden, dtype=torch.float64)
    for t in range(num_tokens):
        for j in range(2):
            e = int(topk_ids[t, j])
            gate, up = (w13[e].double() @ x[t].double()).chunk(2)
            naive[t] += float(topk_weights[t, j]) * (w2[e].double() @ (F.silu(gate) * up))
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.double(), naive, atol=tol, rtol=tol)
    # HF's eager experts loop: bitwise (same order of products and sums, same dtypes).
    config = transformers.Qwen3MoeConfig(**_COMMON)
    config._experts_implementation = "eager"
    experts = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts(config).to(dtype)
    with torch.no_grad():
        experts.gate_up_proj.copy_(w13)
        experts.down_proj.copy_(w2)
        assert torch.equal(experts(x, topk_ids, topk_weights.to(dtype)), out)


# ---- end to end against HF -----------------------------------------------------------------
def _prompts() -> list[list[int]]:
    prompts = [random_prompt(n, seed=5000 + n) for n in (1, 7, 16, 17, 60)]
    return prompts + [prompts[-1][:33] + random_prompt(5, seed=9)]  # shares a prefix


# Batch layouts: everything in one step, chunked prefill (several requests per step),
# small blocks, preemption (KV for about one sequence), each request alone.
LAYOUTS = {
    "one-step": dict(max_num_batched_tokens=8192, enable_prefix_caching=False),
    "chunked": dict(max_num_batched_tokens=13),
    "bs4": dict(block_size=4, max_num_batched_tokens=32),
    "preempt": dict(block_size=4, num_kv_blocks=20, max_num_batched_tokens=16),
}


@pytest.mark.parametrize("layout", [*LAYOUTS, "alone"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_hf(name, layout, moe_dirs, oracles):
    prompts = _prompts()
    llm = LLM(str(moe_dirs[name]), **{**ENGINE_ARGS, **LAYOUTS.get(layout, {})})
    if layout == "alone":
        outs = [llm.generate([p], GREEDY)[0] for p in prompts]
    else:
        outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == oracles[name].greedy(prompt, NUM_TOKENS), f"prompt of {len(prompt)}"
    if layout == "preempt":
        assert llm.stats().num_preemptions > 0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logprobs_match_hf(name, moe_dirs, oracles):
    """fp32 logprobs within 1e-4 of HF's: both sides sum in fp32 in different orders (paged
    attention vs HF's attention, chunked prefill, the batch's matmul shapes), which moves a
    logit by ~1e-6 relative; 1e-4 on a log-prob leaves two orders of margin (the bound
    test_e2e_hf uses). The routing is discrete: a router near-tie could flip an expert and
    move a logprob by far more; the seeded 0.2-std weights keep the top-k clear of ties
    (``test_routed_experts_match_hf`` checks the choices are HF's)."""
    oracle = oracles[name]
    prompts = [random_prompt(n, seed=6000 + n) for n in (1, 17, 50)]
    llm = LLM(str(moe_dirs[name]), **ENGINE_ARGS, max_num_batched_tokens=16)
    sp = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=3, prompt_logprobs=1)
    for prompt, out in zip(prompts, llm.generate(prompts, sp)):
        comp = out.outputs[0]
        assert comp.token_ids == oracle.greedy(prompt, NUM_TOKENS)
        lp = oracle.logprobs(prompt + comp.token_ids)  # row j predicts token j + 1
        n = len(prompt)
        want = lp[n - 1 : -1].gather(-1, torch.tensor(comp.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(comp.token_logprobs), want, atol=1e-4, rtol=0)
        for step, row in zip(comp.logprobs, lp[n - 1 : -1]):
            top = row.topk(3)
            assert set(step) == set(top.indices.tolist())
            for tid, val in zip(top.indices.tolist(), top.values.tolist()):
                assert step[tid].logprob == pytest.approx(val, abs=1e-4)
        for j in range(1, n):
            assert out.prompt_logprobs[j][prompt[j]].logprob == pytest.approx(float(lp[j - 1, prompt[j]]), abs=1e-4)


def test_live_module_equals_directory(moe_dirs, oracles, tokenizer_dir):
    """A transformers v5 module holds the experts stacked (``experts.gate_up_proj``): the
    WHOLE entries of the mapping load them."""
    hf = eager_oracle(moe_dirs["norm"]).model
    assert "model.layers.0.mlp.experts.gate_up_proj" in hf.state_dict()
    prompts = _prompts()
    sp = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=0)
    from_dir = LLM(str(moe_dirs["norm"]), **ENGINE_ARGS).generate(prompts, sp)
    from_module = LLM(hf, tokenizer=str(tokenizer_dir), **ENGINE_ARGS).generate(prompts, sp)
    for a, b in zip(from_dir, from_module):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].token_logprobs == b.outputs[0].token_logprobs


# ---- the weight mapping and updates by HF names --------------------------------------------
def test_weight_map_names_each_expert(moe_dirs):
    llm = LLM(str(moe_dirs["norm"]), **ENGINE_ARGS)
    wmap = WeightMap(llm.model)
    on_disk = load_file(moe_dirs["norm"] / "model.safetensors")
    assert sorted(wmap.required.values()) == sorted(on_disk)  # exactly the checkpoint's names
    target = wmap.resolve("model.layers.3.mlp.experts.5.up_proj.weight")
    assert (target.param_name, target.shard_id, tuple(target.expected_shape)) == (
        "model.layers.3.mlp.experts.w13", (5, "up"), (32, 64))
    assert wmap.resolve("model.layers.3.mlp.experts.8.up_proj.weight") is None  # no expert 8
    assert wmap.resolve("model.layers.2.mlp.experts.0.up_proj.weight") is None  # layer 2 is dense
    assert wmap.resolve("model.layers.3.mlp.experts.w13") is None  # the engine's own name
    whole = wmap.resolve("model.layers.3.mlp.experts.down_proj")
    assert (whole.param_name, tuple(whole.expected_shape)) == ("model.layers.3.mlp.experts.w2", (8, 64, 32))


def _params(llm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in llm.model.named_parameters()}


def test_update_weights_by_hf_names(moe_dirs, moe_b_dir):
    a_dir = moe_dirs["norm"]
    sd_a, sd_b = load_file(a_dir / "model.safetensors"), load_file(moe_b_dir / "model.safetensors")
    oracle_b = eager_oracle(moe_b_dir)
    prompts = _prompts()
    llm = LLM(str(a_dir), **ENGINE_ARGS)
    params_a = _params(llm)
    llm.update_weights(sd_b)  # every tensor, per expert
    assert _tokens(llm.generate(prompts, GREEDY)) == [oracle_b.greedy(p, NUM_TOKENS) for p in prompts]
    fresh_b = _params(LLM(str(moe_b_dir), **ENGINE_ARGS))
    assert all(torch.equal(p, fresh_b[n]) for n, p in _params(llm).items())
    llm.update_weights(sd_a)  # and back: bitwise A again
    assert all(torch.equal(p, params_a[n]) for n, p in _params(llm).items())
    # The stacked names of a transformers v5 module (B's), then A again per expert.
    llm.update_weights(oracle_b.model.state_dict())
    assert all(torch.equal(p, fresh_b[n]) for n, p in _params(llm).items())
    llm.update_weights(sd_a)
    assert all(torch.equal(p, params_a[n]) for n, p in _params(llm).items())


def test_partial_update_changes_one_expert(moe_dirs, moe_b_dir):
    sd_b = load_file(moe_b_dir / "model.safetensors")
    llm = LLM(str(moe_dirs["norm"]), **ENGINE_ARGS)
    before = _params(llm)
    layer, expert = 3, 5
    prefix = f"model.layers.{layer}.mlp.experts.{expert}."
    llm.update_weights({prefix + n: sd_b[prefix + n] for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")})
    after = _params(llm)
    w13, w2 = f"model.layers.{layer}.mlp.experts.w13", f"model.layers.{layer}.mlp.experts.w2"
    for name, p in after.items():
        if name not in (w13, w2):
            assert torch.equal(p, before[name]), name
    assert torch.equal(after[w13][expert], torch.cat([sd_b[prefix + "gate_proj.weight"], sd_b[prefix + "up_proj.weight"]]))
    assert torch.equal(after[w2][expert], sd_b[prefix + "down_proj.weight"])
    others = [e for e in range(8) if e != expert]
    assert torch.equal(after[w13][others], before[w13][others])
    assert torch.equal(after[w2][others], before[w2][others])
    # One projection only: just its rows of the stacked parameter.
    up = "model.layers.0.mlp.experts.2.up_proj.weight"
    llm.update_weights({up: sd_b[up]})
    w13_0 = _params(llm)["model.layers.0.mlp.experts.w13"]
    assert torch.equal(w13_0[2, :32], before["model.layers.0.mlp.experts.w13"][2, :32])
    assert torch.equal(w13_0[2, 32:], sd_b[up])


def test_streamed_stacked_update_and_sleep(moe_dirs, moe_b_dir):
    """A trainer's transformers v5 module streams stacked experts in small buckets; after
    sleep(2) an update by stacked names restores every weight (each stacked tensor covers
    all its experts' shards), and a stream cut off after some stacked tensors marks only
    the weights it did not reach stale."""
    from trainers_integration.sync import update_weights_in_buckets

    hf_a, hf_b = eager_oracle(moe_dirs["norm"]).model, eager_oracle(moe_b_dir).model
    llm = LLM(str(moe_dirs["norm"]), **ENGINE_ARGS)
    params_a = _params(llm)
    update_weights_in_buckets(llm, hf_b.state_dict().items(), bucket_bytes=8192)
    fresh_b = _params(LLM(str(moe_b_dir), **ENGINE_ARGS))
    assert all(torch.equal(p, fresh_b[n]) for n, p in _params(llm).items())
    llm.sleep(level=2)
    llm.wake_up()
    assert len(llm.worker.updater.missing_names) == len(load_file(moe_b_dir / "model.safetensors"))
    llm.update_weights(hf_a.state_dict())
    assert llm.worker.updater.missing_names == []
    assert all(torch.equal(p, params_a[n]) for n, p in _params(llm).items())
    reached = {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"}
    llm.mark_partial_update(reached)
    missing = set(llm.worker.updater.missing_names)
    assert not any(n.startswith("model.layers.0.mlp.experts.") for n in missing)
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in missing


# ---- routed experts --------------------------------------------------------------------------
def _engine_forward(model, tokens: list[int], routes: ExpertRoutes | None) -> torch.Tensor:
    """One prefill of ``tokens`` through the engine's model (torch attention, a fresh paged
    cache) with ``routes`` in the forward context; the logits [len, vocab]."""
    n, block_size = len(tokens), 16
    num_blocks = -(-n // block_size)
    cu, seq_lens = torch.tensor([0, n], dtype=torch.int32), torch.tensor([n], dtype=torch.int32)
    md = AttentionMetadata(
        slot_mapping=torch.arange(n), block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
        query_start_loc=cu, seq_lens=seq_lens, query_start_loc_cpu=cu, seq_lens_cpu=seq_lens,
        max_query_len=n, max_seq_len=n,
    )
    shape = (2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
    kv = [torch.zeros(shape) for _ in model.model.layers]
    ctx = ForwardContext(md, kv, create_attention_backend("torch"), TORCH_OPS, routes)
    with torch.no_grad(), set_forward_context(ctx):
        return model.compute_logits(model(torch.tensor(tokens), torch.arange(n)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_routed_experts_match_hf(name, moe_dirs, oracles):
    hf = oracles[name].model
    prompt = random_prompt(40, seed=77)
    chosen: dict[int, torch.Tensor] = {}
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda mod, args, out, i=i: chosen.__setitem__(i, out[2]))
        for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "gate")
    ]
    try:
        with torch.no_grad():
            hf(torch.tensor([prompt]))
    finally:
        for h in hooks:
            h.remove()
    moe_layers = sparse_layers(hf.config)
    assert sorted(chosen) == moe_layers
    model = LLM(str(moe_dirs[name]), **ENGINE_ARGS).model
    assert model.num_moe_layers == len(moe_layers)
    routes = ExpertRoutes(torch.full((len(moe_layers), 64, 2), -1, dtype=torch.int64))
    _engine_forward(model, prompt, routes)
    for idx, layer in enumerate(moe_layers):
        assert torch.equal(routes.topk_ids[idx, : len(prompt)], chosen[layer]), f"layer {layer}"
    assert (routes.topk_ids[:, len(prompt) :] == -1).all()  # rows past the step untouched


def test_routing_replay(moe_dirs):
    model = LLM(str(moe_dirs["norm"]), **ENGINE_ARGS).model
    prompt = random_prompt(30, seed=78)
    recorded = ExpertRoutes(torch.zeros(model.num_moe_layers, 30, 2, dtype=torch.int64))
    logits = _engine_forward(model, prompt, recorded)
    # Replaying the recorded routes reproduces the forward bitwise.
    replay = ExpertRoutes(recorded.topk_ids.clone(), replay=torch.ones(30, dtype=torch.bool))
    assert torch.equal(_engine_forward(model, prompt, replay), logits)
    assert torch.equal(replay.topk_ids, recorded.topk_ids)
    assert torch.equal(_engine_forward(model, prompt, None), logits)  # keeping routes changes nothing
    # Forced experts for some tokens: those rows take them, with the router's weights at them.
    block: SparseMoeBlock = model.model.layers[1].mlp
    h = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    forced = torch.tensor([[7, 6]] * 6)
    mask = torch.tensor([True, False, True, False, False, True])
    given = ExpertRoutes(forced[None].repeat(model.num_moe_layers, 1, 1).clone(), replay=mask)
    ctx = ForwardContext(None, [], create_attention_backend("torch"), TORCH_OPS, given)
    with torch.no_grad(), set_forward_context(ctx):
        out = block(h)
    with torch.no_grad():
        router_logits = block.gate(h)
        _, free_ids = route(router_logits, 2, True)
        ids = torch.where(mask[:, None], forced, free_ids)
        want = fused_moe_ref(h, block.experts.w13, block.experts.w2, route_weights(router_logits, ids, True), ids)
    assert torch.equal(given.topk_ids[block.moe_layer_idx], ids)  # what was used is recorded
    assert torch.equal(out, want)
    assert not torch.equal(ids, free_ids)  # the forced experts are not the router's


# ---- tensor parallelism: TP=2 over gloo equals TP=1 ------------------------------------------
def _rank_main(rank: int, port: int, job_dir: str) -> None:
    with rank_job(rank, port, job_dir) as (job, res):
        for name in CONFIGS:
            llm = LLM(job[name], tensor_parallel_size=2, **ENGINE_ARGS)
            res[name] = _tokens(llm.generate(TP_PROMPTS, GREEDY))
            if name == "norm":
                llm.update_weights(load_file(Path(job["b"]) / "model.safetensors"))
                res["after_update"] = _tokens(llm.generate(TP_PROMPTS, GREEDY))
                w13 = llm.model.model.layers[0].mlp.experts.w13
                res["w13_shape"] = list(w13.shape)
            del llm


def test_tensor_parallel_equals_one_rank(tmp_path_factory, moe_dirs, moe_b_dir):
    job = {name: str(path) for name, path in moe_dirs.items()}
    job["b"] = str(moe_b_dir)
    results = run_job(__file__, job, tmp_path_factory.mktemp("moe_tp"), timeout=TIMEOUT_S)
    for name in CONFIGS:
        want = _tokens(LLM(str(moe_dirs[name]), **ENGINE_ARGS).generate(TP_PROMPTS, GREEDY))
        assert results[0][name] == results[1][name] == want, name
    want_b = _tokens(LLM(str(moe_b_dir), **ENGINE_ARGS).generate(TP_PROMPTS, GREEDY))
    assert results[0]["after_update"] == results[1]["after_update"] == want_b
    assert results[0]["w13_shape"] == [8, 32, 64]  # each rank: half of every expert's 2 * 32 rows


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
