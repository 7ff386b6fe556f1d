"""Which quantization a model runs with, read from its HF config's ``quantization_config``
(where an FP8 checkpoint's ``config.json`` records it, and where ``EngineConfig`` writes it
for ``LLM(..., quantization="fp8")`` on a full-precision model: ``with_quantization``).

Supported: None, and "fp8": e4m3 weights with one scale per 128x128 block, activations
quantized dynamically per token and 128-group (the DeepSeek-V3 / Qwen FP8 layout), on the
decoder's linear layers (see ``rollout.models.layers.linear``) and a MoE model's experts
(``rollout.models.layers.moe``). Embeddings, norms, the LM head and MoE routers stay in the
model dtype.
"""

from __future__ import annotations

import copy
from typing import Any

from rollout.errors import UnsupportedModelError

# What an FP8 checkpoint's config.json holds (Qwen3-*-FP8, DeepSeek-V3 add "fmt": "e4m3").
FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
}
# Modules every model here keeps in its dtype under fp8 (the last components of a module
# name). An FP8 config may list them as not converted: Qwen3-MoE FP8 checkpoints (Qwen3-30B-A3B-FP8
# and its 2507 versions) list "lm_head" and every layer's "input_layernorm", "mlp.gate" (the
# router, stored bf16) and "post_attention_layernorm". Names are whole module names, not
# patterns: "mlp.gate" is the router, never "mlp.gate_proj".
_KEPT_IN_DTYPE = (
    ("lm_head",), ("embed_tokens",), ("norm",), ("input_layernorm",), ("post_attention_layernorm",),
    ("q_norm",), ("k_norm",), ("mlp", "gate"),
)


def _kept_in_dtype(module: object) -> bool:
    """Whether ``module`` (an entry of ``modules_to_not_convert`` / ``ignored_layers``) names
    a module that is not quantized anyway."""
    if not isinstance(module, str):
        return False
    parts = tuple(module.split("."))
    return any(parts[-len(kept):] == kept for kept in _KEPT_IN_DTYPE)


def quantization_of(hf_config: Any) -> str | None:
    """"fp8", or None. An fp8 ``quantization_config`` of another layout is refused by name.
    Other methods are not ours to read: None, the weights then decide (a module transformers
    dequantized from GGUF records "gguf" but holds full-precision tensors; a checkpoint of
    packed integer weights fails on its tensor names)."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    if qc.get("quant_method") != "fp8":
        return None
    quantized_anyway = [
        m for key in ("ignored_layers", "modules_to_not_convert") for m in qc.get(key) or [] if not _kept_in_dtype(m)
    ]
    if (
        qc.get("fmt", "e4m3") == "e4m3"
        and qc.get("activation_scheme", "dynamic") == "dynamic"
        and list(qc.get("weight_block_size") or []) == [128, 128]
        and not quantized_anyway
    ):
        return "fp8"
    not_converted = f" (would be quantized anyway: {quantized_anyway[:10]})" if quantized_anyway else ""
    raise UnsupportedModelError(
        f"quantization_config {qc} is not supported{not_converted}; supported: quant_method 'fp8' (e4m3) "
        "with weight_block_size [128, 128], dynamic activations and every linear layer and expert quantized "
        "(ignored_layers / modules_to_not_convert may name only modules kept in the model dtype anyway: "
        "lm_head, embed_tokens, norms, mlp.gate routers)"
    )


def with_quantization(hf_config: Any, quantization: str | None) -> Any:
    """The HF config as the engine runs it: ``quantization="fp8"`` on a full-precision model
    gives a copy that records FP8's ``quantization_config``; None keeps the checkpoint's own
    (an FP8 checkpoint runs in FP8, as in vLLM)."""
    if quantization is None or quantization_of(hf_config) == quantization:
        return hf_config
    assert quantization == "fp8", quantization
    config = copy.deepcopy(hf_config)
    config.quantization_config = dict(FP8_QUANTIZATION_CONFIG)
    return config
