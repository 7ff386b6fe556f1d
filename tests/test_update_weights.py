"""In-place weight updates on CPU: A -> B -> A round trip, every input form and dtype, fused
and tied names, partial updates, failures that leave the old weights, the prefix cache reset
and weight_version. fp32 throughout, so "equal" means bitwise."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rollout.errors import CheckpointError, InvalidRequestError, WeightUpdateError
from tests.helpers.engine_state import (
    GREEDY,
    PROMPTS,
    changed,
    greedy,
    make_llm,
    model_dir_with,
    params_of,
    snapshot,
)

Q0 = "model.layers.0.self_attn.q_proj.weight"
K0 = "model.layers.0.self_attn.k_proj.weight"
V0 = "model.layers.0.self_attn.v_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"
NORM = "model.norm.weight"
EMBED = "model.embed_tokens.weight"


# a_dir, b_dir, sd_a, sd_b, a_out, b_out: the A/B model fixtures in conftest.py


@pytest.fixture(scope="module")
def b_params(b_dir):
    return snapshot(make_llm(b_dir))


# ---- round trip, input forms, dtypes, names ---------------------------------------------
def test_round_trip_a_b_a(a_dir, sd_a, sd_b, a_out, b_out, b_params):
    llm = make_llm(a_dir)
    before = snapshot(llm)
    assert greedy(llm) == a_out
    assert llm.update_weights(sd_b) == len(sd_b)
    assert greedy(llm) == b_out  # tokens and fp32 logprobs, exactly
    assert changed(b_params, snapshot(llm)) == set()
    llm.update_weights(sd_a)
    assert greedy(llm) == a_out
    assert changed(before, snapshot(llm)) == set()


@pytest.mark.parametrize("form", ["dict", "pairs", "tuple-of-lists", "generator"])
def test_update_accepts_every_iterable(form, a_dir, sd_b, b_out, b_params):
    llm = make_llm(a_dir)
    named = {
        "dict": lambda: sd_b,
        "pairs": lambda: list(sd_b.items()),
        "tuple-of-lists": lambda: tuple([n, t] for n, t in sd_b.items()),
        "generator": lambda: ((n, t) for n, t in sd_b.items()),
    }[form]()
    assert llm.update_weights(named) == len(sd_b)
    assert changed(b_params, snapshot(llm)) == set()
    assert greedy(llm) == b_out


def test_trainer_dtype_is_cast(a_dir, sd_b, tmp_path):
    """bf16 tensors into an fp32 engine: the values are the bf16 values, cast."""
    llm = make_llm(a_dir)
    llm.update_weights({n: t.bfloat16() for n, t in sd_b.items()})
    ref = make_llm(model_dir_with(a_dir, {n: t.bfloat16().float() for n, t in sd_b.items()}, tmp_path / "b_bf16"))
    assert changed(snapshot(ref), snapshot(llm)) == set()
    assert greedy(llm) == greedy(ref)


def test_non_contiguous_tensors(a_dir, sd_b, b_params):
    llm = make_llm(a_dir)
    llm.update_weights({n: t.t().contiguous().t() if t.dim() == 2 else t for n, t in sd_b.items()})
    assert changed(b_params, snapshot(llm)) == set()


def test_fused_shards_update_only_their_rows(a_dir, sd_a, sd_b, tmp_path):
    """k_proj fills only its rows of the fused qkv_proj, up_proj only its rows of gate_up_proj."""
    llm = make_llm(a_dir)
    before = snapshot(llm)
    update = {K0: sd_b[K0], UP1: sd_b[UP1]}
    assert llm.update_weights(update) == 2
    after = snapshot(llm)
    assert changed(before, after) == {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight"}
    ref = make_llm(model_dir_with(a_dir, {**sd_a, **update}, tmp_path / "a_kb"))
    assert changed(snapshot(ref), after) == set()
    assert greedy(llm) == greedy(ref)


@pytest.mark.parametrize("arch", ["llama3_tied", "qwen2"])
@pytest.mark.parametrize("name", [EMBED, "lm_head.weight"])
def test_tied_embedding_updates_lm_head(arch, name, model_dirs, tmp_path):
    model_dir = model_dirs[arch]
    llm = make_llm(model_dir)
    params = params_of(llm)
    assert params["lm_head.weight"] is params[EMBED]
    before = snapshot(llm)
    new = torch.randn(before[EMBED].shape, generator=torch.Generator().manual_seed(7)) * 0.2
    assert llm.update_weights([(name, new)]) == 1
    after = snapshot(llm)
    assert changed(before, after) == {EMBED, "lm_head.weight"}
    assert torch.equal(after["lm_head.weight"], new) and torch.equal(after[EMBED], new)
    ref = make_llm(model_dir_with(model_dir, {**load_file(model_dir / "model.safetensors"), EMBED: new}, tmp_path / "ref"))
    assert greedy(llm) == greedy(ref)


def test_tied_embedding_under_both_names_takes_the_embedding(model_dirs):
    llm = make_llm(model_dirs["qwen2"])
    shape = params_of(llm)[EMBED].shape
    embed, head = torch.full(shape, 0.5), torch.full(shape, -0.5)
    assert llm.update_weights([(EMBED, embed), ("lm_head.weight", head)]) == 1
    assert torch.equal(params_of(llm)["lm_head.weight"], embed)


def test_partial_update_changes_only_named_weights(a_dir, sd_a, sd_b, tmp_path):
    llm = make_llm(a_dir)
    before = snapshot(llm)
    update = {Q0: sd_b[Q0], DOWN1: sd_b[DOWN1], NORM: sd_b[NORM]}
    assert llm.update_weights(update) == 3
    after = snapshot(llm)
    assert changed(before, after) == {"model.layers.0.self_attn.qkv_proj.weight", DOWN1, NORM}
    ref = make_llm(model_dir_with(a_dir, {**sd_a, **update}, tmp_path / "partial"))
    assert changed(snapshot(ref), after) == set()


# ---- failures leave A -------------------------------------------------------------------
def _replace_last(sd, tensor):
    items = list(sd.items())
    items[-1] = (items[-1][0], tensor)
    return items


BAD_UPDATES = [
    # id, named tensors built from B's state dict, fragment of the message
    ("unknown", lambda sd: {"model.layers.0.mlp.extra_proj.weight": torch.zeros(4, 4)},
     "unexpected tensor 'model.layers.0.mlp.extra_proj.weight' (shape (4, 4))"),
    ("unknown-layer-last", lambda sd: [*sd.items(), ("model.layers.2.input_layernorm.weight", torch.ones(64))],
     "unexpected tensor 'model.layers.2.input_layernorm.weight'"),
    ("misshaped", lambda sd: {V0: torch.zeros(16, 64)}, f"tensor {V0!r} has shape (16, 64), expected (32, 64)"),
    ("misshaped-last", lambda sd: _replace_last(sd, torch.zeros(63)), "has shape (63,), expected (64,)"),
    ("misshaped-last-generator", lambda sd: iter(_replace_last(sd, torch.zeros(63))), "has shape (63,), expected (64,)"),
    ("int-dtype", lambda sd: {NORM: torch.ones(64, dtype=torch.int32)},
     f"tensor {NORM!r} has dtype torch.int32, expected a floating-point dtype"),
    ("bool-dtype-last", lambda sd: _replace_last(sd, torch.ones(64, dtype=torch.bool)), "has dtype torch.bool"),
    ("twice", lambda sd: [(Q0, sd[Q0]), (Q0, sd[Q0])], f"tensor {Q0!r} given twice"),
    ("twice-after-all", lambda sd: [*sd.items(), (Q0, sd[Q0])], f"tensor {Q0!r} given twice"),
    ("not-a-pair-last", lambda sd: [*sd.items(), (NORM,)], "is tuple, expected a (str, torch.Tensor) pair"),
    ("not-a-tensor", lambda sd: [(NORM, [1.0] * 64)], "named_tensors[0]"),
    ("name-not-str", lambda sd: [(0, sd[NORM])], "named_tensors[0]"),
    ("bare-tensor-item", lambda sd: [sd[NORM]], "named_tensors[0] is Tensor"),
    ("fused-qkv-name", lambda sd: {"model.layers.0.self_attn.qkv_proj.weight": torch.zeros(128, 64)},
     "unexpected tensor 'model.layers.0.self_attn.qkv_proj.weight'"),
    ("fused-gate-up-name", lambda sd: [*sd.items(), ("model.layers.1.mlp.gate_up_proj.weight", torch.zeros(256, 64))],
     "unexpected tensor 'model.layers.1.mlp.gate_up_proj.weight'"),
]


@pytest.mark.parametrize("make, fragment", [b[1:] for b in BAD_UPDATES], ids=[b[0] for b in BAD_UPDATES])
def test_failed_update_leaves_a(make, fragment, a_dir, sd_b, a_out, b_out):
    llm = make_llm(a_dir)
    before = snapshot(llm)
    with pytest.raises(WeightUpdateError) as info:
        llm.update_weights(make(sd_b))
    assert fragment in str(info.value)
    assert changed(before, snapshot(llm)) == set()
    assert llm.weight_version == 0
    assert greedy(llm) == a_out
    llm.update_weights(sd_b)  # still usable
    assert greedy(llm) == b_out and llm.weight_version == 1


def test_load_weights_refuses_pickle_and_bad_dirs(a_dir, b_dir, sd_b, a_out, b_out, tmp_path):
    llm = make_llm(a_dir)
    before = snapshot(llm)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(sd_b, pickled / "pytorch_model.bin")
    misshaped = model_dir_with(b_dir, {**sd_b, V0: torch.zeros(16, 64)}, tmp_path / "misshaped")
    for path, fragment in [(pickled, "pickle"), (misshaped, f"tensor {V0!r} has shape"), (tmp_path / "nope", "does not exist")]:
        with pytest.raises(CheckpointError, match=fragment):
            llm.load_weights(str(path))
        assert changed(before, snapshot(llm)) == set()
        assert llm.weight_version == 0
    assert greedy(llm) == a_out
    assert llm.load_weights(str(b_dir)) == len(sd_b)
    assert greedy(llm) == b_out and llm.weight_version == 1


@pytest.mark.parametrize("version", ["2", 1.0, True])
def test_bad_version_changes_nothing(version, a_dir, sd_b, a_out):
    llm = make_llm(a_dir)
    before = snapshot(llm)
    with pytest.raises(InvalidRequestError):
        llm.update_weights(sd_b, version=version)
    assert changed(before, snapshot(llm)) == set()
    assert llm.weight_version == 0
    assert greedy(llm) == a_out


# ---- prefix cache, weight_version -------------------------------------------------------
def test_update_invalidates_prefix_cache(a_dir, b_dir, sd_b):
    prompt = [PROMPTS[0]]  # 40 tokens: two full 16-token blocks to hit
    fresh_a = make_llm(a_dir).generate(prompt, GREEDY)[0]
    fresh_b = make_llm(b_dir).generate(prompt, GREEDY)[0]
    llm = make_llm(a_dir)
    first = llm.generate(prompt, GREEDY)[0]
    second = llm.generate(prompt, GREEDY)[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens > 0
    assert first.outputs[0].token_logprobs == fresh_a.outputs[0].token_logprobs
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert fresh_a.outputs[0].token_logprobs != fresh_b.outputs[0].token_logprobs

    llm.update_weights(sd_b)
    third = llm.generate(prompt, GREEDY)[0]
    assert third.num_cached_tokens == 0
    assert third.outputs[0].token_ids == fresh_b.outputs[0].token_ids
    assert third.outputs[0].token_logprobs == fresh_b.outputs[0].token_logprobs

    assert llm.generate(prompt, GREEDY)[0].num_cached_tokens > 0  # caching resumes under B
    llm.load_weights(str(a_dir))
    fourth = llm.generate(prompt, GREEDY)[0]
    assert fourth.num_cached_tokens == 0
    assert fourth.outputs[0].token_logprobs == fresh_a.outputs[0].token_logprobs


def test_partial_update_invalidates_prefix_cache(a_dir):
    llm = make_llm(a_dir)
    prompt = [PROMPTS[0]]
    llm.generate(prompt, GREEDY)
    llm.update_weights({NORM: params_of(llm)[NORM].detach().clone()})  # same values: still a reset
    assert llm.generate(prompt, GREEDY)[0].num_cached_tokens == 0


def test_weight_version(a_dir, b_dir, sd_a, sd_b):
    llm = make_llm(a_dir)

    def versions():
        return {o.weight_version for o in llm.generate(PROMPTS, GREEDY)}

    assert llm.weight_version == 0 and versions() == {0}
    llm.update_weights(sd_b)
    assert llm.weight_version == 1 and versions() == {1}
    llm.update_weights({NORM: sd_a[NORM]}, version=10)
    assert llm.weight_version == 10 and versions() == {10}
    with pytest.raises(WeightUpdateError):
        llm.update_weights({"nope.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError):
        llm.load_weights(str(b_dir / "nope"))
    assert llm.weight_version == 10 and versions() == {10}
    llm.load_weights(str(b_dir))
    assert llm.weight_version == 11 and versions() == {11}
    llm.load_weights(str(a_dir), version=3)  # the trainer's step counter: any int
    assert llm.weight_version == 3 and versions() == {3}
