"""HF ``Qwen3ForCausalLM``: the Llama decoder with per-head RMSNorm on q and k."""

from __future__ import annotations

from rollout.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
