"""Cross-process weight transfer: one bucket format and the transports that move it.

``bucket`` flattens many tensors into a few uint8 buffers plus JSON metadata; ``broadcast``
moves buckets over a caller-made ``torch.distributed`` group (NCCL or gloo); ``cuda_ipc``
shares a bucket with another process on the same GPU. Every receiving side yields
``(HF name, tensor)`` pairs for ``LLM.update_weights``. Nothing is pickled.
"""

from rollout.weight_sync.bucket import (
    ALIGN,
    DEFAULT_BUCKET_BYTES,
    Bucket,
    TensorMeta,
    metas_from_json,
    metas_to_json,
    pack,
    unpack,
)
from rollout.weight_sync.broadcast import recv_all, recv_weights, send_weights
from rollout.weight_sync.cuda_ipc import open_shared, share

__all__ = [
    "ALIGN",
    "DEFAULT_BUCKET_BYTES",
    "Bucket",
    "TensorMeta",
    "metas_from_json",
    "metas_to_json",
    "open_shared",
    "pack",
    "recv_all",
    "recv_weights",
    "send_weights",
    "share",
    "unpack",
]
