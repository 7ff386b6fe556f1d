"""``vllm.model_executor.model_loader.utils``: what verl calls after pushing weights."""

from __future__ import annotations

from typing import Any


def process_weights_after_loading(model: Any, model_config: Any, target_device: Any) -> None:
    """Nothing to do: rollout's ``load_weights`` writes every weight in its final layout
    (fused q/k/v and gate/up, tensor-parallel shards) in the same transaction, and no
    weight is quantized or repacked after loading."""
