"""AsyncLLM: vLLM's ``vllm.v1.engine.async_llm.AsyncLLM`` calls, served by an ``LLM`` in
this process.

RL frameworks (verl's agent loop, OpenRLHF's async agents) drive vLLM's AsyncLLM: ``async
for out in engine.generate(prompt, params, request_id)``, ``await engine.abort(...)``,
``sleep``/``wake_up``, ``pause_generation``/``resume_generation``, ``collective_rpc``. Here
the same calls go to the ``LLM`` of the trainer's rank (its asyncio streams over one shared
engine loop): no engine process and no second copy of the weights. Every method delegates to
one of ``LLM``'s; the facade adds only vLLM's argument shapes and return values.

Single-threaded like ``LLM``: call it from the event loop's thread. The engine loop is a
task on that thread that steps between coroutines, so every call here lands on a step
boundary and runs to its end without waiting for the loop: ``await engine.sleep()`` from
one agent while others stream cannot deadlock (the loop idles while asleep or paused and
``wake_up``/``resume_generation`` restart it). Only the drains (``pause_generation(mode=
"wait")``, ``wait_for_requests_to_drain``) wait, and they refuse to while nothing could
finish the requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from rollout.entrypoints.llm import LLM
from rollout.errors import EngineStateError, InvalidRequestError, UnsupportedFeatureError
from rollout.outputs import RequestOutput
from rollout.sampling_params import SamplingParams

PAUSE_MODES = ("abort", "wait", "keep")
# Keys of vLLM's prompt dicts (TokensPrompt/TextPrompt) that ask for inputs we cannot take.
_UNSUPPORTED_PROMPT_KEYS = ("multi_modal_data", "mm_processor_kwargs", "prompt_embeds")
_DRAIN_POLL_S = 0.001


def _engine_args_fields() -> list[tuple]:
    """One field per keyword argument of ``LLM.__init__``, with its default."""
    fields = []
    for name, p in list(inspect.signature(LLM.__init__).parameters.items())[1:]:
        if p.default is inspect.Parameter.empty:
            fields.append((name, p.annotation))
        else:
            fields.append((name, p.annotation, dataclasses.field(default=p.default)))
    return fields


def _create_llm(self) -> LLM:
    return LLM(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


# Generated from LLM's signature so the two never drift apart; frozen, like every config.
AsyncEngineArgs = dataclasses.make_dataclass(
    "AsyncEngineArgs", _engine_args_fields(), frozen=True,
    namespace={
        "__doc__": "vLLM's ``AsyncEngineArgs(model=..., ...)``: ``LLM``'s keyword arguments (same names, "
        "same defaults, vLLM's engine keywords that ``LLM`` accepts included), checked when "
        "``create_llm()`` builds the engine. A keyword ``LLM`` does not take is a ``TypeError``.",
        "__module__": __name__,
        "create_llm": _create_llm,
    },
)


class AsyncLLM:
    """vLLM's AsyncLLM over an ``LLM`` of this process.

    ``AsyncLLM(llm)`` wraps an engine the trainer already holds (``llm`` stays usable
    directly); ``AsyncLLM.from_engine_args(AsyncEngineArgs(model=..., dtype=...))`` builds
    one. Either way ``shutdown()`` shuts the ``LLM`` down.

    What maps to what (vLLM's call -> ``LLM``'s; all ``async`` as in vLLM unless noted):

    - ``generate(prompt, sampling_params, request_id)`` -> ``generate_stream``
    - ``abort(request_id or ids)`` -> ``abort``
    - ``pause_generation(mode=...)`` -> ``pause`` (after aborting or draining)
    - ``resume_generation()``, ``is_paused()`` -> ``resume``, ``is_paused``
    - ``sleep(level)``, ``wake_up(tags)``, ``is_sleeping()`` -> the same names
    - ``reset_prefix_cache()``, ``collective_rpc(method, ...)`` -> the same names
    - ``wait_for_requests_to_drain()`` -> ``has_unfinished_requests``, polled
    - ``get_tokenizer()`` (sync), ``tokenizer`` -> ``get_tokenizer``
    - ``get_model_config()``, ``model_config`` -> ``config.model`` (rollout's ``ModelConfig``)
    - ``check_health()``, ``errored``, ``dead_error`` -> whether the engine is shut down
    - ``shutdown()`` (sync) -> ``shutdown``

    Not served: LoRA (``lora_request`` other than None raises ``UnsupportedFeatureError``,
    a ``NotImplementedError``), multimodal inputs, priority scheduling, data-parallel
    routing (``data_parallel_rank``), pooling (``encode``), profiling, streaming inputs.
    """

    def __init__(self, llm: LLM) -> None:
        if not isinstance(llm, LLM):
            raise InvalidRequestError("llm", llm, "a rollout LLM (AsyncLLM.from_engine_args builds one)")
        self.llm = llm
        # request_id -> number of generate() streams of that id not yet ended (the requests
        # pause_generation(mode="abort") aborts; two only while the second is being refused).
        self._live: dict[str, int] = {}

    @classmethod
    def from_engine_args(cls, engine_args: Any) -> AsyncLLM:
        """vLLM's ``AsyncLLM.from_engine_args``: build the ``LLM`` from ``AsyncEngineArgs``."""
        if not isinstance(engine_args, AsyncEngineArgs):
            raise InvalidRequestError("engine_args", engine_args, "rollout.entrypoints.async_llm.AsyncEngineArgs")
        return cls(engine_args.create_llm())

    # ---- generation ---------------------------------------------------------------------
    async def generate(
        self,
        prompt: Any,
        sampling_params: SamplingParams | None,
        request_id: str,
        *,
        prompt_text: str | None = None,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        trace_headers: Any = None,
        priority: int = 0,
        data_parallel_rank: int | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """``async for out in engine.generate(prompt, params, request_id)``: one prompt's
        outputs as it advances, the last with ``finished=True``. ``prompt``: vLLM's
        ``TokensPrompt(prompt_token_ids=[...])`` dict, a ``{"prompt": str}`` dict or a str
        (any one-prompt form of ``LLM.generate``). Outputs follow
        ``sampling_params.output_kind``: CUMULATIVE snapshots (the default, as in vLLM),
        DELTA or FINAL_ONLY. ``prompt_text`` names a token prompt's text in the outputs;
        ``trace_headers`` are ignored. As in vLLM, nothing runs before the first iteration
        (where a bad argument raises), and closing or cancelling the iteration aborts the
        request. A request whose stream is open while the engine sleeps loses its KV and
        recomputes it after ``wake_up``; one open while paused waits for the resume."""
        _check_served(lora_request=lora_request, tokenization_kwargs=tokenization_kwargs or None,
                      priority=priority, data_parallel_rank=data_parallel_rank)
        stream = self.llm.generate_stream(_one_prompt(prompt, prompt_text), sampling_params, request_id)
        self._live[request_id] = self._live.get(request_id, 0) + 1
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
                    yield out
        finally:
            self._live[request_id] -= 1
            if not self._live[request_id]:
                del self._live[request_id]

    async def abort(self, request_id: str | Iterable[str], internal: bool = False) -> None:
        """End requests now (``LLM.abort``): their streams yield a final output with
        finish_reason "abort" holding the tokens generated so far. Unknown or finished ids
        are skipped (logged). ``internal`` is vLLM's and changes nothing here."""
        self.llm.abort(request_id)

    # ---- pause, sleep, caches -------------------------------------------------------------
    async def pause_generation(
        self, *, mode: str = "abort", wait_for_inflight_requests: bool | None = None, clear_cache: bool = True
    ) -> None:
        """Stop scheduling (``LLM.pause``) so weights can be updated. ``mode``: "abort"
        (vLLM's default) aborts the requests of this AsyncLLM's open streams first; "wait"
        waits until every request has finished; "keep" freezes them (they keep their tokens
        and KV and go on after ``resume_generation``, recomputing their KV if the weights
        changed). ``wait_for_inflight_requests=True`` is vLLM's older spelling of "wait".
        ``clear_cache`` resets the prefix cache (cached blocks of finished requests)."""
        if wait_for_inflight_requests:
            mode = "wait"
        if mode not in PAUSE_MODES:
            raise InvalidRequestError("mode", mode, f"one of {PAUSE_MODES}")
        if not isinstance(clear_cache, bool):
            raise InvalidRequestError("clear_cache", clear_cache, "a bool")
        if mode == "abort" and self._live:
            self.llm.abort(list(self._live))
        elif mode == "wait":
            await self._drain(None, "pause_generation(mode='wait')")
        self.llm.pause()
        if clear_cache:
            self.llm.reset_prefix_cache()

    async def resume_generation(self) -> None:
        """Continue after ``pause_generation`` (``LLM.resume``); a no-op when not paused."""
        if self.llm.is_paused:
            self.llm.resume()

    async def is_paused(self) -> bool:
        return self.llm.is_paused

    async def sleep(self, level: int = 1) -> None:
        """Hand device memory back (``LLM.sleep``): level 1 keeps the weights on the host,
        level 2 discards them. Requests in flight stay (vLLM's ``mode="keep"``; newer vLLM
        aborts them by default): they lose their KV and recompute it after ``wake_up``.
        Returns at once: the engine loop idles while asleep."""
        self.llm.sleep(level)

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """Take device memory back (``LLM.wake_up``): ``tags`` from "weights", "kv_cache"
        (None: both); the engine loop goes on with the requests that waited."""
        self.llm.wake_up(tags)

    async def is_sleeping(self) -> bool:
        return self.llm.is_sleeping

    async def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        """Forget every cached prefix (``LLM.reset_prefix_cache``); returns True as vLLM
        does on success. Running requests keep their KV: ``reset_running_requests`` and
        ``reset_connector`` (a KV connector) are not served."""
        if reset_running_requests or reset_connector:
            raise UnsupportedFeatureError(
                "reset_prefix_cache(reset_running_requests=True / reset_connector=True): rollout resets cached "
                "prefixes only (running requests keep their KV; there is no KV connector)"
            )
        self.llm.reset_prefix_cache()
        return True

    async def collective_rpc(
        self, method: str, timeout: float | None = None, args: tuple = (), kwargs: dict[str, Any] | None = None
    ) -> list[Any]:
        """vLLM's call of a method on every worker, served by ``LLM.collective_rpc`` (one
        result per worker of this rank: a list of one). Methods without a rollout
        counterpart raise ``UnsupportedFeatureError`` (a ``NotImplementedError``)."""
        return self.llm.collective_rpc(method, timeout=timeout, args=args, kwargs=kwargs)

    async def wait_for_requests_to_drain(self, drain_timeout: float = 300) -> None:
        """Return once no request is unfinished; ``TimeoutError`` after ``drain_timeout``
        seconds. Refused (``EngineStateError``) while paused or asleep with requests left,
        which nothing would finish."""
        await self._drain(drain_timeout, "wait_for_requests_to_drain")

    async def _drain(self, timeout: float | None, what: str) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.llm.has_unfinished_requests():
            if self.llm.is_paused or self.llm.is_sleeping:
                state = "paused" if self.llm.is_paused else "asleep"
                raise EngineStateError(f"{what}: the engine is {state}, so its unfinished requests cannot finish")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{what}: requests still unfinished after {timeout} s")
            await asyncio.sleep(_DRAIN_POLL_S)  # the engine loop steps meanwhile

    # ---- what the engine is -------------------------------------------------------------
    def get_tokenizer(self) -> Any | None:
        """The engine's tokenizer (synchronous, as in current vLLM)."""
        return self.llm.get_tokenizer()

    @property
    def tokenizer(self) -> Any | None:
        return self.llm.get_tokenizer()

    @property
    def model_config(self) -> Any:
        """The engine's ``rollout.config.ModelConfig`` (``hf_config``, ``dtype``,
        ``max_model_len``, ``vocab_size``), not vLLM's class."""
        return self.llm.config.model

    async def get_model_config(self) -> Any:
        return self.model_config

    # ---- health and lifetime ------------------------------------------------------------
    @property
    def errored(self) -> bool:
        """True once the engine is shut down (vLLM: the engine process died). A failed step
        is rolled back and leaves the engine usable, so it does not count."""
        return self.llm.worker.is_shut_down

    @property
    def is_running(self) -> bool:
        return not self.errored

    @property
    def is_stopped(self) -> bool:
        return self.errored

    @property
    def dead_error(self) -> BaseException:
        return EngineStateError("the rollout engine is shut down: build a new LLM")

    async def check_health(self) -> None:
        """Raise ``dead_error`` once the engine is shut down."""
        if self.errored:
            raise self.dead_error

    def shutdown(self) -> None:
        """Shut the ``LLM`` down (``LLM.shutdown``): unfinished requests are aborted and
        every device buffer is released; later calls raise ``EngineStateError``."""
        self.llm.shutdown()


# generate()'s vLLM options and the one value of each that rollout serves: no LoRA, no
# tokenizer options, first-come-first-served scheduling (vLLM refuses a priority without its
# priority policy too), one engine per rank (no data-parallel routing inside it).
_SERVED = {"lora_request": None, "tokenization_kwargs": None, "priority": 0, "data_parallel_rank": None}


def _check_served(**options: Any) -> None:
    for name, value in options.items():
        if value != _SERVED[name]:
            raise UnsupportedFeatureError(
                f"AsyncLLM.generate({name}={value!r}): rollout serves {name}={_SERVED[name]!r} only"
            )


def _one_prompt(prompt: Any, prompt_text: str | None) -> Any:
    """vLLM's prompt forms as ``LLM`` takes them; inputs we cannot serve are refused."""
    if isinstance(prompt, dict):
        for key in _UNSUPPORTED_PROMPT_KEYS:
            if prompt.get(key):
                raise UnsupportedFeatureError(f"AsyncLLM.generate: prompt[{key!r}]: rollout serves text models only")
        if prompt_text is not None and "prompt_token_ids" in prompt and prompt.get("prompt") is None:
            return {"prompt_token_ids": prompt["prompt_token_ids"], "prompt": prompt_text}
    return prompt
