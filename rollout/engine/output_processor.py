"""OutputProcessor: detokenizes, applies stop strings and builds RequestOutputs.

A prompt with ``n`` samples is one parent with ``n`` child requests. After each step, every
parent whose children advanced gets an output by its ``SamplingParams.output_kind``: a
snapshot of everything so far (CUMULATIVE), what is new since its previous output (DELTA),
or nothing until every child has finished (FINAL_ONLY). A parent's last output is the one
with ``finished=True``, emitted when all its children have finished.

While a child runs, its streamed text holds back the longest stop string's length minus
one characters, so a later stop-string match never takes back text already sent: every
streamed text is a prefix of the final text (and streamed token ids of the final ids).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rollout.engine.detokenizer import IncrementalDetokenizer, detokenize_one
from rollout.engine.request import Request, RequestStatus, TokenLogprobs
from rollout.errors import NonFiniteError
from rollout.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from rollout.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class ChildState:
    """One sample's output-side state."""

    req: Request
    detokenizer: IncrementalDetokenizer | None
    # Final-only outputs without stop strings decode their text once, at the end, instead
    # of token by token (the blocking generate of an RL trainer: no per-token host work).
    decode_at_end: bool = False
    stop_string: str | None = None  # the stop string that ended it
    num_sent_tokens: int = 0  # tokens and chars carried by earlier outputs (DELTA)
    num_sent_chars: int = 0
    # Per output token, vLLM's logprobs dict; built once per token, shared by snapshots.
    logprob_dicts: list[dict[int, Logprob]] = field(default_factory=list)
    cumulative_logprob: float = 0.0


@dataclass
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[ChildState]
    weight_version: int  # at submission
    hold_back_chars: int  # of streamed text while a child runs (stop strings)
    prompt_logprobs: PromptLogprobs | None = None  # built once every prompt position has them
    prompt_logprobs_sent: bool = False
    prompt_routes_sent: bool = False


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}
        self._child_of: dict[str, tuple[ParentState, ChildState]] = {}

    def add(self, request_id: str, prompt: str | None, children: list[Request], weight_version: int = 0) -> None:
        params = children[0].sampling_params
        wants_text = self.tokenizer is not None and params.detokenize
        at_end = wants_text and not params.stop and params.output_kind == RequestOutputKind.FINAL_ONLY
        states = [
            ChildState(
                c,
                IncrementalDetokenizer(
                    self.tokenizer, c.prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
                )
                if wants_text and not at_end
                else None,
                decode_at_end=at_end,
            )
            for c in children
        ]
        hold = max((len(s) for s in params.stop), default=1) - 1
        state = ParentState(request_id, prompt, children[0].prompt_token_ids, params, states, weight_version, hold)
        self.parents[request_id] = state
        for c in states:
            self._child_of[c.req.req_id] = (state, c)

    def ids_in_use(self, request_id: str, child_ids: Iterable[str]) -> list[str]:
        """Which of a new parent id and its child ids belong to a live request."""
        used = [request_id] if request_id in self.parents else []
        return used + [c for c in child_ids if c in self._child_of]

    def detokenize(self, req: Request) -> str | None:
        """Feed the request's newest token; returns a matched stop string, if any."""
        _, child = self._child_of[req.req_id]
        det = child.detokenizer
        if det is None:
            return None
        check = req.num_output_tokens >= req.sampling_params.min_tokens
        matched = det.update(req.output_token_ids[-1:], check_stop=check)
        if matched is not None:
            child.stop_string = matched
        return matched

    def step_outputs(self, reqs: Iterable[Request]) -> list[RequestOutput]:
        """Outputs of the parents of ``reqs`` (children that advanced or finished this step),
        by each parent's output kind; finished parents are forgotten."""
        parents = {}
        for req in reqs:
            entry = self._child_of.get(req.req_id)
            if entry is not None:
                parents.setdefault(entry[0].request_id, entry[0])
        outs = []
        for state in parents.values():
            if all(c.req.is_finished for c in state.children):
                outs.append(self.pop_finished(state.request_id))
            elif state.params.output_kind != RequestOutputKind.FINAL_ONLY:
                outs.append(self._build(state, finished=False))
        return outs

    def pop_finished(self, request_id: str) -> RequestOutput | None:
        """The final output of a parent whose children have all finished (and forget it)."""
        state = self.parents.get(request_id)
        if state is None or not all(c.req.is_finished for c in state.children):
            return None
        del self.parents[request_id]
        for c in state.children:
            del self._child_of[c.req.req_id]
        return self._build(state, finished=True)

    def _build(self, state: ParentState, finished: bool) -> RequestOutput:
        delta = state.params.output_kind == RequestOutputKind.DELTA
        want_lp = state.params.logprobs is not None
        outputs = []
        for i, c in enumerate(state.children):
            req = c.req
            reason = None
            if req.is_finished:
                reason = "stop" if c.stop_string is not None else req.status.finish_reason
            text = c.detokenizer.output_text if c.detokenizer is not None else ""
            if c.decode_at_end and finished:
                text = self._final_text(c, state.params)
            if not req.is_finished and state.hold_back_chars:
                text = text[: max(len(text) - state.hold_back_chars, c.num_sent_chars)]
            lo, lo_chars = (c.num_sent_tokens, c.num_sent_chars) if delta else (0, 0)
            out = CompletionOutput(
                index=i,
                text=text[lo_chars:],
                token_ids=req.output_token_ids[lo:],
                finish_reason=reason,
                stop_reason=c.stop_string if c.stop_string is not None else req.stop_reason,
                token_weight_versions=req.output_weight_versions[lo:],
            )
            if want_lp:
                self._extend_logprob_dicts(c)
                out.token_logprobs = [e.logprob for e in req.output_logprobs[lo:]]
                out.logprobs = c.logprob_dicts[lo:]
                out.cumulative_logprob = c.cumulative_logprob
            if state.params.return_sampling_mask:
                out.sampling_masks = req.output_sampling_masks[lo:]
            if state.params.return_routed_experts:
                out.routed_experts = req.output_routed_experts[lo:]
            c.num_sent_tokens, c.num_sent_chars = req.num_output_tokens, len(text)
            outputs.append(out)
        return RequestOutput(
            request_id=state.request_id, prompt=state.prompt, prompt_token_ids=list(state.prompt_token_ids),
            outputs=outputs, finished=finished, prompt_logprobs=self._prompt_logprobs(state, delta, finished),
            num_cached_tokens=state.children[0].req.num_cached_tokens, weight_version=state.weight_version,
            error=_error_of(state) if finished else None,
            prompt_routed_experts=self._prompt_routes(state, delta, finished),
        )

    @staticmethod
    def _prompt_routes(state: ParentState, delta: bool, finished: bool) -> list | None:
        """The first sample's prompt routes, once the whole prompt is computed (an abort
        mid-prefill ends with a part); a DELTA stream carries them once."""
        if not state.params.return_routed_experts or (delta and state.prompt_routes_sent):
            return None
        routes = state.children[0].req.prompt_routed_experts
        if not finished and len(routes) < len(state.prompt_token_ids):
            return None
        state.prompt_routes_sent = True
        return list(routes)

    def _final_text(self, c: ChildState, params: SamplingParams) -> str:
        ids = c.req.output_token_ids
        # As token by token: the text of a stop token (EOS, stop_token_ids) is left out.
        if c.req.status == RequestStatus.FINISHED_STOPPED and not params.include_stop_str_in_output:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)

    def _extend_logprob_dicts(self, c: ChildState) -> None:
        req = c.req
        for j in range(len(c.logprob_dicts), len(req.output_logprobs)):
            e = req.output_logprobs[j]
            c.logprob_dicts.append(self._logprob_dict(req.output_token_ids[j], e))
            c.cumulative_logprob += e.logprob

    def _prompt_logprobs(self, state: ParentState, delta: bool, finished: bool) -> PromptLogprobs | None:
        if state.params.prompt_logprobs is None:
            return None
        ids, first = state.prompt_token_ids, state.children[0].req
        # Complete once the whole prompt is computed; an abort mid-prefill ends with a part.
        if state.prompt_logprobs is None and (finished or len(first.prompt_logprobs) == len(ids) - 1):
            state.prompt_logprobs = [None] + [
                self._logprob_dict(ids[j + 1], e) for j, e in enumerate(first.prompt_logprobs)
            ]
        if delta and state.prompt_logprobs_sent:
            return None
        state.prompt_logprobs_sent = state.prompt_logprobs is not None
        return state.prompt_logprobs

    def _logprob_dict(self, token_id: int, e: TokenLogprobs) -> dict[int, Logprob]:
        d = {token_id: Logprob(e.logprob, e.rank, self._text(token_id))}
        for rank, (tid, lp) in enumerate(zip(e.top_ids, e.top_logprobs), start=1):
            if tid not in d:
                d[tid] = Logprob(lp, rank, self._text(tid))
        return d

    def _text(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else detokenize_one(self.tokenizer, token_id)


def _error_of(state: ParentState) -> NonFiniteError | None:
    bad = [i for i, c in enumerate(state.children) if c.req.status == RequestStatus.FINISHED_ERROR]
    if not bad:
        return None
    return NonFiniteError(
        f"request {state.request_id!r}: the logits of sample(s) {bad} turned NaN or inf during generation "
        "(finish_reason 'error'; their last token was dropped); the model's weights or inputs hold non-finite values",
        (state.request_id,),
    )
