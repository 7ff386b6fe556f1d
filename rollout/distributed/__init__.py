"""Tensor parallelism over a process group the caller initialised (torchrun or its own)."""

from rollout.distributed.communication import (
    min_over_group,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from rollout.distributed.parallel_state import ParallelConfig, init_parallel

__all__ = [
    "ParallelConfig", "init_parallel", "min_over_group", "tensor_model_parallel_all_gather",
    "tensor_model_parallel_all_reduce",
]
