"""``LLM.llm_engine``: the attribute paths of vLLM's engine that RL frameworks reach into.

TRL and verl push new weights every step through
``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(pairs)`` (or
``...driver_worker.worker.model_runner.model``), and read ``llm.llm_engine.model_config`` /
``vllm_config.model_config``. Here those paths lead to one ``ModelHandle`` whose
``load_weights`` is ``LLM.update_weights``: the same HF-name mapping, checks and transaction
(a bad tensor raises ``WeightUpdateError`` and changes nothing). Nothing else of vLLM's
engine is mirrored; a path not listed here raises ``AttributeError`` as usual.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rollout.errors import UnsupportedFeatureError

if TYPE_CHECKING:
    from rollout.entrypoints.llm import LLM


class ModelHandle:
    """What vLLM's ``model_runner.model`` is to the frameworks: weights by HF name in,
    parameters out. ``load_weights`` is one ``LLM.update_weights`` transaction per call
    (each bumps ``weight_version`` and resets the prefix cache)."""

    def __init__(self, llm: LLM) -> None:
        self._llm = llm

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load (HF name, tensor) pairs in place; returns the names loaded, as vLLM does."""
        items = list(weights)
        self._llm.update_weights(items)
        return {name for name, _ in items}

    @property
    def module(self) -> torch.nn.Module:
        """The rollout model itself (its parameters are the engine's weights)."""
        return self._llm.model

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self._llm.model.parameters()

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return self._llm.model.named_parameters()

    @property
    def config(self) -> Any:
        return self._llm.hf_config


@dataclass(frozen=True)
class ModelRunnerView:
    model: ModelHandle


@dataclass(frozen=True)
class WorkerView:
    model_runner: ModelRunnerView


@dataclass(frozen=True)
class DriverWorkerView:
    """Both paths the frameworks use: ``driver_worker.model_runner`` (TRL) and
    ``driver_worker.worker.model_runner`` (verl)."""

    model_runner: ModelRunnerView
    worker: WorkerView


@dataclass(frozen=True)
class ExecutorView:
    driver_worker: DriverWorkerView


@dataclass(frozen=True)
class ModelConfigView:
    """The fields of vLLM's ``ModelConfig`` that callers read."""

    model: str | None  # the model directory, or None for a live HF module
    max_model_len: int
    dtype: torch.dtype
    hf_config: Any
    tokenizer: str | None
    trust_remote_code: bool
    skip_tokenizer_init: bool

    def get_vocab_size(self) -> int:
        return self.hf_config.vocab_size


@dataclass(frozen=True)
class VllmConfigView:
    model_config: ModelConfigView


class EngineView:
    """``LLM.llm_engine``."""

    def __init__(self, llm: LLM, model_path: str | None) -> None:
        self._llm = llm
        cfg = llm.config
        runner = ModelRunnerView(ModelHandle(llm))
        self.model_executor = ExecutorView(DriverWorkerView(runner, WorkerView(runner)))
        self.model_config = ModelConfigView(
            model=model_path, max_model_len=cfg.model.max_model_len, dtype=cfg.model.dtype,
            hf_config=cfg.model.hf_config, tokenizer=model_path if llm.tokenizer is not None else None,
            trust_remote_code=cfg.vllm.trust_remote_code, skip_tokenizer_init=cfg.vllm.skip_tokenizer_init,
        )
        self.vllm_config = VllmConfigView(self.model_config)

    def get_tokenizer(self) -> Any | None:
        return self._llm.get_tokenizer()

    @property
    def tokenizer(self) -> Any | None:
        return self._llm.get_tokenizer()

    def reset_prefix_cache(self) -> bool:
        return self._llm.reset_prefix_cache()

    def list_loras(self) -> set[int]:
        """No LoRA adapter is ever loaded."""
        return set()

    def add_lora(self, lora_request: Any) -> bool:
        raise UnsupportedFeatureError("add_lora: LoRA adapters are not supported yet")
