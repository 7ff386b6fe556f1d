"""Routing replay for MoE models: ``SamplingParams(return_routed_experts=True)`` and
``LLM.score(..., routed_experts=...)``.

- The routes returned (every prompt position's, and per generated token the position that
  sampled it) are HF's router choices over the same sequence (greedy, fp32).
- They do not depend on how the step was laid out: n > 1, preemption, chunked prefill.
- A prefix-cache hit returns the routes stored with the blocks it used; a block cached by a
  request that kept no routes is recomputed instead; blocks drop their routes when evicted.
- Scoring with a generation's routes gives that generation's logprobs; other routes change
  them. Bad routes are refused before any work, and so is a dense model asked for routes.
- Requests that do not ask see no change, and a step where nobody asks keeps no buffer.

Routes are discrete: they equal exactly across layouts unless a router's top-k is within
fp32 reduction noise of a tie, which the seeded 0.2-std weights of
``tests.test_qwen3_moe.build_moe_dir`` keep clear of (``test_routes_match_hf`` checks them).
"""

from __future__ import annotations

import pytest
import torch

from rollout import LLM, SamplingParams
from rollout.engine.kv_cache import KVCacheManager
from rollout.engine.request import Request
from rollout.errors import InvalidRequestError
from rollout.models.qwen3_moe import sparse_layers
from tests.helpers.hf_oracle import random_prompt
from tests.test_qwen3_moe import CONFIGS, build_moe_dir, eager_oracle

pytestmark = pytest.mark.numerics

ENGINE_ARGS = {"dtype": "float32", "num_kv_blocks": 128}
NUM_TOKENS = 8
ROUTED = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, return_routed_experts=True)
LAYOUTS = {
    "chunked": dict(max_num_batched_tokens=13),
    "preempt": dict(block_size=4, num_kv_blocks=20, max_num_batched_tokens=16),
}


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory, tokenizer_dir):
    return {name: build_moe_dir(name, tmp_path_factory.mktemp(f"rr_{name}"), tokenizer_dir) for name in CONFIGS}


def _prompts() -> list[list[int]]:
    return [random_prompt(n, seed=7000 + n) for n in (1, 9, 16, 33)]


def _hf_routes(hf, tokens: list[int]) -> list[list[list[int]]]:
    """HF's router choices over ``tokens`` in one forward: [position][moe_layer][k]."""
    chosen: dict[int, torch.Tensor] = {}
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda mod, args, out, i=i: chosen.__setitem__(i, out[2]))
        for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "gate")
    ]
    try:
        with torch.no_grad():
            hf(torch.tensor([tokens]))
    finally:
        for h in hooks:
            h.remove()
    assert sorted(chosen) == sparse_layers(hf.config)
    return torch.stack([chosen[i] for i in sorted(chosen)], 1).tolist()  # [T, L, k]


def _routes(out) -> tuple[list, list]:
    return out.prompt_routed_experts, out.outputs[0].routed_experts


def _alone(path, prompts, params=ROUTED, **kw) -> list:
    llm = LLM(str(path), **{**ENGINE_ARGS, "enable_prefix_caching": False, **kw})
    return [llm.generate([p], params)[0] for p in prompts]


@pytest.fixture(scope="module")
def alone(moe_dirs):
    return {name: _alone(path, _prompts()) for name, path in moe_dirs.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_routes_match_hf(name, moe_dirs, alone):
    hf = eager_oracle(moe_dirs[name]).model
    outs = LLM(str(moe_dirs[name]), **ENGINE_ARGS, max_num_batched_tokens=16).generate(_prompts(), ROUTED)
    for prompt, out in zip(_prompts(), outs):
        comp = out.outputs[0]
        want = _hf_routes(hf, prompt + comp.token_ids)  # position j: HF's experts there
        n = len(prompt)
        assert len(out.prompt_routed_experts) == n and len(comp.routed_experts) == NUM_TOKENS
        assert out.prompt_routed_experts == want[:n]
        assert comp.routed_experts == want[n - 1 : n - 1 + NUM_TOKENS]  # the sampling positions
        assert comp.routed_experts[0] == out.prompt_routed_experts[-1]
    assert [_routes(o) for o in outs] == [_routes(o) for o in alone[name]]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_routes_do_not_depend_on_the_layout(layout, moe_dirs, alone):
    llm = LLM(str(moe_dirs["norm"]), **{**ENGINE_ARGS, **LAYOUTS[layout]})
    outs = llm.generate(_prompts(), ROUTED)
    for out, ref in zip(outs, alone["norm"]):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        assert _routes(out) == _routes(ref)
    if layout == "preempt":
        assert llm.stats().num_preemptions > 0


def test_n_samples_equal_each_alone(moe_dirs):
    prompt = random_prompt(21, seed=71)
    sp = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=NUM_TOKENS, ignore_eos=True, return_routed_experts=True)
    out = LLM(str(moe_dirs["raw"]), **ENGINE_ARGS, max_num_batched_tokens=16).generate([prompt], sp)[0]
    singles = [_alone(moe_dirs["raw"], [prompt], sp.for_sample(i))[0] for i in range(3)]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # the samples differ
    for comp, single in zip(out.outputs, singles):
        assert comp.token_ids == single.outputs[0].token_ids
        assert comp.routed_experts == single.outputs[0].routed_experts
        assert out.prompt_routed_experts == single.prompt_routed_experts


def test_prefix_cache_hit_returns_the_stored_routes(moe_dirs):
    path = moe_dirs["norm"]
    base = random_prompt(30, seed=72)
    llm = LLM(str(path), **ENGINE_ARGS)
    a = llm.generate([base], ROUTED)[0]
    assert _routes(a) == _routes(_alone(path, [base])[0])
    # Same prompt again: block 0 (16 tokens) comes from the cache, with its routes.
    b = llm.generate([base], ROUTED)[0]
    assert b.num_cached_tokens == 16 and llm.stats().prefix_cache_hit_blocks == 1
    assert _routes(b) == _routes(a)
    # Next turn: blocks 0 and 1 of the first sequence (its prompt and 2 generated tokens)
    # are cached; their routes are the prompt's, then those of the positions that sampled
    # the outputs.
    turn2 = base + a.outputs[0].token_ids + random_prompt(9, seed=73)
    c = llm.generate([turn2], ROUTED)[0]
    assert c.num_cached_tokens == 32 and llm.stats().prefix_cache_hit_blocks == 3
    seq_routes = a.prompt_routed_experts + a.outputs[0].routed_experts[1:]
    assert c.prompt_routed_experts[:37] == seq_routes
    assert _routes(c) == _routes(_alone(path, [turn2])[0])
    llm.worker.scheduler.kv.pool.check_invariants()


def test_cached_blocks_without_routes_are_recomputed(moe_dirs):
    path = moe_dirs["norm"]
    prompt = random_prompt(40, seed=74)
    llm = LLM(str(path), **ENGINE_ARGS)
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True))[0]
    assert plain.prompt_routed_experts is None and plain.outputs[0].routed_experts is None
    routed = llm.generate([prompt], ROUTED)[0]
    assert routed.num_cached_tokens == 0  # the cached blocks kept no routes
    assert _routes(routed) == _routes(_alone(path, [prompt])[0])
    # A reset forgets the blocks and their routes.
    llm.reset_prefix_cache()
    assert all(b.routes is None for b in llm.worker.scheduler.kv.pool.blocks)


def test_evicted_blocks_drop_their_routes():
    """No model: a block's routes go with its hash when the block is reused."""
    kv = KVCacheManager(num_blocks=3, block_size=2)
    sp = SamplingParams(max_tokens=1, return_routed_experts=True)
    req = Request("a", [5, 6, 7, 8, 9], sp, max_num_tokens=64)
    assert kv.allocate_slots(req, 5)
    kv.cache_blocks(req, 5)
    req.prompt_routed_experts = [[[p, p + 1]] for p in range(5)]
    kv.store_routes(req)
    blocks = kv.pool.blocks
    assert [b.routes for b in blocks[:2]] == [[[[0, 1]], [[1, 2]]], [[[2, 3]], [[3, 4]]]] and blocks[2].routes is None
    kv.free(req)
    again = Request("b", [5, 6, 7, 8, 1], sp, max_num_tokens=64)
    hits, num_hit = kv.get_computed_blocks(again)
    assert num_hit == 4 and kv.allocate_slots(again, 1, hits)
    assert again.prompt_routed_experts == req.prompt_routed_experts[:4]
    kv.free(again)
    other = Request("c", [1, 2, 3, 4, 1, 2], sp, max_num_tokens=64)
    assert kv.allocate_slots(other, 6)  # takes every block, evicting the cached ones
    assert all(b.routes is None and b.block_hash is None for b in blocks)
    kv.pool.check_invariants()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_score_replays_the_routes_of_a_generation(name, moe_dirs):
    """Replaying a generation's routes gives its logprobs within 1e-5: the same experts at
    every position, so only fp32 reduction order differs (the generation's decode steps and
    chunks vs one prefill), which moves a logprob by ~1e-6 here (test_qwen3_moe allows 1e-4
    against HF). Other experts move them by orders of magnitude more."""
    llm = LLM(str(moe_dirs[name]), **ENGINE_ARGS, max_num_batched_tokens=16)
    sp = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=0, return_routed_experts=True)
    prompts = [random_prompt(n, seed=7100 + n) for n in (5, 23)]
    outs = llm.generate(prompts, sp)
    seqs = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs)]
    routes = [o.prompt_routed_experts + o.outputs[0].routed_experts[1:] for o in outs]  # one per position but the last
    lens = [len(p) for p in prompts]
    got = llm.score(seqs, lens, routed_experts=routes)
    for g, o in zip(got, outs):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(o.outputs[0].token_logprobs), atol=1e-5, rtol=0)
    # A route for the last position too (its logits score nothing): it only moves which
    # tokens share an expert's matmul, so the rest within reduction noise.
    full = [r + [r[-1]] for r in routes]
    for a, b in zip(llm.score(seqs, lens, routed_experts=full), got):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    num_experts = llm.hf_config.num_experts
    shifted = [[[[(e + 1) % num_experts for e in ids] for ids in pos] for pos in r] for r in routes]
    moved = llm.score(seqs, lens, routed_experts=shifted)
    assert max(abs(a - b) for g, m in zip(got, moved) for a, b in zip(g, m)) > 1e-2
    # Mixed: a None entry follows the router.
    mixed = llm.score(seqs, lens, routed_experts=[None, shifted[1]])
    torch.testing.assert_close(torch.tensor(mixed[0]), torch.tensor(got[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(mixed[1]), torch.tensor(moved[1]), atol=1e-5, rtol=0)


def test_bad_routes_and_dense_models_are_refused(moe_dirs, llama_dir):
    with pytest.raises(InvalidRequestError, match="return_routed_experts"):
        SamplingParams(return_routed_experts=1)
    dense = LLM(str(llama_dir), dtype="float32", num_kv_blocks=32)
    with pytest.raises(InvalidRequestError, match="no MoE layers"):
        dense.generate([[5, 6, 7]], ROUTED)
    with pytest.raises(InvalidRequestError, match="no MoE layers"):
        dense.score([[5, 6, 7]], routed_experts=[[[[0]]] * 2])
    assert not dense.has_unfinished_requests()

    llm = LLM(str(moe_dirs["norm"]), **ENGINE_ARGS)
    seq = random_prompt(6, seed=75)
    good = llm.generate([seq[:5]], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, return_routed_experts=True))[0]
    routes = good.prompt_routed_experts  # 5 positions: one per position but the last
    num_layers, k = len(routes[0]), len(routes[0][0])
    steps = llm.stats().num_steps
    bad = {
        "count": [routes, routes],
        "short": [routes[:3]],
        "long": [routes + routes[:2]],
        "layers": [[pos[:-1] for pos in routes]],
        "k": [[[ids[:1] for ids in pos] for pos in routes]],
        "range": [[[[8, 0]] * num_layers] + routes[1:]],
        "negative": [[[[-1, 0]] * num_layers] + routes[1:]],
        "duplicate": [[[[3, 3]] * num_layers] + routes[1:]],
        "float": [torch.zeros(5, num_layers, k)],
        "ragged": [[[[1, 2]], [[1, 2], [3, 4]]]],
        "not a list": "routes",
    }
    for what, r in bad.items():
        with pytest.raises(InvalidRequestError, match="routed_experts"):
            llm.score([seq], [3], routed_experts=r)
        assert llm.stats().num_steps == steps and not llm.has_unfinished_requests(), what
    assert llm.score([seq], [3], routed_experts=[torch.tensor(routes)])  # a tensor is taken too


def test_requests_that_do_not_ask_see_no_change(moe_dirs):
    path = moe_dirs["raw"]
    plain = SamplingParams(temperature=0.9, seed=3, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=2)
    asking = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, return_routed_experts=True)
    not_asking = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    prompts = _prompts() + _prompts()[:2]
    num = len(prompts) - 2
    nobody = LLM(str(path), **ENGINE_ARGS, max_num_batched_tokens=16)
    ref = nobody.generate(prompts, [plain] * num + [not_asking] * 2)
    assert nobody.worker.runner.routes._buffer is None  # no step kept routes
    # The same batch where two requests ask: every step has the same rows and numerics.
    mixed = LLM(str(path), **ENGINE_ARGS, max_num_batched_tokens=16)
    outs = mixed.generate(prompts, [plain] * num + [asking] * 2)
    for o, r in zip(outs, ref):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        assert o.outputs[0].token_logprobs == r.outputs[0].token_logprobs
    for o in outs[:num]:
        assert o.prompt_routed_experts is None and o.outputs[0].routed_experts is None
    assert all(o.prompt_routed_experts is not None for o in outs[num:])


def test_delta_outputs_carry_the_new_routes_once(moe_dirs, alone):
    llm = LLM(str(moe_dirs["norm"]), **ENGINE_ARGS, max_num_batched_tokens=16)
    prompt = _prompts()[3]
    llm.add_request(prompt, SamplingParams(**{**vars(ROUTED), "output_kind": "delta"}), request_id="d")
    routes, prompt_routes = [], []
    while llm.has_unfinished_requests():
        for out in llm.step():
            routes += out.outputs[0].routed_experts
            if out.prompt_routed_experts is not None:
                prompt_routes.append(out.prompt_routed_experts)
    assert prompt_routes == [alone["norm"][3].prompt_routed_experts]  # once, whole
    assert routes == alone["norm"][3].outputs[0].routed_experts
