"""Tensor and data parallelism over a process group the caller initialised (torchrun or its own)."""

from rollout.distributed.agreement import NoAgreementCheck, TPAgreementCheck
from rollout.distributed.communication import (
    all_gather,
    all_reduce,
    min_over_group,
    peer_failure,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from rollout.distributed.data_parallel import (
    dp_rank_and_size,
    gather_from_dp,
    split_for_dp,
)
from rollout.distributed.parallel_state import ParallelState, group_timeout, init_parallel

__all__ = [
    "NoAgreementCheck",
    "ParallelState",
    "TPAgreementCheck",
    "all_gather",
    "all_reduce",
    "dp_rank_and_size",
    "gather_from_dp",
    "group_timeout",
    "init_parallel",
    "min_over_group",
    "peer_failure",
    "split_for_dp",
    "tensor_model_parallel_all_gather",
    "tensor_model_parallel_all_reduce",
]
