"""Exact on-policy mode (``LLM(batch_invariant=True)``) for Qwen3-MoE: what it promises, bit for bit.

- The router is per token: ``route`` / ``route_weights`` of a row equal that row alone.
- The invariant experts: ``invariant.fused_moe_rows`` (CPU) and
  ``triton_invariant.fused_moe_invariant`` (GPU; here in Triton's interpreter) give each
  token bitwise the result it gets alone or in any other batch, close to ``fused_moe_ref``,
  with ``fused_moe_ref``'s gradients.
- A request's tokens and logprobs are bitwise the same alone, in a batch, chunked,
  preempted and after a prefix-cache hit; with routes recorded too, and ``score()`` with
  those routes returns them.
- ``ExactForward`` over the trainer's HF module (transformers v5: stacked experts) or
  per-expert tensors returns the engine's logprobs bitwise; gradients reach every expert
  weight and the router, and equal HF's within fp32 reduction noise.

Equalities are ``==`` on fp32 values where the mode promises them by construction.
"""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from safetensors.torch import load_file  # noqa: E402

from rollout import LLM, SamplingParams  # noqa: E402
from rollout.kernels.invariant import fused_moe_rows  # noqa: E402
from rollout.kernels.moe import fused_moe_ref, route, route_weights  # noqa: E402
from tests.helpers.hf_oracle import random_prompt  # noqa: E402
from tests.test_qwen3_moe import build_moe_dir, eager_oracle  # noqa: E402
from trainers_integration.exact import ExactForward  # noqa: E402

pytestmark = pytest.mark.numerics

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# "norm": 4 layers (layer 2 dense), 8 experts, top-2 renormalised, hidden 64, I 32.
PROMPTS = [random_prompt(n, seed=8000 + n) for n in (40, 3, 23, 17)]
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=8, logprobs=2),
    SamplingParams(temperature=0.8, max_tokens=10, logprobs=0, seed=5),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.9, max_tokens=8, logprobs=1, seed=11),
    SamplingParams(temperature=1.2, max_tokens=8, logprobs=0, seed=8, logprobs_mode="raw", n=2),
]


def _exact(path, **kw) -> LLM:
    kw.setdefault("num_kv_blocks", 64)
    return LLM(str(path), dtype="float32", batch_invariant=True, **kw)


def _result(out):
    return [(c.token_ids, c.token_logprobs, [sorted(d) for d in (c.logprobs or [])]) for c in out.outputs]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tokenizer_dir):
    return build_moe_dir("norm", tmp_path_factory.mktemp("exact_moe"), tokenizer_dir)


@pytest.fixture(scope="module")
def alone(moe_dir):
    """Each (prompt, params) pair generated alone on a fresh engine."""
    return [_result(_exact(moe_dir).generate([p], sp)[0]) for p, sp in zip(PROMPTS, PARAMS)]


# ---- kernels -------------------------------------------------------------------------------
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (128, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_rows_do_not_depend_on_the_batch(num_experts, top_k, dtype):
    """Softmax, top-k and the renormalising sum run row by row: a row routes alike alone
    and at any place in batches of several sizes, ties included (rows of equal logits)."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(300, num_experts, generator=gen) * 3).to(dtype)
    logits[7] = logits[7, 0]  # every expert tied
    logits[150, : 2 * top_k] = logits[150, 0]
    logits = logits.to(DEVICE)
    for renormalize in (True, False):
        one = [route(logits[i : i + 1], top_k, renormalize) for i in range(logits.shape[0])]
        for start, size in ((0, 300), (5, 64), (140, 17), (299, 1)):
            w, ids = route(logits[start : start + size], top_k, renormalize)
            assert torch.equal(ids, torch.cat([one[i][1] for i in range(start, start + size)]))
            assert torch.equal(w, torch.cat([one[i][0] for i in range(start, start + size)]))
            replayed = route_weights(logits[start : start + size], ids.flip(-1), renormalize)
            alone_replayed = [route_weights(logits[i : i + 1], ids[i - start : i - start + 1].flip(-1), renormalize)
                              for i in range(start, start + size)]
            assert torch.equal(replayed, torch.cat(alone_replayed))


def _moe_inputs(dtype, num_tokens=70, num_experts=4, hidden=64, inter=32, top_k=2, seed=1):
    """x, w13, w2 and a routing that sends most tokens to expert 0 (its pairs fill more
    than one 64-pair block of the Triton kernel)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.2).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) * 0.2).to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    logits[: num_tokens - 4, 0] += 10.0
    topk_weights, topk_ids = route(logits, top_k, True)
    return [t.to(DEVICE) for t in (x, w13, w2, topk_weights, topk_ids)]


def _check_per_token(fused_moe, x, w13, w2, topk_weights, topk_ids):
    """Every token's output row in the full batch == alone == in sub-batches at several
    offsets, bitwise; the full batch close to the reference."""
    full = fused_moe(x, w13, w2, topk_weights, topk_ids)
    n = x.shape[0]
    for i in (0, 1, 31, n // 2, n - 1):
        assert torch.equal(fused_moe(x[i : i + 1], w13, w2, topk_weights[i : i + 1], topk_ids[i : i + 1]),
                           full[i : i + 1]), i
    for start, size in ((3, 5), (10, 40), (n - 9, 9)):
        rows = slice(start, start + size)
        assert torch.equal(fused_moe(x[rows], w13, w2, topk_weights[rows], topk_ids[rows]), full[rows]), (start, size)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    shuffled = fused_moe(x[perm], w13, w2, topk_weights[perm], topk_ids[perm])
    assert torch.equal(shuffled, full[perm])
    # fp32: GEMM summation order only (K = 64, 32); bf16: an output rounding or two.
    tol = dict(atol=1e-5, rtol=1e-5) if x.dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(full, fused_moe_ref(x, w13, w2, topk_weights, topk_ids), **tol)


def _check_grads_are_the_reference(fused_moe, x, w13, w2, topk_weights, topk_ids):
    """Differentiable in x, both expert weights and the routing weights; fp32 gradients
    equal the reference's within 1e-5 of their largest entry (the same terms: the weight
    gradients sum ~70 tokens' in another order, a few ulps; the Triton op's backward is
    the reference's autograd itself)."""
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w13, w2, topk_weights)]
        out = fn(*leaves, topk_ids)
        (out * g).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    out, got = grads(fused_moe)
    assert torch.equal(out, fused_moe(x, w13, w2, topk_weights, topk_ids))  # same bits under autograd
    _, want = grads(fused_moe_ref)
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_rows_is_per_token(dtype):
    inputs = _moe_inputs(dtype)
    _check_per_token(fused_moe_rows, *inputs)
    if dtype == torch.float32:
        _check_grads_are_the_reference(fused_moe_rows, *inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_fused_moe_invariant_is_per_token(dtype):
    """The fixed-tiling Triton MoE (interpreted off GPU): expert 0's pairs span two blocks,
    so tokens move between blocks and rows from batch to batch."""
    pytest.importorskip("triton")
    from rollout.kernels import triton_invariant
    from rollout.models.backends import get_ops

    if DEVICE.type == "cpu":
        if not os.environ.get("TRITON_INTERPRET"):
            pytest.skip("triton kernels were compiled before TRITON_INTERPRET was set")
        from rollout.kernels import triton_moe

        assert type(triton_moe._moe_gate_up_kernel).__name__ == "InterpretedFunction"
    inputs = _moe_inputs(dtype)
    assert int((inputs[4] == 0).sum()) > 64
    _check_per_token(triton_invariant.fused_moe_invariant, *inputs)
    if dtype == torch.float32:
        _check_grads_are_the_reference(triton_invariant.fused_moe_invariant, *inputs)
    assert get_ops("triton_invariant").fused_moe is triton_invariant.fused_moe_invariant


# ---- the engine ----------------------------------------------------------------------------
LAYOUTS = [
    {},
    {"max_num_batched_tokens": 7},  # prompts chunked into pieces of 7 and less
    {"block_size": 4, "num_kv_blocks": 24, "max_num_batched_tokens": 16, "enable_prefix_caching": False},  # preemption
]


def test_a_request_is_bitwise_the_same_in_any_batch(moe_dir, alone):
    rng = random.Random(0)
    for layout in LAYOUTS:
        llm = _exact(moe_dir, **layout)
        for _ in range(2):  # the second round hits the prefix cache of the first
            order = rng.sample(range(len(PROMPTS)), k=len(PROMPTS))
            outs = llm.generate([PROMPTS[i] for i in order], [PARAMS[i] for i in order])
            for i, out in zip(order, outs):
                assert _result(out) == alone[i], (layout, i)
        if layout.get("num_kv_blocks") == 24:
            assert llm.stats().num_preemptions > 0, "the layout meant to force preemption did not"
        elif layout.get("enable_prefix_caching", True):
            assert llm.stats().prefix_cache_hit_blocks > 0


def test_next_turn_after_a_prefix_hit_equals_a_fresh_engine(moe_dir):
    """A second turn reuses the cached blocks of the first (prompt and generated tokens):
    its output equals that whole prompt on a fresh engine."""
    sp = PARAMS[1]
    llm = _exact(moe_dir)
    first = llm.generate([PROMPTS[0]], sp)[0].outputs[0]
    turn2 = PROMPTS[0] + first.token_ids + random_prompt(5, seed=81)
    out = llm.generate([turn2], sp)[0]
    assert out.num_cached_tokens == 48
    assert _result(out) == _result(_exact(moe_dir).generate([turn2], sp)[0])


def test_routes_recorded_and_replayed_in_exact_mode(moe_dir, alone):
    """Recording routes (batched, chunked) changes no bit of a request's tokens and
    logprobs; ``score`` replaying them returns the generation's logprobs bitwise."""
    idx = (1, 3)  # processed logprobs at T without filters; raw (temperature 1)
    routed = [dataclasses.replace(PARAMS[i], return_routed_experts=True) for i in idx]
    llm = _exact(moe_dir, max_num_batched_tokens=7)
    batched = llm.generate([PROMPTS[i] for i in idx], routed)
    for i, out in zip(idx, batched):
        assert _result(out) == alone[i]
        assert len(out.prompt_routed_experts) == len(PROMPTS[i])
        temperature = 1.0 if PARAMS[i].logprobs_mode == "raw" else PARAMS[i].temperature
        for c in out.outputs:
            routes = out.prompt_routed_experts + c.routed_experts[1:]
            got = llm.score([PROMPTS[i] + c.token_ids], [len(PROMPTS[i])], temperature=temperature,
                            routed_experts=[routes])[0]
            assert got == c.token_logprobs


# ---- the trainer's forward -----------------------------------------------------------------
def _hf(path) -> torch.nn.Module:
    """The trainer's model (HF's eager experts loop), on the device the engines run on."""
    from rollout.platforms import get_platform

    return eager_oracle(path).model.to(get_platform(None).default_device())


def _scored(alone):
    """(sequences, prompt lengths, engine logprobs) by temperature, of the no-filter params."""
    by_t: dict[float, tuple[list, list, list]] = {}
    for i in (1, 3):
        sp = PARAMS[i]
        t = 1.0 if sp.logprobs_mode == "raw" else sp.temperature
        for ids, lps, _ in alone[i]:
            seqs, plens, want = by_t.setdefault(t, ([], [], []))
            seqs.append(PROMPTS[i] + ids)
            plens.append(len(PROMPTS[i]))
            want.append(lps)
    return by_t


def test_trainer_forward_equals_the_engine_bitwise(moe_dir, alone):
    hf = _hf(moe_dir)
    assert "model.layers.0.mlp.experts.gate_up_proj" in dict(hf.named_parameters())  # stacked (v5)
    fwd = ExactForward.for_module(hf)
    stacked = dict(hf.named_parameters())
    per_expert = {n: t.to(fwd.device) for n, t in load_file(moe_dir / "model.safetensors").items()}
    assert "model.layers.0.mlp.experts.5.up_proj.weight" in per_expert
    # Both layouts build the engine's own parameters, bit for bit.
    engine = dict(_exact(moe_dir).model.named_parameters())
    for params in (stacked, per_expert):
        built = fwd.engine_params(params)
        assert built.keys() == engine.keys()
        assert all(torch.equal(built[n].cpu(), engine[n].detach().cpu()) for n in engine)
    for t, (seqs, plens, want) in _scored(alone).items():
        got = fwd.token_logprobs(stacked, seqs, plens, temperature=t)
        assert [g.tolist() for g in got] == want, t
    del per_expert["model.layers.3.mlp.experts.7.down_proj.weight"]
    from rollout.errors import WeightUpdateError

    with pytest.raises(WeightUpdateError, match=r"experts\.7\.down_proj.*experts\.down_proj"):
        fwd.token_logprobs(per_expert, [PROMPTS[1]], [1])


def test_trainer_gradients_reach_the_experts_and_match_hf(moe_dir):
    """Gradients flow through the stacking into every expert weight and through the routing
    weights into the router; they equal HF's within fp32 reduction-order noise (rel. 1e-4
    of the largest entry, as for the dense models: the same terms in other orders over ~70
    tokens; the routes are the same, the seeded weights keep the router off near-ties).
    Per-expert leaves get the same gradients as the stacked parameters' slices."""
    seqs = [PROMPTS[0] + [7, 8, 9, 10], PROMPTS[2] + [3, 4]]
    plens = [len(PROMPTS[0]), len(PROMPTS[2])]
    hf = _hf(moe_dir)
    dev = next(hf.parameters()).device
    fwd = ExactForward.for_module(hf)
    ours = sum(lp.sum() for lp in fwd.token_logprobs(dict(hf.named_parameters()), seqs, plens))
    ours.backward()
    g_ours = {n: p.grad.clone() for n, p in hf.named_parameters()}
    hf.zero_grad()
    total = 0.0
    for s, p in zip(seqs, plens):
        logits = hf(torch.tensor([s], device=dev)).logits[0, p - 1 : len(s) - 1].float()
        total = total + torch.log_softmax(logits, -1).gather(-1, torch.tensor(s[p:], device=dev)[:, None]).sum()
    total.backward()
    assert ours.item() == pytest.approx(total.item(), abs=1e-4)
    for n, p in hf.named_parameters():
        scale = p.grad.abs().max().item() + 1e-12
        assert (g_ours[n] - p.grad).abs().max().item() <= 1e-4 * scale, n
    # Every expert a token was sent to has a gradient (HF's: the same experts), the router all rows.
    num_reached = 0
    for layer in (0, 1, 3):
        for part in ("experts.gate_up_proj", "experts.down_proj", "gate.weight"):
            name = f"model.layers.{layer}.mlp.{part}"
            reached = g_ours[name].flatten(1).abs().amax(-1) > 0  # [num_experts]
            assert torch.equal(reached, dict(hf.named_parameters())[name].grad.flatten(1).abs().amax(-1) > 0), name
            assert part != "gate.weight" or bool(reached.all()), name
            num_reached += int(reached.sum()) if part == "experts.down_proj" else 0
    assert num_reached >= 20  # of 3 layers x 8 experts
    # Per-expert tensors (transformers 4 modules, checkpoints) as the trainer's leaves.
    leaves = {n: t.to(dev).requires_grad_() for n, t in load_file(moe_dir / "model.safetensors").items()}
    sum(lp.sum() for lp in fwd.token_logprobs(leaves, seqs, plens)).backward()
    stacked = g_ours["model.layers.3.mlp.experts.gate_up_proj"]
    for e in range(8):
        pre = f"model.layers.3.mlp.experts.{e}."
        torch.testing.assert_close(leaves[pre + "gate_proj.weight"].grad, stacked[e, :32])
        torch.testing.assert_close(leaves[pre + "up_proj.weight"].grad, stacked[e, 32:])
        torch.testing.assert_close(leaves[pre + "down_proj.weight"].grad, g_ours["model.layers.3.mlp.experts.down_proj"][e])


def test_trainer_forward_refuses_an_fp8_config(moe_dir):
    """The engine refuses exact mode with quantization (config.py); so does ExactForward,
    with the same typed error, before building anything (an FP8 config's block scales have
    no trainer tensors to be built from)."""
    import transformers

    from rollout.errors import UnsupportedFeatureError
    from rollout.models.quantization import FP8_QUANTIZATION_CONFIG

    config = transformers.AutoConfig.from_pretrained(moe_dir)
    config.quantization_config = dict(FP8_QUANTIZATION_CONFIG)
    with pytest.raises(UnsupportedFeatureError, match="quantization 'fp8'"):
        ExactForward(config, dtype=torch.float32, device=DEVICE)
