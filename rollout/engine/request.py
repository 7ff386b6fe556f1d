"""Request: the engine-side state of one sequence (one of a prompt's n samples)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from rollout.outputs import SamplingMask
from rollout.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Everything from here on is finished.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    # Its logits turned NaN/inf: the token is dropped and the request ends (NonFiniteError).
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass
class TokenLogprobs:
    """Logprob data of one generated token (filled only when the request asked for logprobs)."""

    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(frozen=True)
class PromptLogprobsSpec:
    """Which prompt tokens get logprobs, and under which distribution.

    Each prompt token from position ``start`` on gets its logprob under
    ``log_softmax(logits / temperature)`` of the position before it, plus the ``num_top``
    most likely tokens. ``SamplingParams.prompt_logprobs=k`` is ``start=1, temperature=1,
    num_top=k``; ``LLM.score`` picks its own ``start``, and the KV of the tokens before
    ``start - 1`` may then come from the prefix cache.
    """

    start: int = 1
    temperature: float = 1.0
    num_top: int = 0


@dataclass(eq=False)
class Request:
    """One sequence: prompt, generated tokens, and how far its KV cache has been computed.

    Every state the scheduler needs is "catch ``num_computed_tokens`` up to ``num_tokens``":
    a fresh prompt, a prefill chunk, a prefix-cache hit and a decode step all look alike.
    """

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    # Generation ends with "length" once the sequence holds this many tokens.
    max_num_tokens: int
    eos_token_ids: tuple[int, ...] = ()
    generator: torch.Generator | None = None
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # One per output token, when SamplingParams.return_sampling_mask (kept through preemption).
    output_sampling_masks: list[SamplingMask] = field(default_factory=list)
    # SamplingParams.return_routed_experts: per output token, the sampling position's experts
    # [moe_layer][k] (kept through preemption); per prompt position, the experts its KV was
    # computed with (a recompute or a prefix-cache hit overwrites them).
    output_routed_experts: list[list[list[int]]] = field(default_factory=list)
    prompt_routed_experts: list[list[list[int]]] = field(default_factory=list)
    # LLM.score(..., routed_experts=...): the experts each position must use [positions,
    # moe_layer, k] int64; such a request neither reads nor fills the prefix cache.
    replay_routes: torch.Tensor | None = None
    # Prompt logprobs, one entry per prompt token after the first (when requested).
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit at first schedule (stats)
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    # Chained hashes of this request's full blocks, filled as blocks fill up.
    block_hashes: list[int] = field(default_factory=list)
    # The weight version that sampled each output token.
    output_weight_versions: list[int] = field(default_factory=list)
    # Set for a teacher-forced scoring request (LLM.score): its prompt logprobs.
    score: PromptLogprobsSpec | None = None
    # Tokens sampled by scheduled steps whose results have not come back yet (0-2: the
    # engine schedules step N+1 before it reads step N's tokens). ``num_computed_tokens``
    # already counts the steps scheduled, so it may run ahead of ``num_tokens``.
    num_pending_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        eos = () if self.sampling_params.ignore_eos else self.eos_token_ids
        return tuple(dict.fromkeys((*eos, *self.sampling_params.stop_token_ids)))

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def uses_prefix_cache(self) -> bool:
        # Prompt logprobs need every prompt position's logits, so such prompts are recomputed;
        # KV computed with given experts is no other request's.
        return self.sampling_params.prompt_logprobs is None and self.replay_routes is None

    @property
    def records_routes(self) -> bool:
        return self.sampling_params.return_routed_experts

    @property
    def num_routed_positions(self) -> int:
        """Leading positions whose routes describe this request's KV (``routes_at``): the
        prompt's computed so far, then (never preempted) the generated ones but the last."""
        num_prompt = len(self.prompt_routed_experts)
        if num_prompt < self.num_prompt_tokens or self.num_preemptions:
            return num_prompt  # a recompute's generated positions did not come back
        return num_prompt + max(0, len(self.output_routed_experts) - 1)

    def routes_at(self, start: int, end: int) -> list[list[list[int]]]:
        """The routes of positions [start, end) (all below ``num_routed_positions``)."""
        p = self.num_prompt_tokens
        routes = self.prompt_routed_experts[start:min(end, p)]
        if end > p:  # position q >= p: the output token q - p + 1 was sampled there
            routes += self.output_routed_experts[max(start, p) - p + 1 : end - p + 1]
        return routes

    @property
    def prompt_logprobs_spec(self) -> PromptLogprobsSpec | None:
        if self.score is not None:
            return self.score
        k = self.sampling_params.prompt_logprobs
        return None if k is None else PromptLogprobsSpec(num_top=k)

    @property
    def max_cache_hit_tokens(self) -> int:
        """Leading tokens whose KV may come from the prefix cache: all but the last (its
        logits are needed), and for scoring none from the first position scored on."""
        if self.score is not None:
            return min(self.num_tokens - 1, self.score.start - 1)
        return self.num_tokens - 1

    @property
    def num_scheduled_end(self) -> int:
        """The tokens the request will hold once every step scheduled so far is back."""
        return self.num_tokens + self.num_pending_tokens

    @property
    def may_sample_more(self) -> bool:
        """False when the tokens already in flight reach a length limit: scheduling another
        step could only produce a token that is thrown away."""
        if not self.num_pending_tokens:
            return True
        params = self.sampling_params
        if params.max_tokens is not None and self.num_output_tokens + self.num_pending_tokens >= params.max_tokens:
            return False
        return self.num_scheduled_end < self.max_num_tokens

    def check_stop(self) -> RequestStatus | None:
        """Stop conditions that depend on token ids alone (stop strings are the detokenizer's)."""
        params = self.sampling_params
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if last in params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and self.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if self.num_tokens >= self.max_num_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
