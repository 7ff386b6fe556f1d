"""A local Ray cluster for tests: loopback only, no dashboard, started and stopped by the test.

Ray picks the machine's routable address on Linux unless it is told it is not in cluster
mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the switch it uses on macOS/Windows): then
every Ray process binds to 127.0.0.1. Ray reads it when it is imported, so it is set
here, before the first ``import ray``, and passed to subprocesses through ``ray_env``.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# For every worker process (WorkerGroupConfig.env_vars): one intra-op thread (2-core CI),
# the repository importable.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def ray_env() -> dict[str, str]:
    """The environment of a subprocess that starts its own loopback-only Ray cluster."""
    return {**os.environ, **LOOPBACK_ENV, **WORKER_ENV}


def start_local_ray(num_cpus: int):
    """``ray.init`` of a fresh local loopback cluster; returns the ``ray`` module."""
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False)
    address = ray.nodes()[0]["NodeManagerAddress"]
    if address != "127.0.0.1":  # ray was imported before LOOPBACK_ENV could take effect
        ray.shutdown()
        raise RuntimeError(f"the test Ray cluster bound {address}, not loopback: import ray after tests.helpers.ray_cluster")
    return ray
