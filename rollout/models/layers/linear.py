"""Linear layers whose parameters load HF tensors themselves (fused shards, TP slices).

Every parameter gets two attributes used by ``rollout.models.weights``:
- ``hf_shape(shard_id) -> torch.Size``: the full HF tensor shape that shard expects,
  so names and shapes are validated before anything is copied;
- ``weight_loader(param, tensor, shard_id)``: copies one HF tensor in place (never rebinds).
A ``shard_id`` names a part of a fused parameter ("q", "k", "v" or 0, 1); None means whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from rollout.distributed.communication import tensor_model_parallel_all_reduce
from rollout.models.forward_context import current_ops


def _param(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


def _attach(param: nn.Parameter, hf_shape: Callable, loader: Callable) -> nn.Parameter:
    param.hf_shape = hf_shape
    param.weight_loader = loader
    return param


class LinearBase(nn.Module):
    """``y = x W^T (+ b)`` with W [out_local, in_local]; subclasses define the loaders."""

    def __init__(self, in_local: int, out_local: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = _param((out_local, in_local), dtype)
        self.bias = _param((out_local,), dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return current_ops().linear(x, self.weight, self.bias)


class ColumnLinear(LinearBase):
    """Output features split across ``tp_size`` ranks (a fused layer stacks several outputs).
    ``slices``: per output, the rows ``(start, size)`` of the full HF tensor this rank holds
    (default: the ``tp_rank``-th of ``tp_size`` equal parts)."""

    def __init__(
        self, in_features: int, out_sizes: Sequence[int], bias: bool, dtype: torch.dtype,
        tp_rank: int = 0, tp_size: int = 1, shard_ids: Sequence[str | int] | None = None,
        slices: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        if slices is None:
            for size in out_sizes:
                assert size % tp_size == 0, f"output size {size} not divisible by tp_size {tp_size}"
            slices = [(tp_rank * (size // tp_size), size // tp_size) for size in out_sizes]
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.out_sizes = list(out_sizes)
        self.slices = list(slices)
        self.shard_ids = list(shard_ids) if shard_ids is not None else None
        super().__init__(in_features, sum(size for _, size in self.slices), bias, dtype)
        self.in_features = in_features
        _attach(self.weight, lambda s: torch.Size((self._full(s), in_features)), self._load)
        if self.bias is not None:
            _attach(self.bias, lambda s: torch.Size((self._full(s),)), self._load)

    def _index(self, shard_id: str | int | None) -> int:
        if self.shard_ids is None:
            if shard_id is not None:
                raise KeyError(f"unfused layer got shard {shard_id!r}")
            return 0
        return self.shard_ids.index(shard_id)

    def _full(self, shard_id: str | int | None) -> int:
        return self.out_sizes[self._index(shard_id)]

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        idx = self._index(shard_id)
        start, size = self.slices[idx]
        offset = sum(n for _, n in self.slices[:idx])  # where this output sits in the fused rows
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, start, size))


class QKVLinear(ColumnLinear):
    """q, k and v fused. The q heads split evenly over the ranks; so do the kv heads when
    ``tp_size`` divides them. With fewer kv heads than ranks (``tp_size`` a multiple of
    ``num_kv_heads``) each rank holds one kv head, replicated on ``replicas = tp_size //
    num_kv_heads`` consecutive ranks: rank r holds kv head ``r // replicas``, the one its q
    heads attend to."""

    def __init__(
        self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
        dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1,
    ) -> None:
        assert num_heads % tp_size == 0, f"num_heads {num_heads} not divisible by tp_size {tp_size}"
        if num_kv_heads >= tp_size:
            assert num_kv_heads % tp_size == 0, f"num_kv_heads {num_kv_heads} not divisible by tp_size {tp_size}"
            kv_local = num_kv_heads // tp_size
            kv_first = tp_rank * kv_local
        else:
            assert tp_size % num_kv_heads == 0, f"tp_size {tp_size} not a multiple of num_kv_heads {num_kv_heads}"
            kv_local = 1
            kv_first = tp_rank // (tp_size // num_kv_heads)
        q_local = num_heads // tp_size
        sizes = (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim)
        kv_slice = (kv_first * head_dim, kv_local * head_dim)
        slices = ((tp_rank * q_local * head_dim, q_local * head_dim), kv_slice, kv_slice)
        super().__init__(hidden, sizes, bias, dtype, tp_rank, tp_size, shard_ids=("q", "k", "v"), slices=slices)
        self.q_size, self.kv_size = q_local * head_dim, kv_local * head_dim


class RowLinear(LinearBase):
    """Input features split across ranks; the partial sums are all-reduced over ``tp_group``
    before the bias (held whole by every rank) is added once."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
        tp_rank: int = 0, tp_size: int = 1, tp_group: Any = None,
    ) -> None:
        assert in_features % tp_size == 0
        super().__init__(in_features // tp_size, out_features, bias, dtype)
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
        _attach(self.weight, lambda s: torch.Size((out_features, in_features)), self._load_weight)
        if self.bias is not None:
            _attach(self.bias, lambda s: torch.Size((out_features,)), _copy_whole)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = current_ops().linear
        if self.tp_size == 1:
            return linear(x, self.weight, self.bias)
        y = tensor_model_parallel_all_reduce(linear(x, self.weight), self.tp_group)
        return y if self.bias is None else y + self.bias

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: None = None) -> None:
        local = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp_rank * local, local))


def _copy_whole(param: nn.Parameter, loaded: torch.Tensor, shard_id: None = None) -> None:
    param.data.copy_(loaded)


def replicated_param(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    """A parameter every rank holds whole (norm weights)."""
    return _attach(_param(shape, dtype), lambda s: torch.Size(shape), _copy_whole)
