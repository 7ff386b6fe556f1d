"""Bucket metadata from another process, parsed as untrusted input.

Whatever a peer sends is checked in full before any of it is used, and every problem is a
``WeightSyncError`` (never a ``TypeError``, ``RecursionError`` or ``MemoryError`` from the
parser):

- the JSON is refused unparsed when it is longer than ``MAX_JSON_BYTES``, or nested deeper
  than the schema's three levels (counted without recursion before ``json.loads``, so a
  document of a million ``[`` cannot reach the parser's recursion limit);
- it must be a list of at most ``MAX_TENSORS_PER_BUCKET`` objects with exactly the fields of
  ``TensorMeta``: a printable name of at most ``MAX_NAME_CHARS``, a dtype from the allowlist,
  a shape of at most ``MAX_NDIM`` ints in ``[0, MAX_DIM]``, ints (not bools) for the offsets;
- the layout is the one ``pack`` writes (see ``bucket``): in order, each tensor at the first
  multiple of ``ALIGN`` at or after the previous one's end, no duplicate names, and the buffer
  (when its length is given) ending exactly where the last tensor ends. So a receiver never
  allocates more than the tensors plus their padding, and no view leaves the buffer.
"""

from __future__ import annotations

import json
import math

import torch

from rollout.errors import WeightSyncError
from rollout.weight_sync.bucket import _DTYPES, ALIGN, MAX_TENSORS_PER_BUCKET, TensorMeta

MAX_JSON_BYTES = 64 << 20  # ~65k tensors with long names fit in a tenth of this
MAX_NAME_CHARS = 512
MAX_NDIM = 16
MAX_DIM = 1 << 40  # a zero-size tensor's other dims are not bounded by its nbytes
_MAX_DEPTH = 3  # [ {"shape": [ ... ] } ]
_FIELDS = ("name", "dtype", "shape", "offset", "nbytes")
# bytes.translate tables for the depth count: strings blanked first, then brackets only.
_OPEN, _CLOSE = b"[{", b"]}"
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _OPEN + _CLOSE)
_STEP = bytes.maketrans(_OPEN + _CLOSE, b"\x01\x01\xff\xff")  # +1 / -1 as int8


def metas_from_json(s: str | bytes, buffer_nbytes: int | None = None) -> list[TensorMeta]:
    """Parse and strictly validate metadata; with ``buffer_nbytes`` the tensors must also end
    exactly at the buffer's end. Raises ``WeightSyncError`` naming the first problem."""
    data = s.encode() if isinstance(s, str) else s
    if not isinstance(data, (bytes, bytearray)):
        raise WeightSyncError(f"bucket metadata must be str or bytes, got {type(s).__name__}")
    if len(data) > MAX_JSON_BYTES:
        raise WeightSyncError(f"bucket metadata is {len(data)} bytes, more than MAX_JSON_BYTES={MAX_JSON_BYTES}")
    depth = _max_depth(bytes(data))
    if depth > _MAX_DEPTH:
        raise WeightSyncError(f"bucket metadata is nested {depth} deep; the schema has {_MAX_DEPTH} levels")
    try:
        raw = json.loads(data)
    except (ValueError, TypeError, RecursionError) as e:  # ValueError covers bad UTF-8 and huge ints
        raise WeightSyncError(f"bucket metadata is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(raw, list):
        raise WeightSyncError(f"bucket metadata must be a JSON list, got {type(raw).__name__}")
    if len(raw) > MAX_TENSORS_PER_BUCKET:
        raise WeightSyncError(f"bucket metadata lists {len(raw)} tensors, more than {MAX_TENSORS_PER_BUCKET}")
    metas = [_meta_from_dict(i, entry) for i, entry in enumerate(raw)]
    validate_layout(metas, buffer_nbytes)
    return metas


def _max_depth(data: bytes) -> int:
    """Deepest bracket nesting of a JSON text, brackets inside strings not counted; linear,
    no recursion (a running sum of +1/-1 per bracket). A malformed text just gets some
    depth: ``json.loads`` refuses it later."""
    bare = _blank_strings(data).translate(None, _NOT_BRACKETS)
    if not bare:
        return 0
    steps = torch.frombuffer(bytearray(bare.translate(_STEP)), dtype=torch.int8)
    return int(steps.to(torch.int32).cumsum(0).max())


def _blank_strings(data: bytes) -> bytes:
    """``data`` without its JSON strings (quotes included). Linear: ``find`` and ``rstrip``
    run in C over each stretch between two quotes once."""
    out, i = [], 0
    while (start := data.find(b'"', i)) >= 0:
        out.append(data[i:start])
        quote = start
        while True:  # the closing quote is the first one after an even run of backslashes
            quote_next = data.find(b'"', quote + 1)
            if quote_next < 0:
                return b"".join(out)  # unterminated: json.loads refuses it
            run = data[quote + 1 : quote_next]
            quote = quote_next
            if (len(run) - len(run.rstrip(b"\\"))) % 2 == 0:
                break
        i = quote + 1
    out.append(data[i:])
    return b"".join(out)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _meta_from_dict(i: int, entry) -> TensorMeta:
    where = f"bucket metadata entry {i}"
    if not isinstance(entry, dict) or set(entry) != set(_FIELDS):
        keys = sorted(map(str, entry))[:10] if isinstance(entry, dict) else type(entry).__name__
        raise WeightSyncError(f"{where}: expected exactly the keys {list(_FIELDS)}, got {keys}")
    name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
        shown = repr(name)[:80]
        raise WeightSyncError(f"{where}: name must be a printable string of 1 to {MAX_NAME_CHARS} characters, got {shown}")
    where += f" ({name!r})"
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise WeightSyncError(f"{where}: unknown dtype {str(dtype)[:40]!r}; allowed: {sorted(_DTYPES)}")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape)):
        raise WeightSyncError(
            f"{where}: shape must be a list of at most {MAX_NDIM} ints in [0, {MAX_DIM}], got {str(shape)[:80]}"
        )
    for key in ("offset", "nbytes"):
        if not _is_int(entry[key]) or entry[key] < 0:
            raise WeightSyncError(f"{where}: {key} must be an int >= 0, got {str(entry[key])[:40]}")
    meta = TensorMeta(name, dtype, list(shape), entry["offset"], entry["nbytes"])
    need = math.prod(shape) * _DTYPES[dtype].itemsize
    if meta.nbytes != need:
        raise WeightSyncError(f"{where}: nbytes={meta.nbytes} but shape {shape} of {dtype} needs {need}")
    return meta


def validate_layout(metas: list[TensorMeta], buffer_nbytes: int | None = None) -> None:
    """The layout ``pack`` writes (see the module docstring); ``WeightSyncError`` otherwise."""
    seen: set[str] = set()
    prev_end, prev = 0, None
    for meta in metas:
        where = f"bucket metadata ({meta.name!r})"
        if meta.name in seen:
            raise WeightSyncError(f"bucket metadata: duplicate tensor {meta.name!r}")
        seen.add(meta.name)
        end = meta.offset + meta.nbytes
        if buffer_nbytes is not None and end > buffer_nbytes:
            raise WeightSyncError(
                f"{where}: bytes [{meta.offset}, {end}) out of range of a {buffer_nbytes}-byte buffer"
            )
        if meta.offset < prev_end:
            raise WeightSyncError(f"{where}: starts at {meta.offset}, inside or before {prev!r} (ends at {prev_end})")
        want = -(-prev_end // ALIGN) * ALIGN
        if meta.offset != want:
            raise WeightSyncError(
                f"{where}: starts at {meta.offset}; packed tensors start at the first multiple of {ALIGN} "
                f"after the previous end, {want}"
            )
        prev_end, prev = end, meta.name
    if buffer_nbytes is not None and buffer_nbytes != prev_end:
        raise WeightSyncError(
            f"bucket metadata: the tensors end at byte {prev_end} but the buffer has {buffer_nbytes} bytes"
        )
