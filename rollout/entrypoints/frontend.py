"""The request-level front of an LLM: what gets queued, under which id, and where outputs go.

``RequestFrontend`` validates submissions (prompts, params, request ids) before anything is
queued, queues them on the engine, drives the engine for blocking calls, and owns the pause
flag. ``OutputRouter`` gives every request an owner: requests queued by a blocking call
(``generate``, ``generate_iter``, ``score``) or an asyncio stream carry a *sink* that
receives their outputs; requests from ``add_request`` have none, and their outputs wait in
a buffer for ``LLM.step()``. Whoever drives the engine (``step()``, a blocking call, the
async loop), each output reaches its owner.

Single-threaded by design: every call comes from the thread that owns the engine.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, Union

from rollout.entrypoints.input_processor import InputProcessor, ProcessedPrompt, expand_params, split_prompts
from rollout.engine.llm_engine import LLMEngine
from rollout.engine.request import PromptLogprobsSpec, Request
from rollout.errors import EngineStateError, InvalidRequestError
from rollout.outputs import RequestOutput
from rollout.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

FINAL_ONLY = RequestOutputKind.FINAL_ONLY

# Receives a request's outputs, or the exception of a step that failed.
Sink = Callable[[Union[RequestOutput, BaseException]], None]


class Submission(NamedTuple):
    """One validated prompt, ready to queue."""

    prompt: ProcessedPrompt
    params: SamplingParams
    request_id: str | None = None  # None: a fresh id when queued
    score: PromptLogprobsSpec | None = None  # set for LLM.score
    replay_routes: Any = None  # LLM.score's given experts [positions, moe_layer, k]; None: the router's


class OutputRouter:
    def __init__(self) -> None:
        self.sinks: dict[str, Sink] = {}
        self.unclaimed: list[RequestOutput] = []  # outputs of requests without a sink

    def route(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            sink = self.sinks.pop(out.request_id, None) if out.finished else self.sinks.get(out.request_id)
            if sink is None:
                self.unclaimed.append(out)
            else:
                sink(out)

    def route_aborted(self, out: RequestOutput) -> None:
        """An abort's final output: to the sink if any (``abort`` returns it anyway), and
        earlier snapshots of that request still waiting for ``step()`` are dropped."""
        sink = self.sinks.pop(out.request_id, None)
        if sink is not None:
            sink(out)
        elif self.unclaimed:
            self.unclaimed = [o for o in self.unclaimed if o.request_id != out.request_id]

    def fail_all(self, exc: BaseException) -> None:
        """A step failed: every waiting consumer gets the exception."""
        sinks, self.sinks = self.sinks, {}
        for sink in sinks.values():
            sink(exc)

    def take_unclaimed(self) -> list[RequestOutput]:
        outs, self.unclaimed = self.unclaimed, []
        return outs


class RequestFrontend:
    """``require_awake(what)`` raises when the engine's memory is asleep; ``is_awake()``
    says the same without raising."""

    def __init__(
        self, engine: LLMEngine, input_processor: InputProcessor,
        require_awake: Callable[[str], None], is_awake: Callable[[], bool],
    ) -> None:
        self.engine = engine
        self.input_processor = input_processor
        self.router = OutputRouter()
        self.paused = False
        self._require_awake = require_awake
        self._is_awake = is_awake
        self._counter = itertools.count()

    # ---- validation: everything before anything is queued -------------------------------
    def prepare_one(
        self, prompt: Any, sampling_params: SamplingParams | None, request_id: Any,
        output_kind: RequestOutputKind | None = None,
    ) -> Submission:
        items = split_prompts(prompt)
        if len(items) != 1:
            raise InvalidRequestError("prompt", prompt, "one prompt (a str, token ids or a dict); use generate for batches")
        (params,) = expand_params(sampling_params, 1)
        params = self.input_processor.resolve(params)
        if output_kind is not None and params.output_kind != output_kind:
            params = dataclasses.replace(params, output_kind=output_kind)
        processed = self.input_processor.process(items[0])
        if request_id is not None:
            self.check_request_ids([(request_id, params.n)])
        return Submission(processed, params, request_id)

    def prepare_batch(self, what: str, prompts: Any, sampling_params: Any, request_ids: Any = None) -> list[Submission]:
        """A blocking call's batch; its outputs are final-only, whatever ``output_kind`` says."""
        self.require_runnable(what)
        items = split_prompts(prompts)
        params = expand_params(sampling_params, len(items))
        final: dict[int, SamplingParams] = {}
        for sp in params:
            if id(sp) not in final:
                resolved = self.input_processor.resolve(sp)
                final[id(sp)] = (
                    resolved if resolved.output_kind == FINAL_ONLY else dataclasses.replace(resolved, output_kind=FINAL_ONLY)
                )
        processed = [self.input_processor.process(p, i) for i, p in enumerate(items)]
        if request_ids is None:
            ids = [None] * len(items)
        elif isinstance(request_ids, (list, tuple)) and len(request_ids) == len(items):
            ids = list(request_ids)
            self.check_request_ids(list(zip(ids, (sp.n for sp in params))))
        else:
            raise InvalidRequestError("request_ids", request_ids, f"None or {len(items)} str (one per prompt)")
        return [Submission(pp, final[id(sp)], rid) for pp, sp, rid in zip(processed, params, ids)]

    def prepare_score(
        self, sequences: Any, prompt_lens: Any, temperature: Any, routed_experts: Any = None,
    ) -> list[Submission]:
        """One scoring request per sequence: the sequence as a prompt, its logprobs from
        position ``prompt_len`` on, and one throwaway greedy token (the engine samples
        after every prompt); ``routed_experts`` replays given experts."""
        self.require_runnable("score")
        checked = self.input_processor.process_score(sequences, prompt_lens, temperature)
        routes = self.input_processor.process_routes(routed_experts, checked)
        params = SamplingParams(
            temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False, output_kind=FINAL_ONLY, logprobs_mode="raw"
        )
        return [
            Submission(
                ProcessedPrompt(None, ids), params, None, PromptLogprobsSpec(start=start, temperature=temperature), r,
            )
            for (ids, start), r in zip(checked, routes)
        ]

    def check_request_ids(self, ids_and_n: list[tuple[Any, int]]) -> None:
        """Ids must be non-empty str, unique, and unused by unfinished requests (as must
        the ids of their samples, ``{id}-{i}`` when n > 1)."""
        seen: set[str] = set()
        for rid, n in ids_and_n:
            if not isinstance(rid, str) or not rid:
                raise InvalidRequestError("request_id", rid, "None or a non-empty str")
            children = LLMEngine.child_ids(rid, n)
            names = {rid, *children}
            clash = sorted((names & seen) | set(self.engine.outputs.ids_in_use(rid, children)))
            if clash:
                raise InvalidRequestError("request_id", rid, "an id no unfinished request uses", f"{clash} in use")
            seen |= names

    def require_runnable(self, what: str) -> None:
        self._require_awake(what)
        if self.paused:
            raise EngineStateError(f"{what} cannot finish while the engine is paused: call resume() first")

    # ---- queuing and driving ------------------------------------------------------------
    def submit(self, sub: Submission, sink: Sink | None = None) -> tuple[str, list[Request]]:
        """Queue ``sub``; returns its request id and its engine requests (one per sample)."""
        rid = sub.request_id
        if rid is None:
            rid = str(next(self._counter))
            while self.engine.outputs.ids_in_use(rid, LLMEngine.child_ids(rid, sub.params.n)):
                rid = str(next(self._counter))
        else:
            self.check_request_ids([(rid, sub.params.n)])  # again: taken since validation?
        children = self.engine.add_request(
            rid, sub.prompt.prompt, sub.prompt.token_ids, sub.params, sub.score, sub.replay_routes,
        )
        if sink is not None:
            self.router.sinks[rid] = sink
        return rid, children

    def collect(self, batch: list[Submission], keep: dict[int, Request] | None = None) -> Iterator[tuple[int, RequestOutput]]:
        """Queue ``batch`` (final-only outputs), drive the engine and yield (index, output)
        as each finishes; closing early aborts the rest. ``keep`` gets each first sample."""
        done: deque = deque()
        sink = done.append
        index_of: dict[str, int] = {}
        try:
            for i, sub in enumerate(batch):
                rid, children = self.submit(sub, sink)
                index_of[rid] = i
                if keep is not None:
                    keep[i] = children[0]
            while index_of:
                while not done:
                    self.require_runnable("a blocking call")  # paused or put to sleep meanwhile
                    self.step()
                out = done.popleft()
                if isinstance(out, BaseException):
                    raise out
                yield index_of.pop(out.request_id), out
        finally:
            for rid in index_of:
                self.abort_quietly(rid, sink)

    def step(self) -> None:
        """One engine step; outputs go to their owners. A failure goes to every waiting
        owner, and their requests are aborted (as a failed ``generate`` always did)."""
        try:
            outs = self.engine.step()
        except Exception as e:
            waiting = list(self.router.sinks)
            self.router.fail_all(e)
            for rid in waiting:
                self.engine.abort_request(rid)
            raise
        self.router.route(outs)

    def can_step(self) -> bool:
        return not self.paused and self.engine.has_unfinished_requests() and self._is_awake()

    # ---- aborts ---------------------------------------------------------------------------
    def abort(self, request_ids: str | Iterable[str]) -> list[RequestOutput]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        outs, unknown = [], []
        for rid in ids:
            out = self.engine.abort_request(rid) if isinstance(rid, str) else None
            if out is None:
                unknown.append(rid)
                continue
            self.router.route_aborted(out)
            outs.append(out)
        if unknown:
            logger.warning("abort: no unfinished request with id %s; nothing done for it", unknown)
        return outs

    def abort_quietly(self, request_id: str, sink: Sink) -> None:
        """Abort a request its owner gave up on, if it still runs for that owner (its final
        output not yet routed, so the id is not someone else's since)."""
        if self.router.sinks.get(request_id) is not sink:
            return
        del self.router.sinks[request_id]
        self.engine.abort_request(request_id)
