"""Model registry: unknown architectures are refused by name, out-of-tree models arrive
through real entry points in the group ``rollout.models``, broken plugins are skipped."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest

import rollout.models.registry as registry
from rollout.entrypoints.llm import LLM
from rollout.errors import UnsupportedModelError
from rollout.sampling_params import SamplingParams
from tests.helpers.plugins import make_plugin as write_plugin

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)
PROMPTS = [[5, 6, 7, 8], [100, 200, 300]]

DUMMY_MODEL = """
from rollout.models.llama import LlamaForCausalLM

class DummyForCausalLM(LlamaForCausalLM):
    pass

not_a_model = 42
"""


def make_plugin(root: Path, pkg: str, code: str, entry_points: str) -> Path:
    return write_plugin(root, pkg, code, entry_points, registry.PLUGIN_GROUP)


def model_dir_with(src: Path, dst: Path, **config_changes) -> Path:
    """A copy of the model directory ``src`` whose config.json has ``config_changes``."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def greedy_tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(autouse=True)
def fresh_registry():
    registry.reload_plugins()
    modules_before = set(sys.modules)
    yield
    registry.reload_plugins()  # before monkeypatch restores sys.path; next lookup rescans
    for name in set(sys.modules) - modules_before:
        if name.startswith("rollout_"):  # plugin packages written by make_plugin
            del sys.modules[name]


@pytest.fixture(scope="module")
def llama_tokens(llama_dir):
    return greedy_tokens(LLM(str(llama_dir), dtype="float32", num_kv_blocks=16))


def test_builtins_are_supported():
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"} <= set(registry.supported_architectures())


@pytest.mark.parametrize("model_type", ["llama", "foo"], ids=["known-model-type", "unknown-model-type"])
def test_unknown_architecture(llama_dir, tmp_path, model_type):
    d = model_dir_with(llama_dir, tmp_path / "foo", architectures=["FooForCausalLM"], model_type=model_type)
    with pytest.raises(UnsupportedModelError) as err:
        LLM(str(d), num_kv_blocks=8)
    msg = str(err.value)
    assert "FooForCausalLM" in msg
    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", registry.PLUGIN_GROUP):
        assert arch in msg, msg


def test_missing_architectures(llama_dir, tmp_path):
    d = model_dir_with(llama_dir, tmp_path / "none", architectures=None)
    with pytest.raises(UnsupportedModelError, match="supported: \\['LlamaForCausalLM'"):
        LLM(str(d), num_kv_blocks=8)


@pytest.mark.parametrize("model_type", ["llama", "dummy"], ids=["llama-config", "own-model-type"])
def test_entry_point_model(llama_dir, llama_tokens, tmp_path, monkeypatch, model_type):
    root = make_plugin(
        tmp_path / "site", "rollout_dummy_model", DUMMY_MODEL,
        "DummyForCausalLM = rollout_dummy_model:DummyForCausalLM\n",
    )
    monkeypatch.syspath_prepend(str(root))
    registry.reload_plugins()
    assert "DummyForCausalLM" in registry.supported_architectures()
    d = model_dir_with(llama_dir, tmp_path / "dummy", architectures=["DummyForCausalLM"], model_type=model_type)
    llm = LLM(str(d), dtype="float32", num_kv_blocks=16)
    assert type(llm.model).__name__ == "DummyForCausalLM"
    assert type(llm.model).__module__ == "rollout_dummy_model"
    assert greedy_tokens(llm) == llama_tokens


def test_broken_plugins_are_skipped_with_a_warning(llama_dir, llama_tokens, tmp_path, monkeypatch, caplog):
    root = tmp_path / "site"
    make_plugin(
        root, "rollout_broken_model", "raise ImportError('broken on purpose')\n",
        "BrokenForCausalLM = rollout_broken_model:BrokenForCausalLM\n",
    )
    make_plugin(
        root, "rollout_dummy_model", DUMMY_MODEL,
        """\
        DummyForCausalLM = rollout_dummy_model:DummyForCausalLM
        MissingForCausalLM = rollout_dummy_model:MissingForCausalLM
        NotAModelForCausalLM = rollout_dummy_model:not_a_model
        """,
    )
    monkeypatch.syspath_prepend(str(root))
    registry.reload_plugins()
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        supported = registry.supported_architectures()
    for name in ("BrokenForCausalLM", "MissingForCausalLM", "NotAModelForCausalLM"):
        assert name not in supported
        assert any(name in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records), name
    assert "broken on purpose" in caplog.text
    assert {"LlamaForCausalLM", "DummyForCausalLM"} <= set(supported)
    # The built-ins and the good plugin still work.
    assert greedy_tokens(LLM(str(llama_dir), dtype="float32", num_kv_blocks=16)) == llama_tokens
    d = model_dir_with(llama_dir, tmp_path / "dummy", architectures=["DummyForCausalLM"])
    assert greedy_tokens(LLM(str(d), dtype="float32", num_kv_blocks=16)) == llama_tokens


def test_first_registered_architecture_wins(llama_dir, llama_tokens, tmp_path):
    d = model_dir_with(llama_dir, tmp_path / "multi", architectures=["FooForCausalLM", "LlamaForCausalLM"])
    llm = LLM(str(d), dtype="float32", num_kv_blocks=16)
    assert type(llm.model).__name__ == "LlamaForCausalLM"
    assert greedy_tokens(llm) == llama_tokens


def test_register_model_at_run_time():
    from rollout.models.llama import LlamaForCausalLM

    class RuntimeForCausalLM(LlamaForCausalLM):
        pass

    registry.register_model("RuntimeForCausalLM", RuntimeForCausalLM)
    assert registry.resolve_model_class(["RuntimeForCausalLM"]) is RuntimeForCausalLM
    registry.reload_plugins()
    with pytest.raises(UnsupportedModelError):
        registry.resolve_model_class(["RuntimeForCausalLM"])


def test_partial_rotary_factor_is_refused(model_dirs, tmp_path):
    """A rope layout we do not implement is a clear error, not silently wrong outputs."""
    import json
    import shutil

    from rollout import LLM
    from rollout.errors import UnsupportedModelError

    d = tmp_path / "partial"
    shutil.copytree(model_dirs["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["partial_rotary_factor"] = 0.5
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor"):
        LLM(str(d), dtype="float32", num_kv_blocks=8)
