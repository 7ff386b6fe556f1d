"""Engine configuration: small frozen dataclasses, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from rollout.errors import InvalidRequestError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """``"auto"`` means the checkpoint's dtype (float32 when it records none)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise InvalidRequestError("dtype", dtype, f"one of {list(_DTYPES)} or 'auto'")
        return dtype
    if dtype == "auto":
        return checkpoint_dtype if checkpoint_dtype in _DTYPES.values() else torch.float32
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise InvalidRequestError("dtype", dtype, f"one of {list(_DTYPES)}, 'auto' or a torch.dtype")
    return _DTYPES[dtype]


def config_dtype(hf_config: Any) -> torch.dtype | None:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype)
    return dtype


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if not _is_int(self.block_size) or self.block_size < 1:
            raise InvalidRequestError("block_size", self.block_size, "an int >= 1")
        if self.num_kv_blocks is not None and (not _is_int(self.num_kv_blocks) or self.num_kv_blocks < 1):
            raise InvalidRequestError("num_kv_blocks", self.num_kv_blocks, "None or an int >= 1")
        if self.kv_cache_memory_bytes is not None and (
            not _is_int(self.kv_cache_memory_bytes) or self.kv_cache_memory_bytes < 1
        ):
            raise InvalidRequestError("kv_cache_memory_bytes", self.kv_cache_memory_bytes, "None or an int >= 1")
        if not _is_real(self.gpu_memory_utilization) or not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidRequestError("gpu_memory_utilization", self.gpu_memory_utilization, "a float in (0, 1]")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
