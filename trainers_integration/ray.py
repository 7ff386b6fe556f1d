"""Past one machine: a Ray hybrid controller over colocated trainer+engine workers.

A ``WorkerGroup`` places N Ray actors with a placement group (one bundle per GPU, or per
CPU slot), makes them one ``torch.distributed`` world (NCCL on GPU, gloo on CPU), and
builds the user's worker object in each: typically a trainer and an ``LLM`` in the same
process, exactly what one rank of a ``torchrun`` job holds. The driver is the single
controller::

    ray.init()
    config = WorkerGroupConfig(num_workers=8, use_gpu=True, env_vars={"PYTHONPATH": repo})
    with WorkerGroup(config, MyWorker, args=(cfg,)) as group:
        for step in range(num_steps):
            metrics = group.call("step", step)           # every rank, in rank order
        outs = group.split("generate", prompts)           # DP shares, back in prompt order

The worker is built as ``worker_factory(*args, **kwargs)`` once the world is up: it reads
its rank from ``torch.distributed`` (or RANK / WORLD_SIZE / LOCAL_RANK in its
environment) and runs the same SPMD code as under torchrun. A call may name only an
allowed worker method (``methods=``, by default the worker class's public methods) and only
plain data crosses between driver and workers (call arguments and results: None, bool,
int, float, str, bytes, lists, tuples, dicts with str keys; a tensor or any other object is
refused): both are checked at the driver and again on each rank, which refuses with
``InvalidRequestError`` before running anything. Weights move inside each worker, trainer
to engine, never through the driver. Worker classes are imported by name in the actors, so
their module must be on the workers' path (``env_vars={"PYTHONPATH": ...}`` on a local
cluster).

Failures surface at the driver as typed errors naming the rank: ``WorkerError`` (an
exception in the worker, with its remote traceback), ``WorkerDiedError`` (the actor's
process died), ``WorkerTimeoutError`` (no answer within the call timeout). After a death
or a timeout the other ranks may be stuck in a collective: the driver waits for them at
most ``failure_grace_s``, marks the group broken (every later call fails at once), and
``shutdown`` kills the actors instead of asking them to finish.

Ray is imported only when a group is built (``pip install 'rollout[ray]'``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rollout.distributed.data_parallel import dp_bounds
from rollout.errors import InvalidRequestError
from trainers_integration.ray_rank import (
    RankActor,
    check_method_names,
    check_plain,
    import_ray,
    public_methods,
    refuse_tensors,
)

if TYPE_CHECKING:
    from typing_extensions import Self

# ---- config and errors ----------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerGroupConfig:
    """How a ``WorkerGroup`` is placed and driven.

    num_workers: ranks of the world, one actor each. use_gpu: one GPU per rank (bundles
    ``{"CPU": c, "GPU": 1}``) and NCCL, else CPU bundles ``{"CPU": c}`` and gloo.
    num_cpus_per_worker: ``c``. tensor_parallel_size: k, as given to each rank's ``LLM``:
    consecutive groups of k ranks are one data-parallel replica, which ``split`` respects.
    backend: override the torch.distributed backend. placement_strategy: Ray's ("PACK",
    "SPREAD", "STRICT_PACK", "STRICT_SPREAD"). env_vars: set in every actor's process at
    start (runtime_env), e.g. PYTHONPATH, OMP_NUM_THREADS. Timeouts in seconds: setup
    (placement, world, building the workers), each call, how long the other ranks get once
    one has failed, and torch.distributed's own collective timeout.
    """

    num_workers: int
    use_gpu: bool = False
    num_cpus_per_worker: float = 1.0
    tensor_parallel_size: int = 1
    backend: str | None = None
    placement_strategy: str = "PACK"
    env_vars: Mapping[str, str] = field(default_factory=dict)
    setup_timeout_s: float = 900.0
    call_timeout_s: float = 3600.0
    failure_grace_s: float = 5.0
    collective_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        for name in ("num_workers", "tensor_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.num_workers % self.tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} does not divide num_workers {self.num_workers}")
        if self.backend not in (None, "gloo", "nccl"):
            raise ValueError(f"backend must be None, 'gloo' or 'nccl', got {self.backend!r}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"unknown placement_strategy {self.placement_strategy!r}")
        for name in ("num_cpus_per_worker", "setup_timeout_s", "call_timeout_s", "collective_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.failure_grace_s >= 0:
            raise ValueError(f"failure_grace_s must be >= 0, got {self.failure_grace_s!r}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.env_vars.items()):
            raise ValueError("env_vars must map str to str")
        object.__setattr__(self, "env_vars", dict(self.env_vars))  # our own copy

    @property
    def dist_backend(self) -> str:
        return self.backend or ("nccl" if self.use_gpu else "gloo")

    @property
    def dp_size(self) -> int:
        return self.num_workers // self.tensor_parallel_size


class WorkerGroupError(RuntimeError):
    """A worker group call failed; also raised by every call once the group is broken."""


class WorkerError(WorkerGroupError):
    """An exception raised inside a worker. ``rank``, ``method``, ``exc_type`` (the remote
    exception's class name) and ``remote_traceback`` (its formatted traceback) say where."""

    def __init__(self, rank: int, method: str, exc_type: str, message: str, remote_traceback: str, also: str = ""):
        self.rank, self.method, self.exc_type, self.remote_traceback = rank, method, exc_type, remote_traceback
        super().__init__(f"rank {rank} raised {exc_type} in {method}: {message}{also}\n"
                         f"--- remote traceback (rank {rank}) ---\n{remote_traceback}")


class WorkerDiedError(WorkerGroupError):
    """A worker's process died (crashed, killed) while running ``method``."""

    def __init__(self, rank: int, method: str, detail: str, also: str = ""):
        self.rank, self.method = rank, method
        super().__init__(f"rank {rank} died during {method}{also}: the group is broken\n{detail}")


class WorkerTimeoutError(WorkerGroupError):
    """``ranks`` did not answer ``method`` within ``timeout_s``."""

    def __init__(self, ranks: list[int], method: str, timeout_s: float):
        self.ranks, self.method, self.timeout_s = ranks, method, timeout_s
        super().__init__(f"ranks {ranks} did not finish {method} within {timeout_s:g}s: the group is broken")


# ---- data-parallel shares -------------------------------------------------------------------
def rank_shares(num_items: int, num_ranks: int, tensor_parallel_size: int) -> list[tuple[int, int]]:
    """[start, end) of each rank's share of ``num_items``: consecutive groups of
    ``tensor_parallel_size`` ranks are one replica and get the same share (as
    ``rollout.distributed.split_for_dp`` cuts it on each rank)."""
    dp_size = num_ranks // tensor_parallel_size
    return [dp_bounds(num_items, rank // tensor_parallel_size, dp_size) for rank in range(num_ranks)]


def one_per_replica(per_rank: Sequence[Any], tensor_parallel_size: int) -> list[Any]:
    """The results of TP rank 0 of each replica (ranks 0, k, 2k, ...), in replica order."""
    return list(per_rank[::tensor_parallel_size])


# ---- the group ------------------------------------------------------------------------------
class WorkerGroup:
    """N colocated workers in one torch.distributed world, driven from the Ray driver.

    ``worker_factory`` (a class, or any importable callable) is called in every actor as
    ``worker_factory(*args, **kwargs)`` after ``torch.distributed`` is initialised; RANK,
    WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT are set in its
    environment. LOCAL_RANK is the rank's device index: 0 with GPUs (Ray shows each actor
    only its own GPU), else the rank's index among the group's ranks on its node. The
    master is the first rank's node (a free port there); on a one-node cluster it is
    127.0.0.1, and gloo is kept on loopback (GLOO_SOCKET_IFNAME=lo on Linux unless set).

    Needs ``ray.init()`` first (local, or ``address=`` of a cluster). Use as a context
    manager, or call ``shutdown``; building fails with the rank named when a worker cannot
    be built, and then leaves nothing behind. ``methods`` names the worker methods that
    ``call``/``split`` may run (default: the worker class's public methods); every rank
    refuses any other name, private and dunder names included. ``shutdown`` calls each
    worker's ``close()``, if it has one, before destroying the world: a worker holding an
    ``LLM`` shuts it down there (``llm.shutdown()``), as NCCL cannot destroy a world whose
    all-reduces live on in the engine's CUDA graphs.
    """

    def __init__(self, config: WorkerGroupConfig, worker_factory: Callable[..., Any],
                 args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                 methods: Sequence[str] | None = None) -> None:
        cls = worker_factory if isinstance(worker_factory, type) else None
        self._methods = check_method_names(methods, cls)  # None: the worker class's public methods
        self._ray = ray = import_ray()
        if not ray.is_initialized():
            raise WorkerGroupError("Ray is not initialised: call ray.init() (or ray.init(address=...)) first")
        self.config = config
        self._factory = worker_factory
        self._broken: str | None = None
        self._busy = False
        self._actors: list[Any] = []
        self._pg = None
        args, kwargs = tuple(args), dict(kwargs or {})
        refuse_tensors((args, kwargs), "worker args")
        try:
            self._place()
            self._start(args, kwargs)
        except BaseException:
            self.shutdown()
            raise

    # ---- public ----
    @property
    def world_size(self) -> int:
        return self.config.num_workers

    @property
    def dp_size(self) -> int:
        return self.config.dp_size

    @property
    def is_broken(self) -> bool:
        return self._broken is not None

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """``worker.method(*args, **kwargs)`` on every rank at once (SPMD: collectives
        inside are fine); the results in rank order. Raises ``WorkerError`` /
        ``WorkerDiedError`` / ``WorkerTimeoutError`` naming the rank."""
        self._check_method(method)
        check_plain((args, kwargs), f"{method}() arguments")
        return self._run(method, [(args, kwargs)] * self.world_size)

    def split(self, method: str, items: Sequence[Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Each replica's contiguous share of ``items`` (the ranks of one TP group get the
        same share) goes to ``worker.method(share, *args, **kwargs)``, which must return one
        result per item, in order; returns all results in ``items`` order (TP rank 0's of
        each replica). Every rank is called, an empty share included."""
        self._check_method(method)
        items = list(items)
        check_plain((items, args, kwargs), f"{method}() arguments")
        shares = rank_shares(len(items), self.world_size, self.config.tensor_parallel_size)
        per_rank = self._run(method, [((items[lo:hi], *args), kwargs) for lo, hi in shares])
        out: list[Any] = []
        k = self.config.tensor_parallel_size
        for dp_rank, result in enumerate(one_per_replica(per_rank, k)):
            lo, hi = shares[dp_rank * k]
            if not isinstance(result, (list, tuple)) or len(result) != hi - lo:
                got = f"{len(result)} results" if isinstance(result, (list, tuple)) else type(result).__name__
                raise WorkerGroupError(f"rank {dp_rank * k}: {method}() returned {got} for a share of {hi - lo} "
                                       "items; split needs one result per item, in order")
            out.extend(result)
        return out

    def one_per_replica(self, per_rank: Sequence[Any]) -> list[Any]:
        """From ``call``'s per-rank results, one per data-parallel replica (TP rank 0's)."""
        return one_per_replica(per_rank, self.config.tensor_parallel_size)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Close the workers (each worker's ``close()``, then the process group) when the group is healthy and
        idle, waiting at most ``timeout_s``; then kill every actor and free the placement
        group. A broken or interrupted group is killed at once. Idempotent."""
        ray = self._ray
        if self._actors and not self._broken and not self._busy:
            refs = [a.close.remote() for a in self._actors]
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for actor in self._actors:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(actor, no_restart=True)
        self._actors = []
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg)
            self._pg = None
        self._broken = self._broken or "shut down"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- building ----
    def _place(self) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ray, cfg = self._ray, self.config
        bundle = {"CPU": cfg.num_cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
        self._pg = placement_group([dict(bundle) for _ in range(cfg.num_workers)], strategy=cfg.placement_strategy)
        ready, _ = ray.wait([self._pg.ready()], timeout=cfg.setup_timeout_s)
        if not ready:
            raise WorkerGroupError(
                f"could not place {cfg.num_workers} bundles of {bundle} ({cfg.placement_strategy}) within "
                f"{cfg.setup_timeout_s:g}s; the cluster has {ray.cluster_resources()}"
            )
        actor_cls = ray.remote(RankActor)
        runtime_env = {"env_vars": dict(cfg.env_vars)} if cfg.env_vars else None
        self._actors = [
            actor_cls.options(
                num_cpus=cfg.num_cpus_per_worker, num_gpus=1 if cfg.use_gpu else 0, runtime_env=runtime_env,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=rank),
            ).remote()
            for rank in range(cfg.num_workers)
        ]

    def _start(self, args: tuple, kwargs: dict) -> None:
        cfg = self.config
        nodes = self._gather([a.node_info.remote() for a in self._actors], "node_info", cfg.setup_timeout_s)
        one_node = len({node_id for node_id, _ in nodes}) == 1
        master = "127.0.0.1" if one_node else nodes[0][1]
        port = self._gather([self._actors[0].free_port.remote(master)], "free_port", cfg.setup_timeout_s)[0]
        refs = []
        for rank, actor in enumerate(self._actors):
            same_node = [r for r, (node_id, _) in enumerate(nodes) if node_id == nodes[rank][0]]
            env = {
                "RANK": str(rank), "WORLD_SIZE": str(cfg.num_workers),
                "LOCAL_RANK": "0" if cfg.use_gpu else str(same_node.index(rank)),
                "LOCAL_WORLD_SIZE": str(len(same_node)), "MASTER_ADDR": master, "MASTER_PORT": str(port),
            }
            refs.append(actor.setup.remote(env, one_node, cfg.dist_backend, cfg.collective_timeout_s,
                                           self._factory, args, kwargs,
                                           None if self._methods is None else tuple(sorted(self._methods))))
        self._collect(refs, "setup", cfg.setup_timeout_s)

    # ---- calling ----
    def _check_method(self, method: str) -> None:
        # The ranks check again; this fails early, naming what is allowed.
        allowed = self._methods
        if allowed is None and isinstance(self._factory, type):
            allowed = public_methods(self._factory)
        if type(method) is not str or method.startswith("_") or (allowed is not None and method not in allowed):
            what = f"one of the worker's allowed methods {sorted(allowed)}" if allowed is not None else "a public worker method"
            raise InvalidRequestError("method", method, what)

    def _run(self, method: str, per_rank: list[tuple[tuple, dict]]) -> list[Any]:
        if self._broken:
            raise WorkerGroupError(f"the worker group is unusable ({self._broken}): shut it down and build a new one")
        refs = [actor.call.remote(method, a, k) for actor, (a, k) in zip(self._actors, per_rank)]
        return self._collect(refs, f"{method}()", self.config.call_timeout_s)

    def _gather(self, refs: list[Any], what: str, timeout_s: float) -> list[Any]:
        """Plain actor methods (no (ok, payload) envelope)."""
        return self._collect(refs, what, timeout_s, envelope=False)

    def _collect(self, refs: list[Any], what: str, timeout_s: float, envelope: bool = True) -> list[Any]:
        """Wait for one result per rank; on the first failure give the others
        ``failure_grace_s``, then raise the most telling error (a death, else the lowest
        failing rank). Ranks left running or dead break the group."""
        ray, grace = self._ray, self.config.failure_grace_s
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        died: dict[int, str] = {}
        raised: dict[int, dict[str, str]] = {}
        deadline = time.monotonic() + timeout_s
        self._busy = True
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    died[rank] = str(e)
                    continue
                except ray.exceptions.RayError as e:  # e.g. a result that does not pickle
                    raised[rank] = {"type": type(e).__name__, "message": str(e).splitlines()[0] if str(e) else "",
                                    "traceback": str(e)}
                    continue
                if not envelope:
                    results[rank] = value
                elif value[0]:
                    results[rank] = value[1]
                else:
                    raised[rank] = value[1]
            if (died or raised) and deadline > time.monotonic() + grace:
                deadline = time.monotonic() + grace  # the others may be stuck in a collective
        self._busy = bool(pending)
        stuck = sorted(pending.values())
        if died or stuck:
            self._broken = f"rank {min(died)} died" if died else f"ranks {stuck} did not finish {what}"
        if not (died or raised):
            if stuck:
                raise WorkerTimeoutError(stuck, what, timeout_s)
            return results
        notes = [f"rank {r} died" for r in sorted(died)] + [f"rank {r} raised {raised[r]['type']}" for r in sorted(raised)]
        if stuck:
            notes.append(f"ranks {stuck} still running {grace:g}s later")
        if died:
            rank = min(died)
            notes.remove(f"rank {rank} died")
            raise WorkerDiedError(rank, what, died[rank], f" (also: {'; '.join(notes)})" if notes else "")
        rank = min(raised)
        notes.remove(f"rank {rank} raised {raised[rank]['type']}")
        err = raised[rank]
        raise WorkerError(rank, what, err["type"], err["message"], err["traceback"],
                          f" (also: {'; '.join(notes)})" if notes else "")
