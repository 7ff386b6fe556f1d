"""The rank side of ``trainers_integration.ray``: the Ray actor hosting one rank (its
torch.distributed world and the user's worker) and the plain-data check on everything that
crosses between the driver and the workers."""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

INSTALL_HINT = "pip install 'rollout[ray]'"


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"trainers_integration.ray needs Ray: {INSTALL_HINT}") from e
    return ray


# ---- plain data only ------------------------------------------------------------------------
def find_tensor(obj: Any, path: str = "value") -> str | None:
    """Where a ``torch.Tensor`` sits in ``obj`` (lists, tuples, sets, dicts, dataclasses),
    as a path like ``"result[2]['lp']"``, or None: what may not cross driver <-> worker."""
    import torch

    if isinstance(obj, torch.Tensor):
        return path
    if isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return None
    if isinstance(obj, dict):
        items = ((f"{path}[{k!r}]", v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = ((f"{path}.{f.name}", getattr(obj, f.name)) for f in dataclasses.fields(obj))
    else:
        return None
    for sub_path, value in items:
        found = find_tensor(value, sub_path)
        if found:
            return found
    return None


def refuse_tensors(obj: Any, path: str) -> None:
    found = find_tensor(obj, path)
    if found:
        raise TypeError(f"{found} is a torch.Tensor: only plain data crosses between the driver and the "
                        "workers (convert with .tolist(); weights move inside each worker)")


# ---- the actor ------------------------------------------------------------------------------
class RankActor:
    """Hosts one rank in a Ray actor: the torch.distributed world and the user's worker.
    Every call answers ``(True, result)`` or ``(False, error dict)``, so a worker's
    exception reaches the driver as plain text, whatever its class."""

    def __init__(self) -> None:
        self._worker: Any = None

    def node_info(self) -> tuple[str, str]:
        ray = import_ray()
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def free_port(self, host: str) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return s.getsockname()[1]

    def setup(self, env: dict[str, str], loopback: bool, backend: str, timeout_s: float,
              factory: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[bool, Any]:
        return self._guard(self._setup, env, loopback, backend, timeout_s, factory, args, kwargs)

    def call(self, method: str, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        def run() -> Any:
            result = getattr(self._worker, method)(*args, **kwargs)
            refuse_tensors(result, f"{method}() result")
            return result

        return self._guard(run)

    def close(self) -> None:
        import torch.distributed as dist

        worker, self._worker = self._worker, None
        try:
            # The worker's own close first: an engine holding CUDA graphs of NCCL
            # all-reduces must shut down before the world is destroyed, or the destroy hangs.
            close = getattr(worker, "close", None)
            if callable(close):
                close()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    def _setup(self, env, loopback, backend, timeout_s, factory, args, kwargs) -> None:
        import torch.distributed as dist

        os.environ.update(env)
        if loopback and backend == "gloo" and sys.platform == "linux":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a one-node cluster: loopback only
        dist.init_process_group(backend, init_method="env://", rank=int(env["RANK"]),
                                world_size=int(env["WORLD_SIZE"]), timeout=timedelta(seconds=timeout_s))
        self._worker = factory(*args, **kwargs)

    @staticmethod
    def _guard(fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        try:
            return True, fn(*args)
        except Exception as e:  # noqa: BLE001 - every error goes back to the driver as text
            return False, {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
