"""LLMEngine: the in-process engine loop: schedule -> execute -> update -> outputs."""

from __future__ import annotations

import logging
from typing import Any

import torch

from rollout.distributed.agreement import NoAgreementCheck
from rollout.engine.kv_cache import KVCacheManager
from rollout.engine.model_runner import ModelRunner
from rollout.engine.routes import RouteChunk
from rollout.engine.step_data import ModelRunnerOutput, StepHandle
from rollout.engine.output_processor import OutputProcessor
from rollout.engine.request import PromptLogprobsSpec, Request, RequestStatus
from rollout.engine.scheduler import Scheduler, SchedulerOutput
from rollout.errors import EngineStepError, RolloutError
from rollout.outputs import RequestOutput
from rollout.platforms import Platform
from rollout.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(
        self, runner: ModelRunner, scheduler: Scheduler, tokenizer: Any | None,
        eos_token_ids: tuple[int, ...], platform: Platform, agreement: NoAgreementCheck | None = None,
    ) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.kv: KVCacheManager = scheduler.kv
        self.outputs = OutputProcessor(tokenizer)
        self.eos_token_ids = eos_token_ids
        self.platform = platform
        self.max_num_tokens = min(scheduler.config.max_model_len, self.kv.capacity_tokens)
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.weight_version = 0
        self.num_prompts = 0
        # Debug: ranks of a TP group check they got the same prompts and sample alike.
        self.agreement = agreement or NoAgreementCheck()
        # The step launched and not read back yet, and outputs read back by ``flush``.
        self._inflight: tuple[SchedulerOutput, StepHandle] | None = None
        self._ready: list[RequestOutput] = []

    @staticmethod
    def child_ids(request_id: str, n: int) -> list[str]:
        """The scheduler's ids of a prompt's ``n`` samples."""
        return [f"{request_id}-{i}" for i in range(n)] if n > 1 else [request_id]

    def add_request(
        self, request_id: str, prompt: str | None, token_ids: list[int], params: SamplingParams,
        score: PromptLogprobsSpec | None = None, replay_routes: torch.Tensor | None = None,
    ) -> list[Request]:
        """Queue one prompt (already validated, ids unused) as ``params.n`` child requests;
        ``score`` makes it a teacher-forced scoring request, ``replay_routes`` [positions,
        moe_layer, k] sends its positions to those experts. Returns the children."""
        self.agreement.check_prompt(self.num_prompts, token_ids, params.n)
        self.num_prompts += 1
        children = []
        for i, req_id in enumerate(self.child_ids(request_id, params.n)):
            child = params.for_sample(i) if params.n > 1 else params
            gen = None
            if child.seed is not None:
                gen = self.platform.manual_seed_generator(child.seed, self.runner.device)
            children.append(
                Request(
                    req_id=req_id, prompt_token_ids=token_ids, sampling_params=child,
                    max_num_tokens=self.max_num_tokens, eos_token_ids=self.eos_token_ids, generator=gen,
                    score=score, replay_routes=replay_routes,
                )
            )
        self.outputs.add(request_id, prompt, children, self.weight_version)
        for c in children:
            self.scheduler.add_request(c)
        return children

    def has_unfinished_requests(self) -> bool:
        """Requests to run, or outputs read back but not returned yet. (A step still in
        flight once every request has finished holds only tokens to throw away; the next
        step or ``flush`` reads it back.)"""
        return self.scheduler.has_unfinished_requests() or bool(self._ready)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a prompt's unfinished samples with "abort" (their tokens and logprobs so far
        are kept, their blocks freed); returns its final output, or None if unknown."""
        state = self.outputs.parents.get(request_id)
        if state is None:
            return None
        # A token of it still in flight is thrown away at read-back: the output ends with
        # what the caller has seen.
        self.scheduler.finish_requests([c.req.req_id for c in state.children], RequestStatus.FINISHED_ABORTED)
        return self.outputs.pop_finished(request_id)

    def step(self) -> list[RequestOutput]:
        """Run one engine step. Returns an output for every prompt with a sample that got a
        token in it (by its ``output_kind``; see OutputProcessor), ``finished`` when all
        its samples have ended.

        Steps overlap: this call schedules and launches step N+1, then reads back step N
        (launched by the previous call) while N+1 runs on the device, so the host's
        scheduling and output work hides behind the device's. The outputs returned are
        step N's; the step that launches nothing drains the pipeline. A request that stops
        in step N has had one more token computed in step N+1, which is thrown away."""
        sched = self.scheduler.schedule()
        try:
            launched = None if sched.is_empty else (sched, self.runner.launch(sched))
        except Exception as e:
            self._roll_back(sched)
            if isinstance(e, RolloutError):  # typed already (a dead tensor-parallel peer, say)
                raise
            raise EngineStepError(
                f"engine step failed ({type(e).__name__}: {e}); the step was rolled back: requests keep their "
                "tokens and recompute their KV at the next step"
            ) from e
        outs, self._ready = self._ready, []
        previous, self._inflight = self._inflight, launched
        if previous is not None:
            outs += self._read_back(*previous)
        elif launched is None and self.scheduler.has_unfinished_requests():
            raise RuntimeError("scheduler made no progress with requests pending (engine bug)")
        return outs

    def _roll_back(self, sched: SchedulerOutput) -> None:
        """Undo a step whose launch failed: its tokens will never come back, and the KV its
        requests had scheduled (and hashed into the prefix cache) may be half written. The
        step before it is read back as usual; then every running request goes back to
        waiting with its tokens (recomputed at the next step, as after a preemption) and no
        cached prefix survives."""
        self.scheduler.roll_back(sched)
        self.drop_kv_cache()

    def flush(self) -> None:
        """Read back the step in flight (its outputs come with the next ``step()``), so the
        KV cache, the weights or the requests can change under no running step."""
        if self._inflight is not None:
            previous, self._inflight = self._inflight, None
            self._ready += self._read_back(*previous)

    def _read_back(self, sched: SchedulerOutput, handle: StepHandle) -> list[RequestOutput]:
        run = self.runner.finish(handle)
        self.num_steps += 1
        self.agreement.check_step(self.num_steps, run.req_ids, run.sampled_token_ids)
        for req_id, chunk in run.prompt_logprobs.items():
            start, entries = chunk.start, chunk.entries
            req = self.scheduler.requests.get(req_id)
            if req is None:
                continue  # aborted while the step ran
            # Chunks arrive in order from the first position scored, but a prompt preempted
            # mid-prefill is recomputed with other chunk boundaries: keep only positions not
            # yet covered.
            num_have = req.prompt_logprobs_spec.start - 1 + len(req.prompt_logprobs)
            if start <= num_have:
                req.prompt_logprobs.extend(entries[num_have - start :])
        route_of = self._take_prompt_routes(run)
        errored = []
        if run.nonfinite_req_ids:
            # NaN/inf logits: the token is dropped and the sample ends; the others go on.
            errored = self.scheduler.finish_requests(run.nonfinite_req_ids, RequestStatus.FINISHED_ERROR)
            logger.warning("non-finite logits: %d request(s) ended with an error: %s", len(errored),
                           [r.req_id for r in errored][:10])
        advanced, _ = self.scheduler.update(sched, dict(zip(run.req_ids, run.sampled_token_ids)))
        lp_of = dict(zip(run.req_ids, run.logprobs))
        mask_of = dict(zip(run.req_ids, run.sampling_masks))
        stopped = []
        for req in advanced:
            req.output_weight_versions.append(self.weight_version)
            lp = lp_of[req.req_id]
            if lp is not None:
                req.output_logprobs.append(lp)
            mask = mask_of[req.req_id]
            if mask is not None:
                req.output_sampling_masks.append(mask)
            chunk = route_of.get(req.req_id)
            if chunk is not None and chunk.sampled is not None:
                req.output_routed_experts.append(chunk.sampled)
                self.kv.store_routes(req)
            # As in vLLM, the text of a stop token (EOS, stop_token_ids) is left out.
            if req.status == RequestStatus.FINISHED_STOPPED and not req.sampling_params.include_stop_str_in_output:
                continue
            if self.outputs.detokenize(req) is not None and not req.is_finished:
                stopped.append(req.req_id)
        self.num_generated_tokens += len(advanced)
        self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        # Every other finished request got a token this step, so ``advanced`` covers them.
        return self.outputs.step_outputs(advanced + errored)

    def _take_prompt_routes(self, run: ModelRunnerOutput) -> dict[str, RouteChunk]:
        """Prompt routes that came back go to their requests (a recompute overwrites what an
        earlier computation of those positions gave: the routes of the KV now held); the
        blocks they complete keep them for the prefix cache. Returns the chunks by request."""
        route_of = {}
        for req_id, chunk in zip(run.req_ids, run.routed_experts):
            if chunk is None:
                continue
            route_of[req_id] = chunk
            req = self.scheduler.requests.get(req_id)
            have = None if req is None else req.prompt_routed_experts
            if have is None or chunk.prompt_start > len(have):
                continue  # aborted while the step ran (a gap cannot happen: hits bring their routes)
            have[chunk.prompt_start : chunk.prompt_start + len(chunk.prompt)] = chunk.prompt
            self.kv.store_routes(req)
        return route_of

    def reset_prefix_cache(self) -> None:
        self.flush()
        self.kv.reset_prefix_cache()

    def drop_kv_cache(self) -> None:
        """The KV cache's contents are about to be lost: running requests go back to waiting
        (they recompute later, keeping their tokens) and no cached prefix survives."""
        self.flush()
        self.scheduler.preempt_all()
        self.kv.reset_prefix_cache()

    @property
    def prefix_cache_stats(self) -> dict[str, int]:
        pool = self.kv.pool
        return {"queries": pool.num_hit_queries, "hit_blocks": pool.num_hit_blocks}
