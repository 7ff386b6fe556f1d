"""Weights from a trainer in another process on the same GPU, by CUDA IPC.

The sender packs a bucket on its GPU and calls ``share``: the result is a plain dict of
JSON-serialisable fields (bytes base64-encoded, metadata as ``metas_to_json``). The caller
moves it to the receiver over a channel it set up itself (its own pipe or socket: nothing
here opens one), and the receiver calls ``open_shared`` to get a ``Bucket`` whose buffer
aliases the sender's memory; ``unpack`` then gives typed views with no copy.

Contract:
- handles pass only between processes the caller set up, on the same machine; a process
  opens a given handle at most once (CUDA refuses to map one allocation twice), and never
  its own handles;
- the sender keeps the bucket alive (and unmodified) until the receiver says it is done,
  and the receiver copies what it needs (``update_weights`` does) and drops the bucket
  before saying so.

A handle is untrusted data: ``open_shared`` first checks it in full (``parse_handle``, a pure
function, no CUDA call) against what ``share`` makes: exactly its keys; ints (not bools) in
range for every size and offset, the bucket ``[offset, offset + nbytes)`` inside the storage;
a device this machine has; base64 fields of bounded length; a ref-counter name of torch's
form and a slot inside its file (the receiver increments that slot in shared memory); the
metadata by ``schema.metas_from_json``, ending exactly at ``nbytes``. A bad handle raises
``WeightSyncError`` and nothing is opened, mapped or written. What it cannot check without
opening the memory: that the storage really lies inside the sender's allocation (CUDA
refuses a handle that is not one; the offsets within it are taken on trust from a process
the caller chose to share with).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any

import torch

from rollout.errors import WeightSyncError, WeightUpdateError
from rollout.weight_sync.bucket import Bucket, TensorMeta, metas_to_json
from rollout.weight_sync.schema import MAX_JSON_BYTES, metas_from_json

# Bounds on what torch's _share_cuda_ produces (torch/csrc/StorageSharing.cpp):
_MAX_BYTES = 1 << 48  # any byte count or offset; far above any GPU's memory
# The memory handle: cudaIpcMemHandle_t (64 bytes) behind a version and a type byte, or,
# for expandable segments, one entry per mapped page: bounded by a bucket of pages.
_MAX_HANDLE_BYTES = 1 << 20
_EVENT_HANDLE_BYTES = 64  # cudaIpcEventHandle_t, always sent when there is an allocation
# The ref counter is a slot in a shared-memory file of CUDA_IPC_REF_COUNTER_FILE_SIZE int64s
# that the receiver opens by name and increments: both the name and the slot must be sane,
# or open_shared would write outside the file or into another shared-memory object.
_REF_COUNTER_SLOTS = 10000
_REF_COUNTER_NAME = re.compile(rb"/torch_[0-9]{1,10}_[0-9]{1,20}_[0-9]{1,20}")
_KEYS = frozenset((
    "metas", "device", "handle", "storage_size_bytes", "storage_offset_bytes", "ref_counter_handle",
    "ref_counter_offset", "event_handle", "event_sync_required", "offset", "nbytes",
))


@dataclass(frozen=True)
class IpcHandle:
    """A handle from ``share`` after ``parse_handle``: every field checked."""

    metas: list[TensorMeta]
    device: int
    handle: bytes | None  # None: an empty bucket, nothing to open
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes | None
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool
    offset: int  # of the bucket in the storage, bytes
    nbytes: int


def share(bucket: Bucket) -> dict[str, Any]:
    """A JSON-serialisable handle to ``bucket.buffer`` (which must be on a CUDA device)."""
    buffer = bucket.buffer
    if not buffer.is_cuda:
        raise WeightUpdateError(
            f"cuda_ipc.share needs a bucket on a CUDA device, got one on {buffer.device}; "
            "use the broadcast transport or pack(..., device='cuda')"
        )
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
        raise WeightUpdateError("cuda_ipc.share needs a flat contiguous uint8 bucket buffer")
    if buffer.numel() == 0:  # no allocation to share
        device, handle, size, offset = buffer.device.index or 0, None, 0, 0
        rc_handle, rc_offset, event_handle, event_sync = None, 0, None, False
    else:
        (device, handle, size, offset, rc_handle, rc_offset, event_handle, event_sync) = (
            buffer.untyped_storage()._share_cuda_()
        )
    return {
        "metas": metas_to_json(bucket.metas),
        "device": int(device),
        "handle": _b64(handle),
        "storage_size_bytes": int(size),
        "storage_offset_bytes": int(offset),
        "ref_counter_handle": _b64(rc_handle),
        "ref_counter_offset": int(rc_offset),
        "event_handle": _b64(event_handle),
        "event_sync_required": bool(event_sync),
        "offset": buffer.storage_offset() if buffer.numel() else 0,  # bytes: the buffer is uint8
        "nbytes": buffer.numel(),
    }


def open_shared(handle: dict[str, Any]) -> Bucket:
    """Map a handle from ``share`` (made in another process) into this one as a ``Bucket``.

    The handle is checked in full first (``parse_handle``, no CUDA call): a bad one raises
    ``WeightSyncError`` and nothing is opened, mapped or written."""
    parsed = parse_handle(handle, torch.cuda.device_count())
    device = torch.device("cuda", parsed.device)
    if parsed.handle is None:  # an empty bucket has no allocation
        return Bucket(parsed.metas, torch.empty(0, dtype=torch.uint8, device=device))
    torch.cuda._lazy_init()
    storage = torch.UntypedStorage._new_shared_cuda(
        parsed.device,
        parsed.handle,
        parsed.storage_size_bytes,
        parsed.storage_offset_bytes,
        parsed.ref_counter_handle,
        parsed.ref_counter_offset,
        parsed.event_handle,
        parsed.event_sync_required,
    )
    buffer = torch.empty(0, dtype=torch.uint8, device=device).set_(storage, parsed.offset, (parsed.nbytes,))
    return Bucket(parsed.metas, buffer)


def parse_handle(raw: Any, device_count: int) -> IpcHandle:
    """Check a received handle as plain data against what ``share`` makes; ``WeightSyncError``
    names the first problem. Pure: no CUDA call (``device_count`` is given)."""
    if not isinstance(raw, dict):
        raise WeightSyncError(f"CUDA IPC handle must be a dict, got {type(raw).__name__}")
    if set(raw) != _KEYS:
        extra = sorted(map(repr, set(raw) - _KEYS))[:5]
        raise WeightSyncError(f"CUDA IPC handle: keys must be exactly {sorted(_KEYS)}; "
                              f"missing {sorted(_KEYS - set(raw))}, unexpected {extra}")
    ints = {}
    for key in ("device", "storage_size_bytes", "storage_offset_bytes", "ref_counter_offset", "offset", "nbytes"):
        value = raw[key]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_BYTES:
            raise WeightSyncError(f"CUDA IPC handle: {key} must be an int in [0, {_MAX_BYTES}], got {str(value)[:40]}")
        ints[key] = value
    if not isinstance(raw["event_sync_required"], bool):
        raise WeightSyncError("CUDA IPC handle: event_sync_required must be a bool")
    if not isinstance(raw["metas"], str) or len(raw["metas"]) > MAX_JSON_BYTES:
        raise WeightSyncError(f"CUDA IPC handle: metas must be a JSON string of at most {MAX_JSON_BYTES} characters")
    handle = _unb64("handle", raw["handle"], _MAX_HANDLE_BYTES)
    rc_handle = _unb64("ref_counter_handle", raw["ref_counter_handle"], 64)
    event_handle = _unb64("event_handle", raw["event_handle"], _EVENT_HANDLE_BYTES)
    nbytes, offset, size = ints["nbytes"], ints["offset"], ints["storage_size_bytes"]
    if offset + nbytes > size:
        raise WeightSyncError(f"CUDA IPC handle: bytes [{offset}, {offset + nbytes}) outside a storage of {size} bytes")
    if ints["storage_offset_bytes"] + size > _MAX_BYTES:
        raise WeightSyncError(f"CUDA IPC handle: storage [{ints['storage_offset_bytes']}, +{size}) beyond {_MAX_BYTES} bytes")
    if nbytes == 0:
        _check_empty(raw, handle, rc_handle, event_handle)
    else:
        _check_allocation(raw, handle, rc_handle, event_handle, ints["ref_counter_offset"])
    if not ints["device"] < device_count:
        raise WeightSyncError(f"CUDA IPC handle: device {ints['device']} outside [0, {device_count}) on this machine")
    metas = metas_from_json(raw["metas"], nbytes)
    return IpcHandle(metas, ints["device"], handle, size, ints["storage_offset_bytes"], rc_handle,
                     ints["ref_counter_offset"], event_handle, raw["event_sync_required"], offset, nbytes)


def _check_empty(raw: dict, handle, rc_handle, event_handle) -> None:
    # share() of an empty buffer: no allocation, so nothing that could be opened.
    if handle is not None or rc_handle is not None or event_handle is not None:
        raise WeightSyncError("CUDA IPC handle: an empty bucket (nbytes=0) carries no memory, ref counter or event handle")
    if raw["storage_size_bytes"] or raw["storage_offset_bytes"] or raw["ref_counter_offset"] or raw["event_sync_required"]:
        raise WeightSyncError("CUDA IPC handle: an empty bucket (nbytes=0) must have zero sizes and offsets")


def _check_allocation(raw: dict, handle, rc_handle, event_handle, rc_offset: int) -> None:
    if not handle:
        raise WeightSyncError("CUDA IPC handle: a non-empty bucket needs a memory handle")
    if rc_handle is None or not _REF_COUNTER_NAME.fullmatch(rc_handle):
        raise WeightSyncError(
            f"CUDA IPC handle: ref_counter_handle must name torch's shared ref-counter file "
            f"(/torch_<pid>_<n>_<n>), got {str(rc_handle)[:80]}"
        )
    if not rc_offset < _REF_COUNTER_SLOTS:
        raise WeightSyncError(f"CUDA IPC handle: ref_counter_offset {rc_offset} outside the file's [0, {_REF_COUNTER_SLOTS}) slots")
    if event_handle is None or len(event_handle) != _EVENT_HANDLE_BYTES:
        raise WeightSyncError(f"CUDA IPC handle: event_handle must be {_EVENT_HANDLE_BYTES} bytes")


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode("ascii")


def _unb64(key: str, text: Any, max_bytes: int) -> bytes | None:
    """None stays None; else base64 text of at most ``max_bytes`` bytes (checked before decoding)."""
    if text is None:
        return None
    if not isinstance(text, str) or len(text) > 4 * (-(-max_bytes // 3)):
        raise WeightSyncError(f"CUDA IPC handle: {key} must be base64 text of at most {max_bytes} bytes")
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise WeightSyncError(f"CUDA IPC handle: {key} is not base64") from None
    if len(raw) > max_bytes:
        raise WeightSyncError(f"CUDA IPC handle: {key} is {len(raw)} bytes, more than {max_bytes}")
    return raw
