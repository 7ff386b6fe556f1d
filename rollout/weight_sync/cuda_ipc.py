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
"""

from __future__ import annotations

import base64
from typing import Any

import torch

from rollout.errors import WeightUpdateError
from rollout.weight_sync.bucket import Bucket, metas_from_json, metas_to_json

_INT_FIELDS = ("device", "storage_size_bytes", "storage_offset_bytes", "ref_counter_offset",
               "offset", "nbytes")
_BYTES_FIELDS = ("handle", "ref_counter_handle", "event_handle")


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
    """Map a handle from ``share`` (made in another process) into this one as a ``Bucket``."""
    if not isinstance(handle, dict):
        raise WeightUpdateError(f"CUDA IPC handle must be a dict, got {type(handle).__name__}")
    for key in _INT_FIELDS:
        value = handle.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise WeightUpdateError(f"CUDA IPC handle: {key} must be an int >= 0, got {value!r}")
    if not isinstance(handle.get("event_sync_required"), bool):
        raise WeightUpdateError("CUDA IPC handle: event_sync_required must be a bool")
    if not isinstance(handle.get("metas"), str):
        raise WeightUpdateError("CUDA IPC handle: metas must be a JSON string")
    decoded = {key: _unb64(key, handle.get(key)) for key in _BYTES_FIELDS}
    nbytes, offset = handle["nbytes"], handle["offset"]
    if offset + nbytes > handle["storage_size_bytes"]:
        raise WeightUpdateError(
            f"CUDA IPC handle: bytes [{offset}, {offset + nbytes}) outside a storage of "
            f"{handle['storage_size_bytes']} bytes"
        )
    metas = metas_from_json(handle["metas"], nbytes)
    device = torch.device("cuda", handle["device"])
    if nbytes == 0 or decoded["handle"] is None:  # an empty bucket has no allocation
        return Bucket(metas, torch.empty(0, dtype=torch.uint8, device=device))
    torch.cuda._lazy_init()
    storage = torch.UntypedStorage._new_shared_cuda(
        handle["device"],
        decoded["handle"],
        handle["storage_size_bytes"],
        handle["storage_offset_bytes"],
        decoded["ref_counter_handle"],
        handle["ref_counter_offset"],
        decoded["event_handle"],
        handle["event_sync_required"],
    )
    buffer = torch.empty(0, dtype=torch.uint8, device=device).set_(storage, offset, (nbytes,))
    return Bucket(metas, buffer)


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode("ascii")


def _unb64(key: str, text) -> bytes | None:
    if text is None:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise WeightUpdateError(f"CUDA IPC handle: {key} is not base64") from None
