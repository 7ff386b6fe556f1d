"""Which quantization a model runs with, read from its HF config's ``quantization_config``
(where an FP8 checkpoint's ``config.json`` records it, and where ``EngineConfig`` writes it
for ``LLM(..., quantization="fp8")`` on a full-precision model: ``with_quantization``).

Supported: None, and "fp8": e4m3 weights with one scale per 128x128 block, activations
quantized dynamically per token and 128-group (the DeepSeek-V3 / Qwen FP8 layout), on the
linear layers of dense decoders (see ``rollout.models.layers.linear``).
"""

from __future__ import annotations

import copy
from typing import Any

from rollout.errors import UnsupportedModelError

# What an FP8 checkpoint's config.json holds (Qwen3-*-FP8, DeepSeek-V3 add "fmt": "e4m3").
FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
}


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
    if (
        qc.get("fmt", "e4m3") == "e4m3"
        and qc.get("activation_scheme", "dynamic") == "dynamic"
        and list(qc.get("weight_block_size") or []) == [128, 128]
        and not qc.get("ignored_layers") and not qc.get("modules_to_not_convert")
    ):
        return "fp8"
    raise UnsupportedModelError(
        f"quantization_config {qc} is not supported; supported: quant_method 'fp8' (e4m3) with "
        "weight_block_size [128, 128], dynamic activations and every linear layer quantized"
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
