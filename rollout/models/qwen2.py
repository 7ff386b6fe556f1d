"""HF ``Qwen2ForCausalLM``: the Llama decoder with q/k/v biases."""

from __future__ import annotations

from rollout.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
