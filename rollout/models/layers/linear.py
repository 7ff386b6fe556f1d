"""Linear layers whose parameters load HF tensors themselves (fused shards, TP slices).

Every parameter gets two attributes used by ``rollout.models.weights``:
- ``hf_shape(shard_id) -> torch.Size``: the full HF tensor shape that shard expects,
  so names and shapes are validated before anything is copied;
- ``weight_loader(param, tensor, shard_id)``: copies one HF tensor in place (never rebinds).
A ``shard_id`` names a part of a fused parameter ("q", "k", "v" or 0, 1); None means whole.

``quantization="fp8"``: the weight is ``float8_e4m3fn`` with ``weight_scale_inv``, one fp32
scale per 128x128 block (``rollout.kernels.fp8``), and the forward runs the op set's
``fp8_linear``. Blocks are per shard: each shard's rows (q, k, v; gate, up; this rank's
slice) start a block row, so a shard quantizes on its own, on load and on every update,
inside its loader (a bf16/fp32 tensor is quantized in place; no full-precision copy is
kept). When every shard but the last is a multiple of 128 rows the blocks are the fused
weight's own 128-row blocks and one GEMM runs; otherwise one GEMM runs per shard. An FP8
checkpoint's ``weight`` (fp8) and ``weight_scale_inv`` load as they are, by HF name; the
weights' extra attributes for that (``quantize_into``, ``hf_dtype_problem``,
``fp8_scales``, ``loaded_with_weight``) are read by ``rollout.models.weights`` and the loader.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from rollout.distributed.communication import tensor_model_parallel_all_reduce
from rollout.kernels.fp8 import BLOCK, FP8_DTYPE, quantize_weight_blockwise
from rollout.models.forward_context import current_ops

QUANTIZATIONS = (None, "fp8")


def _param(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


def _attach(param: nn.Parameter, hf_shape: Callable, loader: Callable) -> nn.Parameter:
    param.hf_shape = hf_shape
    param.weight_loader = loader
    return param


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _aligned(size: int, full: int) -> bool:
    """Whether every rank's ``size``-long slice of a ``full``-long HF dimension is whole
    128-blocks of it, so an FP8 checkpoint's slice needs no requantization. The rule is the
    group's, not one rank's: every TP layout here gives each rank a slice of the same size
    starting at a multiple of it, so all are aligned exactly when the size is whole blocks
    (or the slice is the whole dimension). One rank's own test would differ across ranks
    (the last slice may end at the tail), and ranks that disagree on refusing a load
    diverge."""
    return size % BLOCK == 0 or size == full


class LinearBase(nn.Module):
    """``y = x W^T (+ b)`` with W [out_local, in_local]; subclasses define the loaders.
    ``row_groups``: the rows of each shard, in order (fp8 blocks start at each)."""

    def __init__(
        self, in_local: int, out_local: int, bias: bool, dtype: torch.dtype, quantization: str | None = None,
        row_groups: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        assert quantization in QUANTIZATIONS, f"quantization {quantization!r} not in {QUANTIZATIONS}"
        self.weight = _param((out_local, in_local), dtype if quantization is None else FP8_DTYPE)
        self.bias = _param((out_local,), dtype) if bias else None
        self.weight_scale_inv = None
        if quantization is None:
            return
        # (row offset, rows, scale row offset, scale rows) of each shard.
        self._groups: list[tuple[int, int, int, int]] = []
        row, block = 0, 0
        for rows in row_groups or [out_local]:
            self._groups.append((row, rows, block, _cdiv(rows, BLOCK)))
            row, block = row + rows, block + _cdiv(rows, BLOCK)
        self._one_gemm = all(rows % BLOCK == 0 for _, rows, _, _ in self._groups[:-1])
        self.weight_scale_inv = _param((block, _cdiv(in_local, BLOCK)), torch.float32)  # [scale rows, K blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ops = current_ops()
        if self.weight_scale_inv is None:
            return ops.linear(x, self.weight, bias)
        if self._one_gemm:
            return ops.fp8_linear(x, self.weight, self.weight_scale_inv, bias)
        y = torch.cat([
            ops.fp8_linear(x, self.weight.narrow(0, r0, n), self.weight_scale_inv.narrow(0, b0, nb))
            for r0, n, b0, nb in self._groups
        ], dim=-1)
        return y if bias is None else y + bias

    def _store(self, group: int, rows: torch.Tensor) -> None:
        """Quantize full-precision ``rows`` of shard ``group`` into the weight and its scales."""
        r0, n, b0, nb = self._groups[group]
        # On the weight's device: CUDA and CPU torch round amax / 448 differently (a multiply
        # by 1/448 vs a division), and a checkpoint read on the host must quantize as the
        # trainer's device tensors do.
        q, scale = quantize_weight_blockwise(rows.to(self.weight.device))
        self.weight.data.narrow(0, r0, n).copy_(q)
        self.weight_scale_inv.data.narrow(0, b0, nb).copy_(scale)

    def _quantize_into(self, local: torch.Tensor) -> None:
        """A full-precision weight of this rank's shape [out_local, in_local], every shard."""
        for group, (r0, n, _, _) in enumerate(self._groups):
            self._store(group, local.narrow(0, r0, n))

    def _attach_fp8(self, scale_shape: Callable, scale_loader: Callable, aligned: Callable) -> None:
        attach_fp8(self.weight, self.weight_scale_inv, scale_shape, scale_loader, self._quantize_into, aligned)


def attach_fp8(
    weight: nn.Parameter, scale: nn.Parameter, scale_shape: Callable, scale_loader: Callable,
    quantize_into: Callable, aligned: Callable,
) -> None:
    """The loading attributes of an fp8 ``weight`` and its block ``scale`` (``weight_scale_inv``)
    that ``rollout.models.weights`` and the loader read. ``quantize_into(local)``: quantize a
    full-precision tensor of the weight's own shape into it (dummy init); ``aligned(shard_id)``:
    whether this rank's slice of that HF tensor is whole 128-blocks (else an FP8 checkpoint's
    tensor cannot load as is)."""
    def problem(shard_id: Any, dtype: torch.dtype, is_scale: bool) -> str | None:
        if not is_scale and dtype.itemsize == 1 and dtype != FP8_DTYPE:
            return f"has dtype {dtype}: fp8 weights load as {FP8_DTYPE} only"
        if (is_scale or dtype == FP8_DTYPE) and not aligned(shard_id):
            return ("is block-quantized but this rank's slice of it does not start and end on "
                    f"{BLOCK}-blocks: give this tensor_parallel_size full-precision weights instead")
        return None

    weight.quantize_into = quantize_into
    weight.fp8_scales = scale
    weight.hf_dtype_problem = lambda s, dtype: problem(s, dtype, False)
    _attach(scale, scale_shape, scale_loader)
    scale.loaded_with_weight = True
    scale.hf_dtype_problem = lambda s, dtype: problem(s, dtype, True)


class ColumnLinear(LinearBase):
    """Output features split across ``tp_size`` ranks (a fused layer stacks several outputs).
    ``slices``: per output, the rows ``(start, size)`` of the full HF tensor this rank holds
    (default: the ``tp_rank``-th of ``tp_size`` equal parts)."""

    def __init__(
        self, in_features: int, out_sizes: Sequence[int], bias: bool, dtype: torch.dtype,
        tp_rank: int = 0, tp_size: int = 1, shard_ids: Sequence[str | int] | None = None,
        slices: Sequence[tuple[int, int]] | None = None, quantization: str | None = None,
    ) -> None:
        if slices is None:
            for size in out_sizes:
                assert size % tp_size == 0, f"output size {size} not divisible by tp_size {tp_size}"
            slices = [(tp_rank * (size // tp_size), size // tp_size) for size in out_sizes]
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.out_sizes = list(out_sizes)
        self.slices = list(slices)
        self.shard_ids = list(shard_ids) if shard_ids is not None else None
        sizes = [size for _, size in self.slices]
        super().__init__(in_features, sum(sizes), bias, dtype, quantization, row_groups=sizes)
        self.in_features = in_features
        _attach(self.weight, lambda s: torch.Size((self._full(s), in_features)), self._load)
        if self.bias is not None:
            _attach(self.bias, lambda s: torch.Size((self._full(s),)), self._load)
        if self.weight_scale_inv is not None:
            self._attach_fp8(
                lambda s: torch.Size((_cdiv(self._full(s), BLOCK), _cdiv(in_features, BLOCK))), self._load_scale,
                lambda s: _aligned(self.slices[self._index(s)][1], self._full(s)),
            )

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
        if param is self.weight and self.weight_scale_inv is not None and loaded.dtype != FP8_DTYPE:
            self._store(idx, loaded.narrow(0, start, size))
            return
        offset = sum(n for _, n in self.slices[:idx])  # where this output sits in the fused rows
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, start, size))

    def _load_scale(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        """An FP8 checkpoint's ``weight_scale_inv`` (this rank's slice is whole blocks: checked
        by ``hf_dtype_problem`` before any copy)."""
        idx = self._index(shard_id)
        start, _ = self.slices[idx]
        _, _, b0, nb = self._groups[idx]
        param.data.narrow(0, b0, nb).copy_(loaded.narrow(0, start // BLOCK, nb))


class QKVLinear(ColumnLinear):
    """q, k and v fused. The q heads split evenly over the ranks; so do the kv heads when
    ``tp_size`` divides them. With fewer kv heads than ranks (``tp_size`` a multiple of
    ``num_kv_heads``) each rank holds one kv head, replicated on ``replicas = tp_size //
    num_kv_heads`` consecutive ranks: rank r holds kv head ``r // replicas``, the one its q
    heads attend to."""

    def __init__(
        self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
        dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1, quantization: str | None = None,
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
        super().__init__(
            hidden, sizes, bias, dtype, tp_rank, tp_size, shard_ids=("q", "k", "v"), slices=slices,
            quantization=quantization,
        )
        self.q_size, self.kv_size = q_local * head_dim, kv_local * head_dim


class RowLinear(LinearBase):
    """Input features split across ranks; the partial sums are all-reduced over ``tp_group``
    before the bias (held whole by every rank) is added once."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
        tp_rank: int = 0, tp_size: int = 1, tp_group: Any = None, quantization: str | None = None,
    ) -> None:
        assert in_features % tp_size == 0
        local = in_features // tp_size
        super().__init__(local, out_features, bias, dtype, quantization)
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
        _attach(self.weight, lambda s: torch.Size((out_features, in_features)), self._load_weight)
        if self.bias is not None:
            _attach(self.bias, lambda s: torch.Size((out_features,)), _copy_whole)
        if self.weight_scale_inv is not None:
            self._attach_fp8(
                lambda s: torch.Size((_cdiv(out_features, BLOCK), _cdiv(in_features, BLOCK))), self._load_scale,
                lambda s: _aligned(local, in_features),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._matmul(x, self.bias)
        y = tensor_model_parallel_all_reduce(self._matmul(x, None), self.tp_group)
        return y if self.bias is None else y + self.bias

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: None = None) -> None:
        local = param.shape[1]
        part = loaded.narrow(1, self.tp_rank * local, local)
        if self.weight_scale_inv is not None and loaded.dtype != FP8_DTYPE:
            self._store(0, part)
            return
        param.data.copy_(part)

    def _load_scale(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: None = None) -> None:
        """An FP8 checkpoint's ``weight_scale_inv``: this rank's block columns."""
        local = self.weight.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp_rank * local // BLOCK, _cdiv(local, BLOCK)))


def _copy_whole(param: nn.Parameter, loaded: torch.Tensor, shard_id: None = None) -> None:
    param.data.copy_(loaded)


def replicated_param(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    """A parameter every rank holds whole (norm weights)."""
    return _attach(_param(shape, dtype), lambda s: torch.Size(shape), _copy_whole)
