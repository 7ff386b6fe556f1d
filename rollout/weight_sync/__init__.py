"""Cross-process weight transfer: one bucket format and the transports that move it.

``bucket`` flattens many tensors into a few uint8 buffers plus JSON metadata; ``schema``
parses metadata from another process as untrusted input; ``broadcast`` moves buckets over a
caller-made ``torch.distributed`` group (NCCL or gloo) with the wire protocol of
``protocol`` (votes, so either side can abort and neither hangs); ``cuda_ipc`` shares a
bucket with another process on the same GPU. Every receiving side yields ``(HF name,
tensor)`` pairs for ``LLM.update_weights``. Nothing is pickled; anything malformed from a
peer is a ``WeightSyncError``, a dead or silent peer a ``PeerFailureError``.
"""

from rollout.weight_sync.bucket import (
    ALIGN,
    DEFAULT_BUCKET_BYTES,
    MAX_TENSORS_PER_BUCKET,
    Bucket,
    TensorMeta,
    metas_to_json,
    pack,
    unpack,
)
from rollout.weight_sync.broadcast import recv_all, recv_weights, send_weights
from rollout.weight_sync.cuda_ipc import IpcHandle, open_shared, parse_handle, share
from rollout.weight_sync.protocol import DEFAULT_MAX_BUCKET_BYTES
from rollout.weight_sync.schema import MAX_JSON_BYTES, metas_from_json, validate_layout

__all__ = [
    "ALIGN",
    "DEFAULT_BUCKET_BYTES",
    "DEFAULT_MAX_BUCKET_BYTES",
    "MAX_JSON_BYTES",
    "MAX_TENSORS_PER_BUCKET",
    "Bucket",
    "IpcHandle",
    "TensorMeta",
    "metas_from_json",
    "metas_to_json",
    "open_shared",
    "pack",
    "parse_handle",
    "recv_all",
    "recv_weights",
    "send_weights",
    "share",
    "unpack",
    "validate_layout",
]
