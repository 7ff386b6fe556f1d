"""Tiny random-weight HF models of each supported architecture, saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 384

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    rms_norm_eps=1e-6, eos_token_id=2, bos_token_id=None, pad_token_id=0,
    # Sharper random logits than the default 0.02 keep greedy argmax away from near-ties.
    initializer_range=0.2,
)

# name -> (config class, extra config fields)
VARIANTS = {
    "llama": (transformers.LlamaConfig, dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "llama3_tied": (
        transformers.LlamaConfig,
        dict(
            tie_word_embeddings=True, rope_theta=500000.0,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=64),
        ),
    ),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen3": (transformers.Qwen3Config, dict(tie_word_embeddings=False, head_dim=32, rope_theta=1000000.0)),
}


def build_model_dir(name: str, path: Path, tokenizer_dir: Path | None = None, seed: int = 0) -> Path:
    """Save a random ``name`` model (fp32) and, if given, copy the tokenizer beside it."""
    cls, extra = VARIANTS[name]
    config = cls(**_COMMON, **extra)
    gen = torch.Generator().manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            # Explicit, seeded init: independent of the global RNG and of HF's init scheme.
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 if p.dim() > 1 else 1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(path)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            (path / f.name).write_bytes(f.read_bytes())
    return path
