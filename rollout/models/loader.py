"""Building a model from an HF config and loading HF weights into it (safetensors only)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from rollout.distributed.parallel_state import ParallelState
from rollout.errors import CheckpointError, UnsupportedModelError
from rollout.models.quantization import quantization_of
from rollout.models.registry import resolve_model_class
from rollout.models.updater import WeightUpdater

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_INDEX_FILE = "model.safetensors.index.json"
_MAX_LISTED = 10


def build_model(
    config: Any, dtype: torch.dtype, device: torch.device, architectures: list[str] | None = None,
    parallel: ParallelState | None = None,
) -> nn.Module:
    """An uninitialised model for ``config`` on ``device`` (weights come from a loader).
    ``architectures`` defaults to the config's. The registry contract is ``cls(config,
    dtype)``; a model that supports tensor parallelism also takes ``parallel=``, which is
    passed only when there is more than one rank. The config's ``quantization_config``
    (``rollout.models.quantization``) must be one the class lists in
    ``supported_quantizations``."""
    cls = resolve_model_class(architectures or getattr(config, "architectures", None))
    quantization = quantization_of(config)
    supported = getattr(cls, "supported_quantizations", ())
    if quantization is not None and quantization not in supported:
        raise UnsupportedModelError(
            f"{cls.__name__} does not support quantization {quantization!r} (supported: {list(supported)}); "
            "use quantization=None with a full-precision checkpoint"
        )
    kwargs = {}
    if parallel is not None and parallel.tensor_parallel_size > 1:
        if "parallel" not in inspect.signature(cls).parameters:
            raise UnsupportedModelError(
                f"{cls.__name__} does not support tensor parallelism (its constructor takes no "
                f"'parallel' argument); use tensor_parallel_size=1"
            )
        kwargs["parallel"] = parallel
    with torch.device(device):
        model = cls(config, dtype, **kwargs)
    return model.eval()


def checkpoint_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    if (path / _INDEX_FILE).is_file():
        return _indexed_files(path / _INDEX_FILE)
    files = sorted(path.glob("*.safetensors"))
    root = path.resolve()
    outside = [f.name for f in files if not _inside(root, f.name)]
    if outside:  # a symlink that leads out of the directory
        raise CheckpointError(
            f"{str(path)!r} holds *.safetensors entries that resolve outside it: {outside[:_MAX_LISTED]}; "
            "allowed: files inside the checkpoint directory"
        )
    if files:
        return files
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointError(
            f"{str(path)!r} holds only pickle checkpoints ({', '.join(pickled[:3])}); "
            "refused: rollout loads safetensors only (re-save with save_pretrained(safe_serialization=True))"
        )
    raise CheckpointError(f"no *.safetensors files in {str(path)!r}")


def _indexed_files(index: Path) -> list[Path]:
    """The shards a sharded checkpoint's index names (other *.safetensors files, such as a
    consolidated copy beside the shards, are not part of the checkpoint)."""
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"unreadable {str(index)!r}: {type(e).__name__}: {e}") from e
    root = index.parent.resolve()
    # The index is data: a shard name must be a plain file name inside the directory (no
    # absolute path, no "..", no symlink that leads out), or nothing is read.
    outside = [n for n in names if not _inside(root, n)]
    if outside:
        raise CheckpointError(
            f"{str(index)!r} names shard file(s) outside the checkpoint directory: {outside[:_MAX_LISTED]}; "
            "allowed: *.safetensors files inside it"
        )
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise CheckpointError(f"{str(index)!r} names shard file(s) that do not exist: {missing[:_MAX_LISTED]}")
    return [root / n for n in names]


def _inside(root: Path, name: object) -> bool:
    if not isinstance(name, str) or not name.endswith(".safetensors") or "\0" in name:
        return False
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        return False
    return (root / rel).resolve().is_relative_to(root)


def load_named_tensors(
    model: nn.Module,
    shapes: list[tuple[str, torch.Size, torch.dtype]],
    tensors: Iterable[torch.Tensor],
    *,
    require_all: bool,
    error_cls: type[Exception] = CheckpointError,
) -> int:
    """Validate ``shapes`` against the model, then stream ``tensors`` (same order) into it.

    Raises ``error_cls`` listing the problems before anything is copied. Returns the
    number of tensors loaded.
    """
    return WeightUpdater(model).apply(shapes, lambda: tensors, require_all=require_all, error_cls=error_cls)


def read_checkpoint(
    path: str | Path, names: set[str] | None = None,
) -> tuple[list[tuple[str, torch.Size, torch.dtype]], Callable[[], Iterator[torch.Tensor]]]:
    """(name, shape, dtype) of every tensor of a safetensors checkpoint directory (or only
    those in ``names``), read from the headers only, and a function that opens a lazy stream
    of the tensors in the same order (each call a new stream: a validation pass can read them
    before the copy)."""
    files = checkpoint_files(path)
    shapes = []
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():
                    if names is not None and name not in names:
                        continue
                    sl = st.get_slice(name)
                    dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.uint8)
                    shapes.append((name, torch.Size(sl.get_shape()), dtype))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{str(f)!r} is not a readable safetensors file: {e}") from e
    return shapes, lambda: _stream(files, names)


def load_checkpoint(model: nn.Module, path: str | Path) -> int:
    """Load every tensor of a safetensors checkpoint directory; all-or-nothing on errors."""
    shapes, open_tensors = read_checkpoint(path)
    return load_named_tensors(model, shapes, open_tensors(), require_all=True)


def init_dummy_weights(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Random weights in place, for benchmarks and tests that have no checkpoint: matrices
    from normal(0, ``std``), 1-D weights (norm gains) 1.0, biases 0. Drawn on the
    parameters' device from a generator seeded with ``seed`` (the global RNG is untouched),
    in parameter order, so a seed always gives the same model. An fp8 weight is drawn in
    fp32 and quantized (its scales come with it)."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied parameter comes once
            if getattr(param, "loaded_with_weight", False):
                continue  # fp8 scales: written with their weight
            if param.dim() >= 2:
                gen = generators.get(param.device)
                if gen is None:
                    gen = generators[param.device] = torch.Generator(device=param.device)
                    gen.manual_seed(seed)
                quantize_into = getattr(param, "quantize_into", None)
                if quantize_into is not None:
                    quantize_into(torch.empty(param.shape, device=param.device).normal_(0.0, std, generator=gen))
                else:
                    param.normal_(0.0, std, generator=gen)
            else:
                param.fill_(0.0 if name.endswith("bias") else 1.0)


def _stream(files: list[Path], names: set[str] | None = None) -> Iterator[torch.Tensor]:
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                if names is None or name in names:
                    yield st.get_tensor(name)
