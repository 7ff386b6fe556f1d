"""vLLM's ``LoRARequest``, so that code building one runs; the engine refuses it when used
(``UnsupportedFeatureError``): LoRA adapters are not supported yet."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None
