"""The ``vllm.config`` names frameworks import at module level. ``LLM`` takes none of them:
``compilation_config`` and ``enable_lora`` are refused with ``UnsupportedFeatureError``
(see ``rollout.config.VllmOptions``), so these classes only let the imports and the
construction of such configs run."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from rollout.config import (  # noqa: F401 (re-exported: the engine's own configs)
    CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig, VllmOptions,
)


class CompilationMode(enum.IntEnum):
    NONE = 0
    STOCK_TORCH_COMPILE = 1
    DYNAMO_TRACE_ONCE = 2
    VLLM_COMPILE = 3


# The older name of the same switch.
CompilationLevel = CompilationMode


@dataclass
class CompilationConfig:
    mode: Any = None
    level: Any = None
    cudagraph_capture_sizes: list[int] | None = None


@dataclass
class LoRAConfig:
    max_lora_rank: int = 16
    max_loras: int = 1
    lora_dtype: Any = None
    extra: dict = field(default_factory=dict)
