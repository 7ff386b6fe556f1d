"""The rank side of ``trainers_integration.ray``: the Ray actor hosting one rank (its
torch.distributed world and the user's worker), the allowlist of worker methods a call may
name, and the plain-data check on everything that crosses between the driver and the workers.

The rank does not trust what reaches it: a call names a method in its allowlist (fixed at
setup: the names given to the ``WorkerGroup``, else the worker class's public methods; never
a ``_private`` or ``__dunder__`` name, an attribute or an unknown name), and its arguments
and result must be plain data (``check_plain``). Both refusals are ``InvalidRequestError``:
the call itself is what is wrong, with a field (the method, or the path of the bad
argument), the value and what is allowed, and nothing was run. (This keeps a wrong or
confused caller away from the engine's internals; it is no sandbox: Ray unpickles every
call's arguments before the actor sees them, so a process that can reach the actors of a
cluster can already run code in them.)
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import socket
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from types import FunctionType
from typing import Any

from rollout.errors import InvalidRequestError

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
    """For the worker factory's arguments (configs such as an ``argparse.Namespace`` are fine
    there, tensors are not); calls are held to ``check_plain``."""
    found = find_tensor(obj, path)
    if found:
        raise TypeError(f"{found} is a torch.Tensor: only plain data crosses between the driver and the "
                        "workers (convert with .tolist(); weights move inside each worker)")


MAX_PLAIN_DEPTH = 32
MAX_PLAIN_ITEMS = 1 << 24  # e.g. 4096 prompts of 4096 tokens
_SCALARS = (type(None), bool, int, float, str, bytes)
PLAIN = (f"plain data: None, bool, int, float, str, bytes, and lists, tuples and dicts with str keys of "
         f"them, at most {MAX_PLAIN_DEPTH} deep and {MAX_PLAIN_ITEMS} items")


def check_plain(obj: Any, path: str) -> None:
    """Raise ``InvalidRequestError`` (field: the path of the first bad item) unless ``obj`` is
    ``PLAIN`` data. Exact types, so no subclass brings its own methods along; iterative, so
    deep nesting is refused, never a ``RecursionError``. Tensors are refused too: no worker
    method takes or returns one (weights move inside each worker)."""
    stack: list[tuple[Any, int, tuple | None]] = [(obj, 0, None)]  # (value, depth, (parent link, key))
    seen = 1  # items pushed so far: bounded before a container's items are pushed
    while stack:
        value, depth, link = stack.pop()
        kind = type(value)
        if kind in _SCALARS:
            continue
        if kind not in (list, tuple, dict):
            torch = sys.modules.get("torch")
            tensor = torch is not None and isinstance(value, torch.Tensor)
            detail = "a torch.Tensor: convert with .tolist(); weights move inside each worker" if tensor else ""
            raise InvalidRequestError(_path(path, link), f"<{kind.__module__}.{kind.__qualname__}>", PLAIN, detail)
        if depth >= MAX_PLAIN_DEPTH:
            raise InvalidRequestError(_path(path, link), f"<{kind.__name__} nested {depth} deep>", PLAIN)
        seen += len(value)
        if seen > MAX_PLAIN_ITEMS:
            raise InvalidRequestError(path, f"<more than {MAX_PLAIN_ITEMS} items>", PLAIN)
        if kind is dict:
            for key, v in value.items():
                if type(key) is not str:
                    shown = key if type(key) in _SCALARS else f"<{type(key).__qualname__}>"
                    raise InvalidRequestError(_path(path, link) + " key", shown, PLAIN)
                stack.append((v, depth + 1, (link, key)))
        else:
            stack.extend((v, depth + 1, (link, i)) for i, v in enumerate(value))


def _path(root: str, link: tuple | None) -> str:
    keys = []
    while link is not None:
        link, key = link
        keys.append(f"[{key!r}]")
    return root + "".join(reversed(keys))


# ---- which methods a call may name ------------------------------------------------------------
def public_methods(cls: type) -> frozenset[str]:
    """What a driver may call on a worker of class ``cls`` by default: the methods (plain,
    static or class) that it or a base other than ``object`` defines, not starting with ``_``.
    Attributes, properties and anything private or dunder are not methods to call."""
    names = {name for klass in cls.__mro__ if klass is not object for name in vars(klass)}
    return frozenset(
        name for name in names
        if not name.startswith("_")
        and isinstance(inspect.getattr_static(cls, name), (FunctionType, staticmethod, classmethod))
    )


def allowed_methods(cls: type, methods: Any) -> frozenset[str]:
    """What ``call`` may name on a worker of class ``cls``: ``methods`` (each a public method
    of ``cls``), else all of its public methods."""
    allowed = check_method_names(methods, cls)
    return public_methods(cls) if allowed is None else allowed


def check_method_names(methods: Any, cls: type | None) -> frozenset[str] | None:
    """``WorkerGroup(methods=...)``: None, or names of public methods (of ``cls`` when known)."""
    if methods is None:
        return None
    if isinstance(methods, (str, bytes)) or not isinstance(methods, (list, tuple, set, frozenset)):
        raise InvalidRequestError("methods", methods, "None or a list of worker method names")
    allowed = public_methods(cls) if cls is not None else None
    for name in methods:
        if type(name) is not str or not name.isidentifier() or name.startswith("_") or (
                allowed is not None and name not in allowed):
            what = f"public methods of {cls.__name__}: {sorted(allowed)}" if allowed is not None else "public method names"
            raise InvalidRequestError("methods", name, what)
    return frozenset(methods)


# ---- the actor ------------------------------------------------------------------------------
class RankActor:
    """Hosts one rank in a Ray actor: the torch.distributed world and the user's worker.
    Every call answers ``(True, result)`` or ``(False, error dict)``, so a worker's
    exception reaches the driver as plain text, whatever its class. ``call`` runs only the
    methods allowed at setup, with plain-data arguments; setup runs once."""

    def __init__(self) -> None:
        self._worker: Any = None
        self._methods: frozenset[str] = frozenset()  # what ``call`` may name, fixed at setup

    def node_info(self) -> tuple[str, str]:
        ray = import_ray()
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def free_port(self, host: str) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return s.getsockname()[1]

    def setup(self, env: dict[str, str], loopback: bool, backend: str, timeout_s: float,
              factory: Callable[..., Any], args: tuple, kwargs: dict,
              methods: tuple[str, ...] | None = None) -> tuple[bool, Any]:
        return self._guard(self._setup, env, loopback, backend, timeout_s, factory, args, kwargs, methods)

    def call(self, method: str, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        """``worker.method(*args, **kwargs)`` when ``method`` is allowed and the arguments are
        plain data (checked before anything runs); the result must be plain data too."""
        def run() -> Any:
            bound = self._allowed(method)
            if type(args) not in (tuple, list) or type(kwargs) is not dict:
                raise InvalidRequestError(f"{method}() arguments", f"<{type(args).__name__}, {type(kwargs).__name__}>",
                                          "a tuple of positional and a dict of keyword arguments")
            check_plain((args, kwargs), f"{method}() arguments")
            result = bound(*args, **kwargs)
            check_plain(result, f"{method}() result")
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

    def _allowed(self, method: Any) -> Callable[..., Any]:
        if self._worker is None:
            raise InvalidRequestError("method", method, "a call once setup has built the worker")
        if type(method) is not str or method not in self._methods:
            raise InvalidRequestError("method", method, f"one of the worker's allowed methods {sorted(self._methods)}")
        return getattr(self._worker, method)

    def _setup(self, env, loopback, backend, timeout_s, factory, args, kwargs, methods) -> None:
        import torch.distributed as dist

        if self._worker is not None:
            raise InvalidRequestError("setup", "a second setup", "one setup per rank actor")
        check_method_names(methods, None)
        os.environ.update(env)
        if loopback and backend == "gloo" and sys.platform == "linux":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a one-node cluster: loopback only
        dist.init_process_group(backend, init_method="env://", rank=int(env["RANK"]),
                                world_size=int(env["WORLD_SIZE"]), timeout=timedelta(seconds=timeout_s))
        worker = factory(*args, **kwargs)
        self._methods = allowed_methods(type(worker), methods)
        self._worker = worker

    @staticmethod
    def _guard(fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        try:
            return True, fn(*args)
        except Exception as e:  # noqa: BLE001 - every error goes back to the driver as text
            return False, {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
