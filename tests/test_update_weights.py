"""In-place weight updates on CPU: A -> B -> A round trip, every input form and dtype, fused
and tied names, partial updates, failures that leave the old weights, the prefix cache reset
and weight_version. fp32 throughout, so "equal" means bitwise."""

from __future__ import annotations

import json

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

# Compares numbers across computations: run again with another thread count (.ci/run).
pytestmark = pytest.mark.numerics

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


def _replace_mid(sd, tensor, name=NORM):
    """B's tensors with ``name`` replaced by ``tensor`` and moved after all the others."""
    return [(n, t) for n, t in sd.items() if n != name] + [(name, tensor)]


def _with(t, index, value):
    t = t.clone()
    t.view(-1)[index] = value
    return t


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
    # Everything the copy relies on is checked before the first copy, wherever the bad
    # tensor sits in the stream (here: after every other tensor of B).
    ("meta-mid-stream", lambda sd: _replace_mid(sd, torch.empty(64, device="meta")), "is on the meta device"),
    ("sparse-mid-stream", lambda sd: _replace_mid(sd, torch.ones(64).to_sparse()), "expected a dense (strided) tensor"),
    ("sparse-csr-mid-stream", lambda sd: _replace_mid(sd, sd[DOWN1].to_sparse_csr(), DOWN1),
     f"tensor {DOWN1!r} has layout torch.sparse_csr"),
    ("complex-mid-stream", lambda sd: _replace_mid(sd, torch.ones(64, dtype=torch.complex64)), "has dtype torch.complex64"),
    ("int-mid-stream", lambda sd: _replace_mid(sd, torch.ones(64, dtype=torch.int64)), "has dtype torch.int64"),
    ("quantized-mid-stream", lambda sd: _replace_mid(sd, torch.quantize_per_tensor(torch.ones(64), 0.1, 0, torch.qint8)),
     "is quantized"),
    ("nan-mid-stream", lambda sd: _replace_mid(sd, _with(sd[NORM], 7, float("nan"))), f"tensor {NORM!r} holds NaN or inf"),
    ("inf-mid-stream", lambda sd: _replace_mid(sd, _with(sd[NORM], 0, float("inf"))), f"tensor {NORM!r} holds NaN or inf"),
    ("-inf-last", lambda sd: [*sd.items()][:-1] + [(list(sd)[-1], _with(list(sd.values())[-1], -1, float("-inf")))],
     "holds NaN or inf"),
    ("nan-bf16", lambda sd: {NORM: _with(sd[NORM], 3, float("nan")).bfloat16()}, "holds NaN or inf"),
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


@pytest.mark.parametrize("version", ["2", 1.0, True, -5])
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
    with pytest.raises(InvalidRequestError, match="allow_version_decrease=True"):
        llm.load_weights(str(a_dir), version=3)  # versions never go back by accident
    assert llm.weight_version == 11 and versions() == {11}
    llm.load_weights(str(a_dir), version=3, allow_version_decrease=True)  # a trainer restarting its count
    assert llm.weight_version == 3 and versions() == {3}
    llm.update_weights({NORM: sd_a[NORM]}, version=3)  # the same version again is not going back
    assert llm.weight_version == 3


# ---- checkpoints: confined, checked before the copy -------------------------------------
def _sharded(b_dir, sd_b, dst, shard_names):
    """B as a sharded checkpoint in ``dst``: the index names ``shard_names`` (one per half)."""
    from safetensors.torch import save_file

    model_dir_with(b_dir, {}, dst)
    (dst / "model.safetensors").unlink()
    names = sorted(sd_b)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for shard, part in zip(shard_names, halves):
        target = dst / shard
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file({n: sd_b[n].contiguous() for n in part}, target, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst


def test_sharded_checkpoint_loads(a_dir, b_dir, sd_b, b_out, tmp_path):
    llm = make_llm(a_dir)
    assert llm.load_weights(_sharded(b_dir, sd_b, tmp_path / "ok", ["a.safetensors", "sub/b.safetensors"])) == len(sd_b)
    assert greedy(llm) == b_out


def test_checkpoint_index_cannot_leave_its_directory(a_dir, b_dir, sd_b, a_out, tmp_path):
    """A shard named by an absolute path, by "..", or through a symlink that leads out is
    refused before any file is opened; the weights and version stay."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    cases = {
        "dotdot": ["a.safetensors", "../elsewhere/b.safetensors"],
        "absolute": ["a.safetensors", str(outside / "b.safetensors")],
        "not-safetensors": ["a.safetensors", "b.bin"],
    }
    llm = make_llm(a_dir)
    before = snapshot(llm)
    for case, shards in cases.items():
        ckpt = _sharded(b_dir, sd_b, tmp_path / case / "ckpt", shards)
        with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
            llm.load_weights(ckpt)
    link_dir = model_dir_with(b_dir, {}, tmp_path / "link")
    (link_dir / "model.safetensors").unlink()
    from safetensors.torch import save_file

    save_file({n: t.contiguous() for n, t in sd_b.items()}, outside / "real.safetensors")
    (link_dir / "model.safetensors").symlink_to(outside / "real.safetensors")
    with pytest.raises(CheckpointError, match="resolve outside it"):
        llm.load_weights(link_dir)
    assert changed(before, snapshot(llm)) == set() and llm.weight_version == 0
    assert greedy(llm) == a_out


def test_nonfinite_checkpoint_changes_nothing(a_dir, b_dir, sd_b, a_out, b_out, tmp_path):
    last = sorted(sd_b)[-1]
    bad = model_dir_with(b_dir, {**sd_b, last: torch.full_like(sd_b[last], float("nan"))}, tmp_path / "nan")
    llm = make_llm(a_dir)
    before = snapshot(llm)
    with pytest.raises(CheckpointError, match=f"tensor {last!r} holds NaN or inf"):
        llm.load_weights(bad)
    assert changed(before, snapshot(llm)) == set() and llm.weight_version == 0
    assert greedy(llm) == a_out
    llm.load_weights(bad, check_finite=False)  # the caller's choice: loaded as given
    assert llm.weight_version == 1
    llm.load_weights(b_dir)
    assert greedy(llm) == b_out


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda llm: llm.update_weights(None), "named_tensors=None"),
        (lambda llm: llm.update_weights(5), "named_tensors=5"),
        (lambda llm: llm.update_weights("model.norm.weight"), "named_tensors='model.norm.weight'"),
        (lambda llm: llm.update_weights(torch.ones(3)), "named_tensors=tensor"),
        (lambda llm: llm.update_weights({}, check_finite="yes"), "check_finite='yes'"),
        (lambda llm: llm.update_weights({}, version=-5), "version=-5"),
        (lambda llm: llm.load_weights(None), "path=None"),
        (lambda llm: llm.load_weights(5), "path=5"),
        (lambda llm: llm.wake_up(5), "tags=5"),
        (lambda llm: llm.wake_up("weights"), "tags='weights'"),
        (lambda llm: llm.wake_up(["weights", "gpu"]), "tags=['weights', 'gpu']"),
        (lambda llm: llm.abort(None), "request_ids=None"),
        (lambda llm: llm.abort(5), "request_ids=5"),
        (lambda llm: llm.abort([1, 2]), "request_ids=[1, 2]"),
        (lambda llm: llm.mark_partial_update(None), "loaded=None"),
    ],
    ids=["update-None", "update-int", "update-str", "update-tensor", "check_finite-str", "version-negative",
         "load-None", "load-int", "wake-int", "wake-str", "wake-unknown-tag", "abort-None", "abort-int",
         "abort-ints", "mark-None"],
)
def test_bad_arguments_are_typed_and_change_nothing(call, field, a_dir, a_out):
    llm = make_llm(a_dir)
    before = snapshot(llm)
    with pytest.raises(InvalidRequestError) as info:
        call(llm)
    assert field in str(info.value)
    assert changed(before, snapshot(llm)) == set() and llm.weight_version == 0
    assert greedy(llm) == a_out
