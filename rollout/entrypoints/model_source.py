"""Where an LLM's config, weights, tokenizer and EOS ids come from: a directory or a live module."""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rollout.errors import CheckpointError, InvalidRequestError
from rollout.models.loader import checkpoint_files, load_checkpoint, load_named_tensors, read_checkpoint
from rollout.models.weights import with_scale_names

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
from rollout.config import LOAD_FORMATS  # noqa: E402 (one list of load formats)


@dataclass
class ModelSource:
    hf_config: Any
    path: Path | None = None
    module: nn.Module | None = None

    @classmethod
    def from_arg(cls, model: Any, load_format: str = "auto") -> ModelSource:
        """``load_format``: "auto" (or "safetensors") loads the checkpoint; "dummy" needs only the config (the
        caller fills the weights with ``init_dummy_weights``)."""
        if load_format not in LOAD_FORMATS:
            raise InvalidRequestError(
                "load_format", load_format, "'auto' or 'safetensors' (load the checkpoint) or 'dummy' (random weights, no checkpoint read)"
            )
        if isinstance(model, nn.Module):
            if not hasattr(model, "config"):
                raise InvalidRequestError("model", type(model).__name__, "an HF PreTrainedModel (with .config) or a directory path")
            return cls(model.config, module=model)
        if isinstance(model, (str, Path)):
            path = Path(model)
            if not (path / "config.json").is_file():
                raise CheckpointError(f"{str(path)!r} is not an HF model directory (no config.json)")
            if load_format != "dummy":
                checkpoint_files(path)  # refuse pickle-only or empty checkpoints before any work
            return cls(_read_config(path), path=path)
        raise InvalidRequestError("model", model, "a path to an HF model directory or an HF PreTrainedModel")

    @property
    def architectures(self) -> list[str] | None:
        # Configs built in memory (e.g. from a GGUF file) may not record it; the class does.
        archs = getattr(self.hf_config, "architectures", None)
        if not archs and self.module is not None:
            archs = [type(self.module).__name__]
        return archs

    def checkpoint_dtype(self) -> torch.dtype | None:
        if self.module is not None:
            return next(self.module.parameters()).dtype
        dtype = getattr(self.hf_config, "dtype", None) or getattr(self.hf_config, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        return dtype if isinstance(dtype, torch.dtype) else None

    def load_weights(self, model: nn.Module) -> int:
        if self.path is not None:
            return load_checkpoint(model, self.path)
        state = self.module.state_dict()
        shapes = [(name, t.shape, t.dtype) for name, t in state.items()]
        return load_named_tensors(model, shapes, state.values(), require_all=True)

    def load_tokenizer(self, tokenizer: Any) -> Any | None:
        """``tokenizer``: a path, a tokenizer object, or None (the model directory's, if any)."""
        if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
            return tokenizer
        from transformers import AutoTokenizer

        given = tokenizer is not None
        if not given:
            if self.path is None or not any((self.path / f).exists() for f in _TOKENIZER_FILES):
                return None
            tokenizer = self.path
        try:
            return AutoTokenizer.from_pretrained(tokenizer)
        except Exception as e:  # transformers raises OSError, ValueError, ... for these
            if given:
                raise InvalidRequestError(
                    "tokenizer", str(tokenizer), "a tokenizer object or a tokenizer directory AutoTokenizer can load",
                    f"{type(e).__name__}: {e}",
                ) from e
            raise CheckpointError(f"the tokenizer files in {str(tokenizer)!r} do not load: {type(e).__name__}: {e}") from e

    def eos_token_ids(self, tokenizer: Any | None) -> tuple[int, ...]:
        """EOS ids from the generation config, else the model config, else the tokenizer."""
        eos = None
        if self.module is not None and getattr(self.module, "generation_config", None) is not None:
            eos = self.module.generation_config.eos_token_id
        elif self.path is not None and (self.path / "generation_config.json").is_file():
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(self.path).eos_token_id
        if eos is None:
            eos = getattr(self.hf_config, "eos_token_id", None)
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


class WeightSource:
    """Where weights discarded by ``sleep(level=2)`` are read back from (``reload_weights``):
    the checkpoint directory the engine was built from, or the HF module, held weakly so the
    engine never keeps a trainer's model alive. Random (``load_format="dummy"``) weights have
    no source."""

    def __init__(self, source: ModelSource, load_format: str) -> None:
        self.path = source.path if load_format != "dummy" else None
        self._module = weakref.ref(source.module) if source.module is not None else None

    def read(self, names: set[str]) -> tuple[list[tuple[str, torch.Size, torch.dtype]], Callable[[], Iterator[torch.Tensor]]]:
        """(name, shape, dtype) of the tensors named ``names`` and a function that opens a
        stream of them, in that order (what ``WeightUpdater.apply`` takes). The block scales
        of fp8 weights (``<name>_scale_inv``, an FP8 checkpoint's) come with them."""
        names = with_scale_names(names)
        if self.path is not None:
            return read_checkpoint(self.path, names)
        module = self._module() if self._module is not None else None
        if module is None:
            raise CheckpointError(
                "reload_weights: nothing to read the discarded weights from (random weights, or the HF module "
                "the engine was built from is gone); load them with update_weights or load_weights"
            )
        state = {n: t for n, t in module.state_dict().items() if n in names}
        return [(n, t.shape, t.dtype) for n, t in state.items()], lambda: iter(list(state.values()))


def _read_config(path: Path) -> Any:
    """The HF config of a model directory. A ``model_type`` transformers does not know (an
    out-of-tree model's) gives a generic config holding every field; the model registry
    then decides whether the architecture is supported."""
    from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

    try:
        raw = json.loads((path / "config.json").read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
        if raw.get("model_type") in CONFIG_MAPPING:
            return AutoConfig.from_pretrained(path)
        return PretrainedConfig.from_dict(raw)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{str(path / 'config.json')!r} does not load: {type(e).__name__}: {e}") from e
