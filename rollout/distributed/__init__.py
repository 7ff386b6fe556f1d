"""Tensor and data parallelism over a process group the caller initialised (torchrun or its own)."""

from rollout.distributed.agreement import NoAgreementCheck, TPAgreementCheck
from rollout.distributed.communication import (
    min_over_group,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from rollout.distributed.data_parallel import (
    dp_rank_and_size,
    gather_from_dp,
    split_for_dp,
)
from rollout.distributed.parallel_state import ParallelConfig, init_parallel

__all__ = [
    "NoAgreementCheck",
    "ParallelConfig",
    "TPAgreementCheck",
    "dp_rank_and_size",
    "gather_from_dp",
    "init_parallel",
    "min_over_group",
    "split_for_dp",
    "tensor_model_parallel_all_gather",
    "tensor_model_parallel_all_reduce",
]
