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
