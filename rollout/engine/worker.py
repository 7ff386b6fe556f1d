"""Worker: the engine's body on one rank. Builds and owns the model, its weights' and KV
cache's memory, the weight updater, the model runner, the scheduler and the step loop.

``LLM`` is the public face (argument checks, prompts, outputs, asyncio); it delegates here.
Tensor-, data-parallel and Ray ranks each build one worker through their ``LLM``. What tests
and tools may read is documented below: the parts as attributes, ``stats()`` and
``check_invariants()``; everything else is private.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from rollout.config import CacheConfig, EngineConfig
from rollout.distributed import NoAgreementCheck, ParallelState, TPAgreementCheck, init_parallel, min_over_group
from rollout.engine.kv_cache import KVCacheManager
from rollout.engine.llm_engine import LLMEngine
from rollout.engine.model_runner import ModelRunner
from rollout.engine.scheduler import Scheduler
from rollout.errors import (
    CheckpointError, EngineSleepingError, InvalidRequestError, WeightUpdateError,
)
from rollout.memory.manager import MemoryManager, move_params_into_arena
from rollout.models.loader import build_model, init_dummy_weights, read_checkpoint
from rollout.models.updater import WeightUpdater, listed_problems
from rollout.models.weights import tensor_problem
from rollout.outputs import EngineStats
from rollout.platforms import Platform

if TYPE_CHECKING:
    from rollout.entrypoints.model_source import WeightSource

logger = logging.getLogger(__name__)

MEMORY_TAGS = ("weights", "kv_cache")


class Worker:
    """One rank's engine, built from ``config``:

    - ``model``: the rollout model (parameters are views into the weight arena);
    - ``runner`` (``ModelRunner``), ``scheduler`` (``Scheduler``), ``kv`` (``KVCacheManager``),
      ``engine`` (``LLMEngine``: schedule -> launch -> read back, the step loop);
    - ``memory`` (``MemoryManager``: the weight and KV arenas, sleep and wake);
    - ``parallel``: this rank's ``ParallelState`` (None without tensor parallelism).

    ``load_weights(model)`` fills a freshly built model (unless ``load_format="dummy"``).
    """

    def __init__(
        self, config: EngineConfig, platform: Platform, load_weights: Callable[[nn.Module], Any],
        tokenizer: Any | None, eos_token_ids: tuple[int, ...],
    ) -> None:
        self.config = config
        self.platform = platform
        self.device = config.device
        self.parallel: ParallelState | None = None
        if config.parallel.enabled:  # this rank's shard of a model over its TP group
            self.parallel = init_parallel(config.parallel.tensor_parallel_size, config.parallel.tp_group)
        model_cfg = config.model
        archs = list(model_cfg.architectures) if model_cfg.architectures else None
        self.model = build_model(model_cfg.hf_config, model_cfg.dtype, self.device, archs, self.parallel)
        weights_arena = move_params_into_arena(self.model, lambda n: platform.create_arena(n, self.device))
        if model_cfg.load_format == "dummy":  # random weights (benchmarks): no checkpoint is read
            init_dummy_weights(self.model, model_cfg.seed)
        else:
            load_weights(self.model)
        self.runner = ModelRunner(self.model, platform, config)
        num_blocks = self._num_kv_blocks()
        kv_arena = self.runner.init_kv_cache(num_blocks)
        if platform.supports_cuda_graphs and not config.enforce_eager:
            self.runner.capture_cuda_graphs()
        # After graph capture: the host copy's background allocation must not run during it.
        self.memory = MemoryManager(
            weights_arena, kv_arena, pin_host=platform.pin_host_memory, allocate_host=platform.allocate_host,
            prepare_host_copy=config.vllm.enable_sleep_mode,
        )
        self.updater = WeightUpdater(self.model)
        self.kv = KVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        agreement = NoAgreementCheck()
        if config.parallel.debug_tp_agreement and self.parallel is not None and self.parallel.tensor_parallel_size > 1:
            agreement = TPAgreementCheck(self.parallel.tp_group, self.device)
        self.engine = LLMEngine(self.runner, self.scheduler, tokenizer, eos_token_ids, platform, agreement)
        self.is_shut_down = False

    def _num_kv_blocks(self) -> int:
        # Sized by memory, never more than max_num_seqs full-length sequences can use at once:
        # on a CPU with a 2 GiB budget a small model would otherwise take (and, asleep,
        # re-allocate) far more than it can ever hold.
        full = self.config.scheduler.max_num_seqs * self.runner.max_blocks_per_req
        num = kv_blocks_for(self.config.cache, self.runner, self.platform, self.device, max_blocks=full)
        if self.parallel is not None:  # the ranks of a TP group must schedule alike
            num = min_over_group(num, self.parallel.tp_group, self.device)
        return num

    # ---- what tests and tools read ------------------------------------------------------
    def stats(self) -> EngineStats:
        free, cached, used = self.kv.pool.counts()
        pool = self.kv.pool
        graphs = self.runner.graphs
        return EngineStats(
            num_steps=self.engine.num_steps, num_generated_tokens=self.engine.num_generated_tokens,
            num_preemptions=self.scheduler.num_preemptions, num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting), num_kv_blocks=self.kv.num_blocks,
            num_free_blocks=free, num_cached_blocks=cached, num_used_blocks=used,
            kv_capacity_tokens=self.kv.capacity_tokens, prefix_cache_queries=pool.num_hit_queries,
            prefix_cache_hit_blocks=pool.num_hit_blocks, weight_version=self.engine.weight_version,
            attention_backend=self.runner.backend.name, op_set=self.runner.ops.name,
            cuda_graph_sizes=tuple(graphs.sizes) if graphs is not None else (),
        )

    def check_invariants(self) -> None:
        """Assert the KV block pool's invariants (free + cached + used == total, ref counts
        match the requests' block lists); cheap enough for tests after every call."""
        self.kv.pool.check_invariants()

    # ---- weights ----------------------------------------------------------------------
    @property
    def missing_weights(self) -> list[str]:
        """HF names of weights that are undefined (discarded by ``sleep(2)``) or stale (not
        reached by a streamed update that failed part-way)."""
        return self.updater.missing_names

    def update_weights(
        self, items: list[tuple[str, Any]], version: int | None, *, check_finite: bool, allow_version_decrease: bool,
    ) -> int:
        """The transaction behind ``LLM.update_weights``: every check, then every copy."""
        self.require_awake("update_weights", ("weights",))
        self.check_version(version, allow_version_decrease)
        problems = [p for name, t in items if (p := tensor_problem(name, t)) is not None]
        if problems:
            raise WeightUpdateError(listed_problems(problems))
        shapes = [(name, t.shape, t.dtype) for name, t in items]
        n = self.updater.apply(
            shapes, lambda: (t for _, t in items), require_all=False, error_cls=WeightUpdateError,
            check_finite=check_finite,
        )
        self._after_update(version)
        return n

    def load_weights(
        self, path: str | os.PathLike, version: int | None, *, check_finite: bool, allow_version_decrease: bool,
    ) -> int:
        self.require_awake("load_weights", ("weights",))
        self.check_version(version, allow_version_decrease)
        shapes, open_tensors = read_checkpoint(path)
        n = self.updater.apply(
            shapes, open_tensors, require_all=False, error_cls=CheckpointError, check_finite=check_finite
        )
        self._after_update(version)
        return n

    def reload_weights(self, source: WeightSource) -> int:
        """Read the weights ``sleep(2)`` discarded and no update has loaded since back from
        ``source`` (one transaction, as ``load_weights``); the weight version stays, since
        these are the weights the engine was built with. Returns the tensors read."""
        self.require_awake("reload_weights", ("weights",))
        names = set(self.updater.discarded_names)
        if not names:
            return 0
        shapes, open_tensors = source.read(names)
        n = self.updater.apply(shapes, open_tensors, require_all=False, error_cls=CheckpointError, check_finite=True)
        logger.info("reload_weights: read back %d discarded weights", n)
        return n

    def mark_partial_update(self, loaded: set[str]) -> int:
        return self.updater.mark_stale_except(loaded)

    def check_version(self, version: int | None, allow_decrease: bool) -> None:
        if not isinstance(allow_decrease, bool):
            raise InvalidRequestError("allow_version_decrease", allow_decrease, "a bool")
        if version is None:
            return
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise InvalidRequestError("version", version, "None or an int >= 0")
        current = self.engine.weight_version
        if version < current and not allow_decrease:
            raise InvalidRequestError(
                "version", version,
                f"an int >= the current weight_version={current} (allow_version_decrease=True goes back)",
            )

    def _after_update(self, version: int | None) -> None:
        # KV computed with the old weights is stale, cached prefixes and in-flight requests
        # alike: the latter keep their tokens and recompute it under the new weights.
        self.engine.drop_kv_cache()
        self.engine.weight_version = self.engine.weight_version + 1 if version is None else version

    # ---- memory -----------------------------------------------------------------------
    def sleep(self, level: int) -> int:
        """Release device memory (see ``LLM.sleep``); returns the bytes freed."""
        self.memory.check_level(level)  # before anything is dropped
        before = self.memory.memory_usage()
        kv = self.memory.arenas["kv_cache"]
        had_kv = kv.is_mapped
        if had_kv:
            self.engine.flush()  # no step in flight while memory moves
        try:
            # HostMemoryError: nothing released, KV cache and requests kept (on every TP rank).
            self.memory.sleep(level, agree=self._all_ranks_ok if self._tp_size > 1 else None)
        finally:
            if had_kv and not kv.is_mapped:
                self.engine.drop_kv_cache()
        self.platform.release_cached_memory(self.device)
        if level == 2:
            self.updater.discard()
        after = self.memory.memory_usage()
        return sum(v["device"] for v in before.values()) - sum(v["device"] for v in after.values())

    @property
    def _tp_size(self) -> int:
        return 1 if self.parallel is None else self.parallel.tensor_parallel_size

    def _all_ranks_ok(self, ok: bool) -> bool:
        """Whether every rank of the TP group says ``ok`` (a collective)."""
        return min_over_group(int(ok), self.parallel.tp_group, self.device) == 1

    def wake_up(self, tags: list[str] | None) -> list[str]:
        return self.memory.wake_up(tags)

    def is_awake(self) -> bool:
        """Every arena mapped and every weight defined: generation can run."""
        return not self.is_shut_down and not self.memory.asleep_tags() and not self.updater.missing_names

    def require_awake(self, what: str, tags: tuple[str, ...] = MEMORY_TAGS) -> None:
        asleep = [t for t in tags if t in self.memory.asleep_tags()]
        if asleep:
            raise EngineSleepingError(f"{what} needs {asleep} awake: call wake_up({asleep}) first")
        if "kv_cache" in tags and self.updater.missing_names:
            missing = self.updater.missing_names
            raise EngineSleepingError(
                f"{what}: {len(missing)} weights are undefined or stale (discarded by sleep(level=2), or not "
                f"reached by a streamed update that failed part-way) "
                f"(e.g. {missing[:3]}); call update_weights or load_weights with them first"
            )

    def shutdown(self) -> None:
        """Free the CUDA graphs, the KV cache and the weights (device and host). The step
        loop must hold no request (``LLM.shutdown`` aborts them first)."""
        t0 = time.perf_counter()
        self.engine.flush()
        self.runner.release_cuda_graphs()
        self.memory.close()
        self.updater.discard()
        self.platform.release_cached_memory(self.device)
        self.is_shut_down = True
        logger.debug("worker released its memory in %.3fs", time.perf_counter() - t0)


def kv_blocks_for(
    cache: CacheConfig, runner: ModelRunner, platform: Platform, device: Any, max_blocks: int | None = None,
) -> int:
    """How many KV blocks ``cache`` asks for: ``num_kv_blocks``, or what fits in
    ``kv_cache_memory_bytes``, or in the platform's budget (``gpu_memory_utilization`` of
    the device, after a profile run of the largest step where the platform asks for one);
    a size from memory is capped at ``max_blocks``."""
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    per_block = runner.kv_bytes_per_block()
    budget = cache.kv_cache_memory_bytes
    if budget is None:
        if platform.profile_before_kv_sizing:
            # The largest step's activations and sampler buffers stay reserved in the
            # allocator's cache, so what is left afterwards is what the KV cache may take.
            runner.profile_run()
        budget = platform.kv_cache_budget(device, cache.gpu_memory_utilization)
    num = int(budget // per_block)
    if max_blocks is not None:
        num = min(num, max_blocks)
    if num < 1:
        raise MemoryError(
            f"no room for the KV cache: {budget} bytes available, one block needs {per_block};"
            " lower max_model_len or raise kv_cache_memory_bytes / gpu_memory_utilization"
        )
    return num


def describe(config: EngineConfig, worker: Worker, seconds: float) -> str:
    """The one log line of a ready engine."""
    m = config.model
    return (
        f"rollout LLM ready in {seconds:.1f}s: {list(m.architectures or ())} {m.dtype} on {config.device}, "
        f"{worker.kv.num_blocks} KV blocks x {config.cache.block_size} tokens, max_model_len {m.max_model_len}"
    )
