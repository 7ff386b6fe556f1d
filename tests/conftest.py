from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter. triton.jit reads this when a kernel
# is decorated, so it must be set before any test module imports a Triton kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers.hf_oracle import HFOracle
from tests.helpers.models import VARIANTS, build_model_dir
from tests.helpers.tokenizer import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer_dir):
    """name -> directory of a tiny random model (config, safetensors, tokenizer)."""
    return {
        name: build_model_dir(name, tmp_path_factory.mktemp(name), tokenizer_dir)
        for name in VARIANTS
    }


@pytest.fixture(scope="session")
def llama_dir(model_dirs):
    return model_dirs["llama"]


@pytest.fixture(scope="session")
def hf_oracles(model_dirs):
    """name -> HFOracle (fp32 HF model of that directory, greedy results cached)."""
    return {name: HFOracle(path) for name, path in model_dirs.items()}


# Two tiny llama models with different weights (A: seed 0, B: seed 1), their HF state dicts
# and greedy outputs: the weight-update and sleep/wake tests move engines between them.
@pytest.fixture(scope="session")
def a_dir(model_dirs):
    return model_dirs["llama"]


@pytest.fixture(scope="session")
def b_dir(tmp_path_factory, tokenizer_dir):
    return build_model_dir("llama", tmp_path_factory.mktemp("llama_b"), tokenizer_dir, seed=1)


@pytest.fixture(scope="session")
def sd_a(a_dir):
    from safetensors.torch import load_file

    return load_file(a_dir / "model.safetensors")


@pytest.fixture(scope="session")
def sd_b(b_dir):
    from safetensors.torch import load_file

    return load_file(b_dir / "model.safetensors")


@pytest.fixture(scope="session")
def a_out(a_dir):
    from tests.helpers.engine_state import greedy, make_llm

    return greedy(make_llm(a_dir))


@pytest.fixture(scope="session")
def b_out(b_dir):
    from tests.helpers.engine_state import greedy, make_llm

    return greedy(make_llm(b_dir))
