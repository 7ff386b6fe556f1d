"""One step's metrics over the data-parallel replicas: the whole-run view a driver prints."""

from __future__ import annotations

from typing import Any

MAX_KEYS = ("training/rollout_probs_diff_max", "check/engine_vs_trainer_max_abs")  # worst rank, not mean
SAME_KEYS = ("step", "dp_size", "probe")  # equal on every rank


def merge_metrics(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Whole-run view of one step, one dict per data-parallel replica: every key averaged,
    but the worst rank for the max-type ones and the shared labels (step, dp_size, probe)
    as they are."""
    merged = {k: sum(r[k] for r in per_rank) / len(per_rank) for k in per_rank[0] if k not in SAME_KEYS}
    for k in MAX_KEYS:
        merged[k] = max(r[k] for r in per_rank)
    merged.update({k: per_rank[0][k] for k in SAME_KEYS})
    return merged
