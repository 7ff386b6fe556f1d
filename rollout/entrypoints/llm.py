"""LLM: the user-facing engine, with vLLM's names."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

import torch

from rollout.compat.engine_view import EngineView
from rollout.config import EngineConfig, VllmOptions
from rollout.engine.request import Request
from rollout.engine.routes import RouteShape
from rollout.engine.worker import MEMORY_TAGS, Worker, describe
from rollout.entrypoints.async_driver import AsyncDriver
from rollout.entrypoints.frontend import RequestFrontend
from rollout.entrypoints.input_processor import InputProcessor
from rollout.entrypoints.model_source import ModelSource, WeightSource
from rollout.errors import (
    EngineStateError, InvalidRequestError, NonFiniteError, UnsupportedFeatureError, WeightUpdateError,
)
from rollout.outputs import EngineStats, RequestOutput
from rollout.platforms import get_platform
from rollout.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

# What ``LLM.collective_rpc`` serves: vLLM worker methods the frameworks call by name.
RPC_METHODS = ("sleep", "wake_up", "reload_weights", "reset_prefix_cache")


class LLM:
    """An inference engine in this process, on one device.

    ``model`` is a path to an HF model directory (config.json + *.safetensors) or a live HF
    ``PreTrainedModel`` (its weights are copied). ``tokenizer`` is a path or tokenizer
    object; by default the model directory's, and without one prompts must be token ids.
    ``num_kv_blocks`` (or ``kv_cache_memory_bytes``) sizes the KV cache; otherwise the
    platform decides (``gpu_memory_utilization`` of the device on GPU).
    ``tensor_parallel_size=k > 1`` shards the model over consecutive groups of k ranks of
    the caller's initialised ``torch.distributed`` world (or over ``tp_group``); every rank
    of a group must construct it and be given the same prompts. ``debug_tp_agreement``
    checks that with a collective per prompt and per step (``ParallelMismatchError``).

    Example::

        llm = LLM("path/to/model", dtype="bfloat16")
        outs = llm.generate(["Hello"], SamplingParams(n=4, temperature=1.0, logprobs=0))
        outs[0].outputs[0].text, outs[0].outputs[0].token_logprobs

    Besides blocking ``generate``/``generate_iter``/``score`` there is a request-level API
    (``add_request``/``step``/``abort``, ``pause``/``resume``) and asyncio streaming
    (``generate_stream``/``generate_async``) over one shared engine loop. The engine is
    single-threaded: call it from one thread (the event loop's, when streaming); a step
    then always completes before the next call, so every call lands on a step boundary.

    vLLM's engine keywords that RL frameworks pass are accepted and checked (see
    ``rollout.config.VllmOptions``: ``enable_sleep_mode``, ``distributed_executor_backend``,
    ``model_impl``, ``quantization``, ``skip_tokenizer_init``, ``trust_remote_code``,
    ``disable_custom_all_reduce``, ``disable_log_stats``, ``enable_lora``,
    ``compilation_config``); ``logprobs_mode`` sets what ``SamplingParams(logprobs_mode=None)``
    reports (vLLM's "processed_logprobs"/"raw_logprobs" or ours; default "processed", where
    vLLM's is "raw_logprobs"). ``llm_engine`` and ``collective_rpc`` serve the vLLM paths
    that frameworks push weights and sleep through.

    ``batch_invariant=True`` is the exact on-policy mode: a request's tokens and logprobs are
    bitwise the same whatever else runs with it (alone, in any batch, after a prefix-cache
    hit or a preemption, chunked at any size), ``score()`` of a generated sequence equals
    the logprobs returned while generating it, and ``trainers_integration.exact`` gives the
    trainer a differentiable forward with the same kernels whose logprobs equal the
    engine's bit for bit. Off by default: the fast kernels' results move with the batch.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        seed: int = 0,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
        load_format: str = "auto",
        tensor_parallel_size: int = 1,
        tp_group: Any = None,
        debug_tp_agreement: bool = False,
        enable_chunked_prefill: bool = True,
        logprobs_mode: str | None = None,
        enable_sleep_mode: bool = False,
        distributed_executor_backend: str | None = None,
        model_impl: str = "auto",
        quantization: str | None = None,
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        disable_custom_all_reduce: bool = False,
        disable_log_stats: bool = True,
        enable_lora: bool = False,
        compilation_config: Any = None,
        batch_invariant: bool = False,
    ) -> None:
        t0 = time.perf_counter()
        vllm = VllmOptions(
            enable_sleep_mode=enable_sleep_mode, distributed_executor_backend=distributed_executor_backend,
            model_impl=model_impl, quantization=quantization, skip_tokenizer_init=skip_tokenizer_init,
            trust_remote_code=trust_remote_code, disable_custom_all_reduce=disable_custom_all_reduce,
            disable_log_stats=disable_log_stats, enable_lora=enable_lora, compilation_config=compilation_config,
        )
        self.platform = get_platform(device)
        source = ModelSource.from_arg(model, load_format)
        # Every argument validated and resolved once, before any model work.
        self.config = EngineConfig.create(
            hf_config=source.hf_config, architectures=source.architectures, checkpoint_dtype=source.checkpoint_dtype(),
            device=self.platform.parse_device(device), dtype=dtype, seed=seed, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
            num_kv_blocks=num_kv_blocks, kv_cache_memory_bytes=kv_cache_memory_bytes,
            gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager, load_format=load_format, tensor_parallel_size=tensor_parallel_size,
            tp_group=tp_group, debug_tp_agreement=debug_tp_agreement, enable_chunked_prefill=enable_chunked_prefill,
            logprobs_mode=logprobs_mode, vllm=vllm, batch_invariant=batch_invariant,
        )
        if skip_tokenizer_init and tokenizer is not None:
            raise InvalidRequestError("tokenizer", tokenizer, "None when skip_tokenizer_init=True")
        self.tokenizer = None if skip_tokenizer_init else source.load_tokenizer(tokenizer)
        # Where reload_weights reads discarded weights back from (a directory or the HF module).
        self._weight_source = WeightSource(source, load_format)
        #: The engine's body (model, runner, memory, scheduler, step loop): see ``Worker``.
        self.worker = Worker(
            self.config, self.platform, source.load_weights, self.tokenizer, source.eos_token_ids(self.tokenizer)
        )
        self.input_processor = InputProcessor(
            self.tokenizer, self.config.model.vocab_size, self.config.model.max_model_len,
            self.worker.engine.max_num_tokens, self.config.logprobs_mode, RouteShape.of(self.worker.model),
        )
        #: vLLM's engine paths (``llm_engine.model_executor.driver_worker.model_runner.model``
        #: and friends) that frameworks push weights through: see ``rollout.compat.engine_view``.
        self.llm_engine = EngineView(self, str(source.path) if source.path is not None else None)
        self._frontend = RequestFrontend(self.worker.engine, self.input_processor, self._require_awake, self._is_awake)
        self._driver = AsyncDriver(self._frontend)
        logger.info(describe(self.config, self.worker, time.perf_counter() - t0))

    # ---- what the engine is -------------------------------------------------------------
    @property
    def model(self) -> Any:
        """The rollout model (its parameters are the engine's weights, in place)."""
        return self.worker.model

    @property
    def device(self) -> Any:
        return self.config.device

    @property
    def hf_config(self) -> Any:
        return self.config.model.hf_config

    @property
    def max_model_len(self) -> int:
        return self.config.model.max_model_len

    @property
    def parallel(self) -> Any:
        """This rank's ``rollout.distributed.ParallelState`` (tensor-parallel group, data-parallel
        rank), or None without tensor parallelism."""
        return self.worker.parallel

    def stats(self) -> EngineStats:
        """Counters and sizes: steps, tokens, preemptions, KV blocks by state, prefix-cache
        hits, weight version, the kernels chosen and the CUDA graph sizes."""
        return self.worker.stats()

    # ---- lifetime -----------------------------------------------------------------------
    def shutdown(self) -> list[RequestOutput]:
        """Release everything the engine holds on the device: unfinished requests are
        aborted, the CUDA graphs are freed, the KV cache and the weights are released.
        Returns the final outputs of the requests it aborted, as ``abort`` does (streams get
        theirs too). Every later call but ``shutdown``/``sleep`` (no-ops) raises
        ``EngineStateError``. ``with LLM(...) as llm:`` calls it on exit.

        Under tensor parallelism over NCCL call it on every rank before
        ``torch.distributed.destroy_process_group()``: NCCL cannot tear down a communicator
        while CUDA graphs that captured its collectives are alive, and the destroy hangs."""
        if self.worker.is_shut_down:
            return []
        unfinished = list(self.worker.engine.outputs.parents)
        aborted = self._frontend.abort(unfinished) if unfinished else []
        self.worker.shutdown()
        logger.info("rollout LLM shut down (%d unfinished requests aborted)", len(aborted))
        return aborted

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def get_tokenizer(self) -> Any | None:
        return self.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix: later prompts recompute their KV. Returns True (vLLM
        returns whether it could; here it always can)."""
        self.worker.engine.reset_prefix_cache()
        return True

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
        lora_request: Any = None,
    ) -> list[RequestOutput]:
        """Generate completions for a batch of prompts; blocks until all have finished.

        ``prompts``: a str, a list of str, a list of token ids, a list of token-id lists, or
        dicts ``{"prompt_token_ids": [...]}``. ``sampling_params``: one for all prompts or
        one per prompt. Every prompt and parameter is validated before any work starts, so an
        ``InvalidRequestError`` leaves the engine as it was. Returns one RequestOutput per
        prompt, in prompt order (final outputs, whatever ``output_kind`` says). A sample whose
        logits turn NaN/inf ends with finish_reason "error" while the others run on; once all
        have finished, ``NonFiniteError`` is raised with every output in ``.outputs``.
        ``use_tqdm``: a progress bar over prompts; None (default) shows one when stderr is
        a terminal and no ``torch.distributed`` world is up (an interactive session, not a
        trainer's rank). ``lora_request`` must be None (LoRA: ``UnsupportedFeatureError``).
        """
        check_no_lora(lora_request)
        batch = self._frontend.prepare_batch("generate", prompts, sampling_params)
        results: list[RequestOutput | None] = [None] * len(batch)
        bar = _progress_bar(use_tqdm, len(batch))
        try:
            for i, out in self._frontend.collect(batch):
                results[i] = out
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        _raise_if_nonfinite(results)
        return results

    def generate_iter(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        request_ids: Sequence[str] | None = None,
    ) -> Iterator[RequestOutput]:
        """``generate``, but yields each prompt's final RequestOutput (all ``n`` samples) as
        soon as that prompt has finished, so early groups can be scored while the tail still
        generates. Validated on the call, queued at the first ``next()``; ``request_ids``
        (default: fresh ids) name the prompts in the outputs. Closing the iterator early
        aborts the prompts not yet yielded."""
        batch = self._frontend.prepare_batch("generate_iter", prompts, sampling_params, request_ids)

        def outputs() -> Iterator[RequestOutput]:
            with contextlib.closing(self._frontend.collect(batch)) as it:
                for _, out in it:
                    yield out

        return outputs()

    # ---- request-level API -------------------------------------------------------------
    def add_request(self, prompt: Any, sampling_params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Queue one prompt (any one-prompt form of ``generate``) and return its request id
        (``request_id``, or a fresh one); ``step()`` runs it. Validated like ``generate``;
        an id used by an unfinished request raises ``InvalidRequestError``."""
        self._require_open("add_request")
        return self._frontend.submit(self._frontend.prepare_one(prompt, sampling_params, request_id))[0]

    def step(self) -> list[RequestOutput]:
        """Run one engine step (none while paused) and return the outputs of requests queued
        by ``add_request``: one per request that got tokens in it, shaped by its
        ``SamplingParams.output_kind`` (default CUMULATIVE: everything generated so far),
        the last one with ``finished=True``. Steps overlap: a call launches the next step
        and returns what the previous one produced (so the first call returns []). A final
        output whose ``error`` is set had a sample end with finish_reason "error" (NaN/inf
        logits). A step that fails inside the engine is rolled back (``EngineStepError``):
        requests keep their tokens and go on at the next call. Outputs
        made while another call drove the engine (``generate``, the async loop) come with
        the next ``step()``."""
        if not self._frontend.paused and self.worker.engine.has_unfinished_requests():
            self._require_awake("step")
            self._frontend.step()
        return self._frontend.router.take_unclaimed()

    def abort(self, request_ids: str | Iterable[str]) -> list[RequestOutput]:
        """End requests now: their unfinished samples get finish_reason "abort" and keep
        the tokens and logprobs generated so far; their KV blocks are freed. Returns the
        final output of each request aborted (its stream or blocking call gets it too). An
        id that is unknown or already finished is skipped with a logged warning."""
        ids = [request_ids] if isinstance(request_ids, str) else request_ids
        if isinstance(ids, Iterable) and not isinstance(ids, (bytes, dict)):
            ids = list(ids)
        if not isinstance(ids, list) or not all(isinstance(r, str) for r in ids):
            raise InvalidRequestError("request_ids", request_ids, "a request id (str) or an iterable of them")
        return self._frontend.abort(ids)

    def has_unfinished_requests(self) -> bool:
        """Whether a request is unfinished, or an output still waits for ``step()``."""
        return self.worker.engine.has_unfinished_requests() or bool(self._frontend.router.unclaimed)

    def pause(self) -> None:
        """Stop scheduling at the step boundary: requests in flight keep their tokens and KV
        and wait, ``step()`` returns [] and the async loop idles; ``update_weights`` may run
        meanwhile. Pausing twice is a no-op. ``generate`` and ``score`` refuse while paused."""
        self._frontend.paused = True

    def resume(self) -> None:
        """Continue after ``pause()``; raises EngineStateError when not paused."""
        if not self._frontend.paused:
            raise EngineStateError("resume() without pause(): the engine is not paused")
        self._frontend.paused = False
        self._driver.kick()

    @property
    def is_paused(self) -> bool:
        return self._frontend.paused

    # ---- asyncio -----------------------------------------------------------------------
    def generate_stream(
        self, prompt: Any, sampling_params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """``async for out in llm.generate_stream(prompt, params)``: one prompt's outputs as
        it advances (shaped by ``output_kind``; default: cumulative snapshots), the last
        with ``finished=True``. Validated on the call, queued at the first iteration, run by
        the engine loop shared by every coroutine (continuous batching across them). A
        stream closed or cancelled before the end aborts its request."""
        self._require_open("generate_stream")
        return self._driver.stream(self._frontend.prepare_one(prompt, sampling_params, request_id))

    async def generate_async(
        self, prompt: Any, sampling_params: SamplingParams | None = None, request_id: str | None = None
    ) -> RequestOutput:
        """``await llm.generate_async(prompt, params)``: one prompt's final RequestOutput."""
        self._require_open("generate_async")
        sub = self._frontend.prepare_one(prompt, sampling_params, request_id, output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for final in self._driver.stream(sub):
            pass
        return final

    # ---- scoring -----------------------------------------------------------------------
    def score(
        self, sequences: Any, prompt_lens: Sequence[int] | None = None, temperature: float = 1.0,
        routed_experts: Any = None,
    ) -> list[list[float]]:
        """Teacher-forced logprobs of given token sequences (old-policy / reference logprobs,
        rollout-vs-trainer mismatch probes). For each sequence ``s`` with prompt length ``p``
        (default 1), returns ``[logprob(s[i] | s[:i]) for i in range(p, len(s))]`` in fp32
        under ``log_softmax(logits / temperature)``: the raw model distribution at
        temperature 1, which equals ``generate``'s logprobs at temperature 1 without filters
        (any mode), and "scaled" logprobs at the sampling temperature. The KV of ``s[:p-1]``
        comes from the prefix cache where cached (a prompt just generated from, an earlier
        turn); the positions scored are always computed. Blocks until done; refuses while
        paused. Sequences hold 1 to ``max_model_len`` tokens (``InvalidRequestError``).

        ``routed_experts`` (MoE models: routing replay): None, or per sequence None or the
        experts of its positions ``[position][moe_layer][k]``, one per position but the last
        (``prompt_routed_experts + routed_experts[1:]`` of the generation that sampled it; a
        last one may be given too): each position is sent to those experts, with the
        router's weights at them, instead of the router's choice. Such a sequence is
        computed whole (no prefix cache). Checked (shape, k distinct ids in range) before
        any work."""
        batch = self._frontend.prepare_score(sequences, prompt_lens, temperature, routed_experts)
        todo = [i for i, sub in enumerate(batch) if sub.score.start < len(sub.prompt.token_ids)]
        reqs: dict[int, Request] = {}
        outs = [out for _, out in self._frontend.collect([batch[i] for i in todo], reqs)]
        _raise_if_nonfinite([o for o in outs if o is not None])
        results: list[list[float]] = [[] for _ in batch]
        for j, i in enumerate(todo):
            results[i] = [e.logprob for e in reqs[j].prompt_logprobs]
        return results

    # ---- sleep, wake, weight updates --------------------------------------------------
    @property
    def weight_version(self) -> int:
        """Bumped by every successful weight update; carried by every RequestOutput."""
        return self.worker.engine.weight_version

    @property
    def is_sleeping(self) -> bool:
        return self.worker.memory.is_sleeping

    def sleep(self, level: int = 1) -> None:
        """Hand device memory back (to the trainer). Level 1: the KV cache is dropped and
        the weights are copied to (pinned) host memory; level 2: both are dropped and the
        weights must come back through ``update_weights`` or ``load_weights``. Requests in
        flight lose their KV and are recomputed after the wake. Sleeping twice is a no-op.
        The first sleep(1) allocates the host copy unless ``enable_sleep_mode=True`` had it
        allocated from start-up; ``HostMemoryError`` when it cannot (nothing changed)."""
        self.worker.memory.check_level(level)  # before anything is dropped
        if self.worker.is_shut_down:
            return
        t0 = time.perf_counter()
        freed = self.worker.sleep(level)
        logger.info("sleep(level=%d) in %.3fs: freed %d bytes of device memory", level, time.perf_counter() - t0, freed)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take device memory back: ``tags`` from "weights", "kv_cache" (None: both). On CUDA
        the addresses are the ones before sleep. Raises WakeOOMError, with nothing left
        half-mapped, when the device has no room: all or nothing per call (the tags of this
        call stay asleep; tags woken by earlier calls stay awake), and a later call may
        succeed. Waking what is awake is a no-op."""
        self._require_open("wake_up")
        if tags is not None and (
            not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) and t in MEMORY_TAGS for t in tags)
        ):
            raise InvalidRequestError("tags", tags, f"None or a list of {list(MEMORY_TAGS)}")
        t0 = time.perf_counter()
        woken = self.worker.wake_up(tags)
        if woken:
            logger.info("wake_up(%s) in %.3fs", woken, time.perf_counter() - t0)
            self._driver.kick()  # async requests waited for the memory

    def memory_usage(self) -> dict[str, dict[str, int]]:
        """Bytes held per tag: ``{"weights": {"device": n, "host": m}, "kv_cache": {...}}``."""
        return self.worker.memory.memory_usage()

    def update_weights(
        self, named_tensors: Any, version: int | None = None, *, check_finite: bool = True,
        allow_version_decrease: bool = False,
    ) -> int:
        """Load new weights in place from (HF name, tensor) pairs (a dict or an iterable of
        pairs): any device, any floating dtype, any subset of the model's weights (fused
        q/k/v and gate/up and tied embeddings map as in checkpoint loading).

        A transaction: every name, shape, dtype and layout is checked first, and with
        ``check_finite`` (default) every tensor is checked for NaN and inf (one min/max pass
        per tensor, one host read); only then is anything copied. On a problem
        ``WeightUpdateError`` names it and the old weights stay, bit for bit, with the same
        ``weight_version``. On success the prefix cache is reset and ``weight_version`` is
        bumped, or set to ``version`` (an int >= 0, not below the current version unless
        ``allow_version_decrease``); requests in flight (say, paused) keep their tokens and
        recompute their KV under the new weights. Returns the number of tensors loaded."""
        self._require_open("update_weights")
        _check_flag("check_finite", check_finite)
        items = _named_tensor_pairs(named_tensors)
        return self.worker.update_weights(
            items, version, check_finite=check_finite, allow_version_decrease=allow_version_decrease
        )

    def mark_partial_update(self, loaded: set[str]) -> int:
        """For streaming loaders (``trainers_integration.update_weights_in_buckets``): a stream
        of updates failed after loading the HF names in ``loaded``. The weights it did not reach
        are older than those it did, so generation is refused (``EngineSleepingError``) until
        ``update_weights`` or ``load_weights`` loads them too. Returns how many are stale."""
        if not isinstance(loaded, (set, frozenset, list, tuple)) or not all(isinstance(n, str) for n in loaded):
            raise InvalidRequestError("loaded", loaded, "a set of HF weight names (str)")
        return self.worker.mark_partial_update(set(loaded))

    def load_weights(
        self, path: str | os.PathLike, version: int | None = None, *, check_finite: bool = True,
        allow_version_decrease: bool = False,
    ) -> int:
        """``update_weights`` from a safetensors checkpoint directory (pickle is refused; a
        sharded checkpoint's index may name only files inside the directory). With
        ``check_finite`` the checkpoint is read twice (a NaN/inf pass, then the copy) so a
        bad tensor anywhere leaves the old weights untouched."""
        self._require_open("load_weights")
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidRequestError("path", path, "a str or os.PathLike: a safetensors checkpoint directory")
        _check_flag("check_finite", check_finite)
        return self.worker.load_weights(
            path, version, check_finite=check_finite, allow_version_decrease=allow_version_decrease
        )

    def reload_weights(self) -> int:
        """Read back from the model's source (its directory, or the HF module it was built
        from) the weights that ``sleep(level=2)`` discarded and no update has loaded since;
        weights updated after the sleep are kept. Returns how many tensors were read (0 when
        nothing is missing). vLLM's ``reload_weights`` reads every weight again, which
        undoes a sync the trainer made after the sleep; this one cannot."""
        self._require_open("reload_weights")
        return self.worker.reload_weights(self._weight_source)

    def collective_rpc(
        self, method: Any, timeout: float | None = None, args: tuple = (), kwargs: dict[str, Any] | None = None,
    ) -> list[Any]:
        """vLLM's call of a worker method by name on every worker; here the one worker is
        this rank's engine, so the list holds one result. ``method``: "sleep", "wake_up",
        "reload_weights" or "reset_prefix_cache" (the LLM methods of those names); any other
        name, or a callable, raises ``UnsupportedFeatureError`` (a ``NotImplementedError``,
        which vLLM's callers catch). ``timeout`` (None or seconds > 0) is accepted: the call
        runs here and now, so it cannot be left waiting on a worker."""
        if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0):
            raise InvalidRequestError("timeout", timeout, "None or a number of seconds > 0")
        if not isinstance(args, (tuple, list)):
            raise InvalidRequestError("args", args, "a tuple of positional arguments")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise InvalidRequestError("kwargs", kwargs, "None or a dict of keyword arguments")
        if not isinstance(method, str) or method not in RPC_METHODS:
            raise UnsupportedFeatureError(
                f"collective_rpc({method!r}): rollout serves only {list(RPC_METHODS)} by name"
            )
        return [getattr(self, method)(*args, **(kwargs or {}))]

    def _is_awake(self) -> bool:
        return self.worker.is_awake()

    def _require_open(self, what: str) -> None:
        if self.worker.is_shut_down:
            raise EngineStateError(f"{what} after shutdown(): the engine released its memory for good; build a new LLM")

    def _require_awake(self, what: str, tags: tuple[str, ...] = MEMORY_TAGS) -> None:
        self._require_open(what)
        self.worker.require_awake(what, tags)


def check_no_lora(lora_request: Any) -> None:
    if lora_request is not None:
        raise UnsupportedFeatureError(f"lora_request={lora_request!r}: LoRA adapters are not supported yet; pass None")


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidRequestError(name, value, "a bool")


def _interactive() -> bool:
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
    return tty and not (torch.distributed.is_available() and torch.distributed.is_initialized())


def _raise_if_nonfinite(outputs: list[RequestOutput]) -> None:
    bad = [o for o in outputs if o.error is not None]
    if bad:
        raise NonFiniteError(
            f"{len(bad)} of {len(outputs)} prompts had samples whose logits turned NaN or inf "
            f"(finish_reason 'error'), e.g. {bad[0].error}; every output is in this error's .outputs",
            tuple(o.request_id for o in bad), outputs,
        )


def _named_tensor_pairs(named_tensors: Any) -> list[tuple[str, Any]]:
    """``update_weights``' argument as a list of (name, value) pairs; the values are checked
    by ``tensor_problem``."""
    if isinstance(named_tensors, dict):
        items = list(named_tensors.items())
    elif isinstance(named_tensors, (str, bytes, torch.Tensor)) or not isinstance(named_tensors, Iterable):
        raise InvalidRequestError(
            "named_tensors", named_tensors, "a dict or an iterable of (HF name, torch.Tensor) pairs"
        )
    else:
        items = list(named_tensors)
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise WeightUpdateError(f"named_tensors[{i}] is {type(item).__name__}, expected a (str, torch.Tensor) pair")
    return [(name, t) for name, t in items]


def _progress_bar(enabled: bool | None, total: int):
    if enabled is None:
        enabled = _interactive()
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Generating", unit="prompt", dynamic_ncols=True)
