"""The colocated cycle as one helper: wake weights -> update -> wake KV -> generate -> sleep.

The trainer and the engine share a device; between rollouts the engine sleeps and the
trainer has the memory. Typical step::

    with rollout_phase(llm, iter_full_weights(model), version=step) as stats:
        outs = llm.generate(prompts, params)
    # stats: sync_s, wake_s, sleep_s, bytes_freed, ... ; the engine sleeps again

Device memory (``llm.memory_usage()`` and the platform's free memory) is logged at every
boundary.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from rollout.weight_sync.bucket import DEFAULT_BUCKET_BYTES
from trainers_integration.sync import update_weights_in_buckets

logger = logging.getLogger(__name__)


def _log_memory(llm, boundary: str) -> int:
    usage = llm.memory_usage()
    device = sum(v["device"] for v in usage.values())
    try:
        free, total = llm.platform.mem_get_info(llm.device)
        platform = f"; {llm.device} free {free / 2**20:.1f} of {total / 2**20:.1f} MiB"
    except Exception:  # noqa: BLE001 - not every platform can tell
        platform = ""
    logger.info(
        "%s: engine holds %.1f MiB on device (%s)%s", boundary, device / 2**20,
        ", ".join(f"{tag} {v['device'] / 2**20:.1f} MiB device / {v['host'] / 2**20:.1f} MiB host"
                  for tag, v in usage.items()),
        platform,
    )
    return device


def begin_rollout(
    llm, weights: Iterable[tuple[str, torch.Tensor]] | None, version: int | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES, level: int = 1,
) -> dict[str, Any]:
    """Wake the weights, load ``weights`` (None: keep the ones kept by a level-1 sleep) in
    chunks of ``bucket_bytes``, then wake the KV cache. Returns the stats so far (sync_s,
    wake_s, num_tensors, bytes_synced, weight_version). On an error the engine is put back
    to sleep at ``level`` (the caller's sleep level) so the trainer gets its memory, and the
    error propagates."""
    stats: dict[str, Any] = {"num_tensors": 0, "bytes_synced": 0}
    _log_memory(llm, "rollout: before wake")
    try:
        t0 = time.perf_counter()
        llm.wake_up(["weights"])
        t1 = time.perf_counter()
        if weights is not None:
            stats["num_tensors"], stats["bytes_synced"] = update_weights_in_buckets(llm, weights, bucket_bytes, version)
        t2 = time.perf_counter()
        llm.wake_up(["kv_cache"])
        t3 = time.perf_counter()
    except BaseException:
        llm.sleep(level)
        raise
    stats.update(wake_s=(t1 - t0) + (t3 - t2), sync_s=t2 - t1, weight_version=llm.weight_version)
    stats["device_bytes_awake"] = _log_memory(llm, f"rollout: awake, weights v{llm.weight_version}")
    return stats


def end_rollout(llm, stats: dict[str, Any] | None = None, level: int = 1) -> dict[str, Any]:
    """Sleep at ``level`` and add sleep_s and bytes_freed to ``stats`` (returned)."""
    stats = {} if stats is None else stats
    before = _log_memory(llm, "rollout: before sleep")
    t0 = time.perf_counter()
    llm.sleep(level)
    stats["sleep_s"] = time.perf_counter() - t0
    stats["bytes_freed"] = before - _log_memory(llm, f"rollout: asleep (level {level})")
    return stats


@contextlib.contextmanager
def rollout_phase(
    llm, weights: Iterable[tuple[str, torch.Tensor]] | None, version: int | None = None,
    level: int = 1, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> Iterator[dict[str, Any]]:
    """``begin_rollout`` on enter, ``end_rollout(level)`` on exit (also when the body
    raises); yields the stats dict, complete once the block has exited."""
    stats = begin_rollout(llm, weights, version, bucket_bytes, level)
    try:
        yield stats
    finally:
        end_rollout(llm, stats, level)
