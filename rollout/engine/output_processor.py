"""OutputProcessor: detokenizes, applies stop strings and builds RequestOutputs.

A prompt with ``n`` samples is one parent with ``n`` child requests; its RequestOutput is
emitted when every child has finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rollout.engine.detokenizer import IncrementalDetokenizer, detokenize_one
from rollout.engine.request import Request, TokenLogprobs
from rollout.outputs import CompletionOutput, Logprob, RequestOutput
from rollout.sampling_params import SamplingParams


@dataclass
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[Request]
    detokenizers: list[IncrementalDetokenizer | None]
    weight_version: int
    stop_strings: dict[str, str] = field(default_factory=dict)  # child req_id -> matched stop


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}
        self._parent_of: dict[str, ParentState] = {}

    def add(self, request_id: str, prompt: str | None, children: list[Request], weight_version: int = 0) -> None:
        params = children[0].sampling_params
        dets = [
            IncrementalDetokenizer(
                self.tokenizer, c.prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
            )
            if self.tokenizer is not None and params.detokenize
            else None
            for c in children
        ]
        state = ParentState(request_id, prompt, children[0].prompt_token_ids, params, children, dets, weight_version)
        self.parents[request_id] = state
        for c in children:
            self._parent_of[c.req_id] = state

    def parent_of(self, req_id: str) -> ParentState | None:
        return self._parent_of.get(req_id)

    def detokenize(self, req: Request) -> str | None:
        """Feed the request's newest token; returns a matched stop string, if any."""
        state = self._parent_of[req.req_id]
        det = state.detokenizers[state.children.index(req)]
        if det is None:
            return None
        check = req.num_output_tokens >= req.sampling_params.min_tokens
        matched = det.update(req.output_token_ids[-1:], check_stop=check)
        if matched is not None:
            state.stop_strings[req.req_id] = matched
        return matched

    def pop_finished(self, request_id: str) -> RequestOutput | None:
        """The final output of a parent whose children have all finished (and forget it)."""
        state = self.parents.get(request_id)
        if state is None or not all(c.is_finished for c in state.children):
            return None
        del self.parents[request_id]
        for c in state.children:
            del self._parent_of[c.req_id]
        return self._build(state)

    def _build(self, state: ParentState) -> RequestOutput:
        outputs = []
        want_lp = state.params.logprobs is not None
        for i, (req, det) in enumerate(zip(state.children, state.detokenizers)):
            stop = state.stop_strings.get(req.req_id)
            finish = "stop" if stop is not None else req.status.finish_reason
            out = CompletionOutput(
                index=i,
                text=det.output_text if det is not None else "",
                token_ids=list(req.output_token_ids),
                finish_reason=finish,
                stop_reason=stop if stop is not None else req.stop_reason,
            )
            if want_lp:
                out.token_logprobs = [e.logprob for e in req.output_logprobs]
                out.logprobs = [
                    self._logprob_dict(tok, e) for tok, e in zip(req.output_token_ids, req.output_logprobs)
                ]
                out.cumulative_logprob = float(sum(out.token_logprobs))
            outputs.append(out)
        first = state.children[0]
        prompt_lp = None
        if state.params.prompt_logprobs is not None:
            ids = state.prompt_token_ids
            prompt_lp = [None] + [self._logprob_dict(ids[j + 1], e) for j, e in enumerate(first.prompt_logprobs)]
        return RequestOutput(
            request_id=state.request_id, prompt=state.prompt, prompt_token_ids=list(state.prompt_token_ids),
            outputs=outputs, finished=True, prompt_logprobs=prompt_lp, num_cached_tokens=first.num_cached_tokens,
            weight_version=state.weight_version,
        )

    def _logprob_dict(self, token_id: int, e: TokenLogprobs) -> dict[int, Logprob]:
        d = {token_id: Logprob(e.logprob, e.rank, self._text(token_id))}
        for rank, (tid, lp) in enumerate(zip(e.top_ids, e.top_logprobs), start=1):
            if tid not in d:
                d[tid] = Logprob(lp, rank, self._text(tid))
        return d

    def _text(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else detokenize_one(self.tokenizer, token_id)
