"""HF configs of the benchmark models (their real hyper-parameters; no hub access) and the
config.json-only directories the engine is built from with ``load_format="dummy"``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu", vocab_size=151936,
              rope_theta=1000000.0, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151643,
              use_sliding_window=False)
_QWEN3 = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_act="silu", vocab_size=151936,
              head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6, attention_bias=False,
              bos_token_id=151643, eos_token_id=151645, max_position_embeddings=40960)

# name -> HF config.json fields (from each model's config.json on the hub).
MODELS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(_QWEN2, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(_QWEN2, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
                         tie_word_embeddings=True),
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                       hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=128000, eos_token_id=128001),
    "qwen3-30b-a3b": dict(_QWEN3, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=2048,
                          intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
    # CI smoke tests on CPU.
    "tiny": dict(_QWEN3, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=384, max_position_embeddings=4096,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "tiny-moe": dict(_QWEN3, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=64,
                     intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=384, max_position_embeddings=4096,
                     num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                     mlp_only_layers=[0], tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}


def hf_config(name: str) -> Any:
    """The transformers config object of ``name``."""
    from transformers import CONFIG_MAPPING

    fields = dict(MODELS[name])
    fields.setdefault("dtype", "bfloat16")  # what the released checkpoints hold
    return CONFIG_MAPPING[fields.pop("model_type")](**fields)


def write_model_dir(name: str, root: Path) -> Path:
    """``root/name/config.json`` and nothing else: the engine builds it with random weights."""
    path = Path(root) / name
    path.mkdir(parents=True, exist_ok=True)
    hf_config(name).save_pretrained(path)
    return path


def summary(name: str) -> dict[str, Any]:
    """The config fields a result file records."""
    return json.loads(json.dumps(MODELS[name]))
