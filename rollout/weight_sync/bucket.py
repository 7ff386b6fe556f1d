"""One flattened bucket format for moving weights between processes.

A bucket is one flat ``uint8`` buffer plus a list of ``TensorMeta`` saying where each tensor
lives in it. Transports move the buffer as raw bytes and the metadata as JSON (never pickle),
and the receiver gets typed views with ``unpack``.

Layout invariants (``schema.metas_from_json`` checks them for anything that crossed a process):
- tensors lie in the order listed, each at the first multiple of ``ALIGN`` (256 bytes) at or
  after the end of the one before, so they never overlap and offsets suit every dtype;
- ``nbytes == prod(shape) * itemsize``; the buffer ends where the last tensor ends;
- names are unique within a bucket, which holds at most ``MAX_TENSORS_PER_BUCKET`` tensors.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch

from rollout.errors import WeightUpdateError

ALIGN = 256  # bytes; every tensor starts on a multiple of this in a packed buffer
DEFAULT_BUCKET_BYTES = 512 << 20
# Bounds the metadata a receiver must parse per bucket (many tiny tensors would otherwise
# make one bucket's JSON as large as its data).
MAX_TENSORS_PER_BUCKET = 1 << 16

# Dtypes that may appear in metadata, by their torch attribute name ("bfloat16").
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
        "int64", "int32", "int16", "int8", "uint8", "bool",
    )
    if hasattr(torch, name)
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


@dataclass
class TensorMeta:
    name: str  # HF parameter name
    dtype: str  # torch attribute name, e.g. "bfloat16"
    shape: list[int]
    offset: int  # byte offset in the bucket buffer
    nbytes: int


@dataclass
class Bucket:
    metas: list[TensorMeta]  # in the order the tensors were given
    buffer: torch.Tensor  # [num_bytes] uint8, contiguous, on any device


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise WeightUpdateError(f"dtype {dtype} cannot be bucketed; allowed: {sorted(_DTYPES)}")
    return _NAMES[dtype]


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def pack(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    device: torch.device | str | None = None,
) -> Iterator[Bucket]:
    """Copy tensors into as few flat buffers as fit ``bucket_bytes`` (and
    ``MAX_TENSORS_PER_BUCKET``), keeping their order.

    A tensor larger than ``bucket_bytes`` gets a bucket of its own. ``device`` is where the
    buffers live (default: the device of each bucket's first tensor). Inputs may be of any
    supported dtype, non-contiguous or 0-dim; they are read, never modified.
    """
    if not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
        raise WeightUpdateError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
    pending: list[tuple[TensorMeta, torch.Tensor]] = []
    end = 0  # bytes used by ``pending``
    for i, item in enumerate(named_tensors):
        name, tensor = _check_item(i, item)
        nbytes = tensor.numel() * tensor.element_size()
        offset = _align(end)
        if pending and (offset + nbytes > bucket_bytes or len(pending) == MAX_TENSORS_PER_BUCKET):
            yield _flush(pending, end, device)
            pending, offset = [], 0
        meta = TensorMeta(name, dtype_name(tensor.dtype), list(tensor.shape), offset, nbytes)
        pending.append((meta, tensor))
        end = offset + nbytes
    if pending:
        yield _flush(pending, end, device)


def _check_item(i: int, item) -> tuple[str, torch.Tensor]:
    if not (isinstance(item, tuple | list) and len(item) == 2):
        raise WeightUpdateError(f"entry {i}: expected a (name, tensor) pair, got {type(item)}")
    name, tensor = item
    if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
        raise WeightUpdateError(
            f"entry {i} ({name!r}): expected (str, torch.Tensor), "
            f"got ({type(name).__name__}, {type(tensor).__name__})"
        )
    return name, tensor


@torch.no_grad()
def _flush(pending: list[tuple[TensorMeta, torch.Tensor]], num_bytes: int, device) -> Bucket:
    buffer = torch.empty(num_bytes, dtype=torch.uint8, device=device or pending[0][1].device)
    for meta, tensor in pending:
        _view(buffer, meta).copy_(tensor)  # copy_ handles strides and devices
    return Bucket([meta for meta, _ in pending], buffer)


def _view(buffer: torch.Tensor, meta: TensorMeta) -> torch.Tensor:
    flat = buffer[meta.offset : meta.offset + meta.nbytes]
    return flat.view(_DTYPES[meta.dtype]).view(meta.shape)


def unpack(bucket: Bucket) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, typed view into bucket.buffer)`` in order; nothing is copied."""
    for meta in bucket.metas:
        yield meta.name, _view(bucket.buffer, meta)


def metas_to_json(metas: list[TensorMeta]) -> str:
    return json.dumps([asdict(m) for m in metas], separators=(",", ":"))
