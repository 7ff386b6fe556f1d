"""Checkpoint loading: safetensors only, every problem named before anything is copied,
sharded and tied checkpoints, and the HF-name -> engine-parameter map."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from rollout.entrypoints.llm import LLM
from rollout.errors import CheckpointError
from rollout.models.loader import build_model, checkpoint_files, load_checkpoint
from rollout.models.weights import WeightMap, plan_load
from rollout.sampling_params import SamplingParams

CPU = torch.device("cpu")
GREEDY = SamplingParams(temperature=0.0, max_tokens=6)
PROMPTS = [[5, 6, 7, 8], [100, 200, 300]]
CONFIG_FILES = ("config.json", "generation_config.json")


def write_checkpoint(src: Path, dst: Path, *shards: dict[str, torch.Tensor]) -> Path:
    """``src``'s config beside ``shards`` saved as model.safetensors (or model-a, model-b, ...)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        shutil.copy(src / name, dst / name)
    names = ["model.safetensors"] if len(shards) == 1 else [f"model-{chr(97 + i)}.safetensors" for i in range(len(shards))]
    for name, tensors in zip(names, shards):
        save_file(tensors, dst / name, metadata={"format": "pt"})
    return dst


def fresh_model(model_dir: Path) -> torch.nn.Module:
    return build_model(transformers.AutoConfig.from_pretrained(model_dir), torch.float32, CPU)


def greedy_tokens(model_dir: Path) -> list[list[int]]:
    llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=16, max_model_len=64)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def llama_state(llama_dir):
    return load_file(llama_dir / "model.safetensors")


@pytest.fixture(scope="module")
def llama_tokens(llama_dir):
    return greedy_tokens(llama_dir)


# --- bad tensors ---------------------------------------------------------------------------

Q0, V0 = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"
BAD_TENSORS = [
    # id, edit of the state dict, fragment naming the problem
    ("missing", lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"),
     "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    ("missing-qkv-shard", lambda sd: sd.pop("model.layers.0.self_attn.k_proj.weight"),
     "missing tensor 'model.layers.0.self_attn.k_proj.weight'"),
    ("missing-lm-head", lambda sd: sd.pop("lm_head.weight"), "missing tensor 'lm_head.weight'"),
    ("extra", lambda sd: sd.update({"model.layers.0.mlp.extra_proj.weight": torch.zeros(4, 4)}),
     "unexpected tensor 'model.layers.0.mlp.extra_proj.weight' (shape (4, 4))"),
    ("extra-layer", lambda sd: sd.update({"model.layers.2.input_layernorm.weight": torch.ones(64)}),
     "unexpected tensor 'model.layers.2.input_layernorm.weight'"),
    ("fused-name", lambda sd: sd.update({"model.layers.0.self_attn.qkv_proj.weight": torch.zeros(128, 64)}),
     "unexpected tensor 'model.layers.0.self_attn.qkv_proj.weight'"),
    ("misshaped", lambda sd: sd.update({V0: torch.zeros(16, 64)}), f"tensor {V0!r} has shape (16, 64), expected (32, 64)"),
    ("misshaped-embedding", lambda sd: sd.update({"model.embed_tokens.weight": torch.zeros(383, 64)}),
     "tensor 'model.embed_tokens.weight' has shape (383, 64), expected (384, 64)"),
    ("int-dtype", lambda sd: sd.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}),
     "tensor 'model.norm.weight' has dtype torch.int32, expected a floating-point dtype"),
]


@pytest.mark.parametrize("edit,problem", [c[1:] for c in BAD_TENSORS], ids=[c[0] for c in BAD_TENSORS])
def test_bad_tensor_is_named(llama_dir, llama_state, tmp_path, edit, problem):
    state = dict(llama_state)
    edit(state)
    bad = write_checkpoint(llama_dir, tmp_path / "bad", state)
    with pytest.raises(CheckpointError) as err:
        LLM(str(bad), num_kv_blocks=8)
    assert problem in str(err.value)


def test_every_problem_is_listed(llama_dir, llama_state, tmp_path):
    state = dict(llama_state)
    del state["model.layers.1.mlp.down_proj.weight"]
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # ignored, not a problem
    state["model.extra.weight"] = torch.zeros(3)
    state[Q0] = torch.zeros(64, 63)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(fresh_model(llama_dir), write_checkpoint(llama_dir, tmp_path / "bad", state))
    msg = str(err.value)
    for fragment in ("missing tensor 'model.layers.1.mlp.down_proj.weight'", "unexpected tensor 'model.extra.weight'",
                     f"tensor {Q0!r} has shape (64, 63), expected (64, 64)"):
        assert fragment in msg, msg
    assert "inv_freq" not in msg


def test_failed_load_changes_nothing(llama_dir, llama_state, tmp_path):
    model = fresh_model(llama_dir)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    assert load_checkpoint(model, llama_dir) == len(llama_state)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs  # loaded in place
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Every tensor valid and different, except the last one in file order.
    state = {name: t + 1.0 for name, t in llama_state.items()}
    state["model.norm.weight"] = torch.ones(65)
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        load_checkpoint(model, write_checkpoint(llama_dir, tmp_path / "bad", state))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


# --- not a safetensors checkpoint ----------------------------------------------------------

def test_pickle_only_checkpoint_is_refused(llama_dir, llama_state, tmp_path):
    d = write_checkpoint(llama_dir, tmp_path / "pickled")
    torch.save(llama_state, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        LLM(str(d), num_kv_blocks=8)
    assert "pytorch_model.bin" in str(err.value) and "safetensors" in str(err.value)


def test_dir_without_config(llama_dir, tmp_path):
    d = tmp_path / "no_config"
    d.mkdir()
    shutil.copy(llama_dir / "model.safetensors", d / "model.safetensors")
    with pytest.raises(CheckpointError, match="no config.json"):
        LLM(str(d), num_kv_blocks=8)


def test_empty_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        LLM(str(tmp_path), num_kv_blocks=8)
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        checkpoint_files(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint_files(tmp_path / "missing")


def test_config_without_weights(llama_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        LLM(str(write_checkpoint(llama_dir, tmp_path / "no_weights")), num_kv_blocks=8)


def test_truncated_safetensors(llama_dir, tmp_path):
    d = write_checkpoint(llama_dir, tmp_path / "truncated")
    (d / "model.safetensors").write_bytes((llama_dir / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        LLM(str(d), num_kv_blocks=8)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"model_type": ["llama"]}'], ids=["syntax", "list", "bad-type"])
def test_unreadable_config(llama_dir, tmp_path, text):
    d = write_checkpoint(llama_dir, tmp_path / "bad_config")
    shutil.copy(llama_dir / "model.safetensors", d / "model.safetensors")
    (d / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match="config.json' does not load"):
        LLM(str(d), num_kv_blocks=8)


# --- sharded and tied checkpoints ----------------------------------------------------------

@pytest.fixture(scope="module")
def sharded_dir(llama_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded")
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    hf.save_pretrained(d, max_shard_size="200KB")
    assert len(list(d.glob("*.safetensors"))) > 1 and (d / "model.safetensors.index.json").is_file()
    return d


def test_sharded_checkpoint_gives_same_outputs(sharded_dir, llama_tokens):
    assert greedy_tokens(sharded_dir) == llama_tokens


def test_sharded_checkpoint_reads_only_indexed_files(sharded_dir, llama_tokens, tmp_path):
    d = tmp_path / "with_stray"
    shutil.copytree(sharded_dir, d)
    # Some repos keep a consolidated copy in another naming scheme beside the HF shards.
    save_file({"tok_embeddings.weight": torch.zeros(384, 64)}, d / "consolidated.safetensors")
    assert greedy_tokens(d) == llama_tokens


def test_sharded_checkpoint_with_missing_shard(sharded_dir, tmp_path):
    d = tmp_path / "missing_shard"
    shutil.copytree(sharded_dir, d)
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        LLM(str(d), num_kv_blocks=8)


def test_tensor_given_twice(llama_dir, llama_state, tmp_path):
    d = write_checkpoint(llama_dir, tmp_path / "dup", dict(llama_state), {V0: llama_state[V0]})
    with pytest.raises(CheckpointError, match=f"tensor {V0!r} given twice"):
        load_checkpoint(fresh_model(llama_dir), d)


def test_tied_checkpoint_with_lm_head_is_accepted(model_dirs, tmp_path):
    tied_dir = model_dirs["llama3_tied"]
    state = load_file(tied_dir / "model.safetensors")
    assert "lm_head.weight" not in state
    head = {"lm_head.weight": state["model.embed_tokens.weight"].clone()}
    with_head = write_checkpoint(tied_dir, tmp_path / "with_head", {**state, **head})
    assert greedy_tokens(with_head) == greedy_tokens(tied_dir)


def test_tied_embedding_wins_over_lm_head_in_any_order(model_dirs, tmp_path):
    tied_dir = model_dirs["llama3_tied"]
    state = load_file(tied_dir / "model.safetensors")
    embed = state["model.embed_tokens.weight"]
    head = {"lm_head.weight": torch.zeros_like(embed)}
    for order in ((state, head), (head, state)):  # lm_head's file after, then before, the embedding's
        model = fresh_model(tied_dir)
        load_checkpoint(model, write_checkpoint(tied_dir, tmp_path / f"order{len(order[0])}", *order))
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert torch.equal(model.model.embed_tokens.weight, embed)


# --- WeightMap -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weight_map(llama_dir):
    return WeightMap(fresh_model(llama_dir))


@pytest.mark.parametrize(
    "hf_name,param_name,shard_id,shape",
    [
        (Q0, "model.layers.0.self_attn.qkv_proj.weight", "q", (64, 64)),
        ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.qkv_proj.weight", "k", (32, 64)),
        ("model.layers.1.self_attn.v_proj.weight", "model.layers.1.self_attn.qkv_proj.weight", "v", (32, 64)),
        ("model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.gate_up_proj.weight", 0, (128, 64)),
        ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.gate_up_proj.weight", 1, (128, 64)),
        ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight", None, (64, 128)),
        ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.o_proj.weight", None, (64, 64)),
        ("model.embed_tokens.weight", "model.embed_tokens.weight", None, (384, 64)),
        ("lm_head.weight", "lm_head.weight", None, (384, 64)),
    ],
    ids=["q", "k", "v", "gate", "up", "down", "o", "embed", "lm_head"],
)
def test_weight_map_resolves_hf_names(weight_map, hf_name, param_name, shard_id, shape):
    target = weight_map.resolve(hf_name)
    assert (target.hf_name, target.param_name, target.shard_id) == (hf_name, param_name, shard_id)
    assert tuple(target.expected_shape) == shape


@pytest.mark.parametrize(
    "hf_name",
    ["model.layers.0.self_attn.foo.weight", "model.layers.2.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.bias",
     "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight", "transformer.wte.weight", ""],
    ids=["unknown-module", "no-such-layer", "no-bias", "fused-qkv", "fused-gate-up", "other-naming", "empty"],
)
def test_weight_map_unknown_names_resolve_to_none(weight_map, hf_name):
    assert weight_map.resolve(hf_name) is None


def test_weight_map_requires_exactly_the_hf_names(weight_map, llama_state):
    assert sorted(weight_map.required.values()) == sorted(llama_state)


def test_rotary_inv_freq_is_ignored(weight_map, llama_state):
    inv_freq = "model.layers.0.self_attn.rotary_emb.inv_freq"
    assert WeightMap.is_ignored(inv_freq)
    shapes = [(n, t.shape, t.dtype) for n, t in llama_state.items()] + [(inv_freq, torch.Size([8]), torch.float32)]
    targets, problems = plan_load(weight_map, shapes, require_all=True)
    assert problems == []
    assert inv_freq not in {t.hf_name for t in targets} and len(targets) == len(llama_state)


def test_weight_map_tied_names_share_a_parameter(model_dirs):
    weight_map = WeightMap(fresh_model(model_dirs["llama3_tied"]))
    head, embed = weight_map.resolve("lm_head.weight"), weight_map.resolve("model.embed_tokens.weight")
    assert head.param is embed.param and weight_map.is_tied(head.param)
    assert "lm_head.weight" not in weight_map.required.values()  # a tied checkpoint need not hold it
