"""Prompt normalisation and validation: everything is checked before any request starts."""

from __future__ import annotations

import dataclasses

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rollout.engine.routes import RouteShape
from rollout.errors import InvalidRequestError
from rollout.sampling_params import SamplingParams

_PROMPT_FORMS = (
    "a str, a list of str, a list of token ids, a list of token-id lists, "
    "or dicts {'prompt_token_ids': [...]} / {'prompt': str}"
)


@dataclass(frozen=True)
class ProcessedPrompt:
    prompt: str | None
    token_ids: list[int]


def _is_token_list(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def split_prompts(prompts: Any) -> list[Any]:
    """One entry per prompt, whatever form the batch came in."""
    if isinstance(prompts, (str, dict)) or _is_token_list(prompts):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise InvalidRequestError("prompts", prompts, _PROMPT_FORMS)
    if len(prompts) == 0:
        raise InvalidRequestError("prompts", prompts, f"a non-empty batch: {_PROMPT_FORMS}")
    if any(isinstance(x, (int, float)) for x in prompts):  # meant as one token-id list
        raise InvalidRequestError("prompts", prompts, f"token ids as ints only (no floats or bools); or {_PROMPT_FORMS}")
    if any(isinstance(x, str) for x in prompts) and any(isinstance(x, (list, tuple)) for x in prompts):
        raise InvalidRequestError(
            "prompts", prompts, "a batch of one form: all str or all token-id lists (dicts may mix)"
        )
    return list(prompts)


class InputProcessor:
    def __init__(
        self, tokenizer: Any | None, vocab_size: int, max_model_len: int, max_prompt_tokens: int,
        logprobs_mode: str = "processed", routes: RouteShape | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        # The model's routed experts (None: no MoE layers, so none to return or replay).
        self.routes = routes
        # What a SamplingParams with logprobs_mode=None reports (LLM(logprobs_mode=...)).
        self.logprobs_mode = logprobs_mode
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        # The KV cache must hold a whole prompt (plus the first sampled token's slot).
        self.max_prompt_tokens = max_prompt_tokens

    def process(self, prompt: Any, index: int = 0) -> ProcessedPrompt:
        field = f"prompts[{index}]"
        text: str | None = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                text = prompt.get("prompt")
                if text is not None and not isinstance(text, str):
                    raise InvalidRequestError(f"{field}['prompt']", text, "None or a str (the prompt's text)")
            elif "prompt" in prompt:
                text = prompt["prompt"]
                ids = self._tokenize(text, field)
            else:
                raise InvalidRequestError(field, prompt, "a dict with 'prompt_token_ids' or 'prompt'")
        elif isinstance(prompt, str):
            text = prompt
            ids = self._tokenize(prompt, field)
        else:
            ids = prompt
        if isinstance(ids, (list, tuple)) and len(ids) == 0:
            raise InvalidRequestError(field, prompt, "a non-empty prompt")
        if not _is_token_list(ids):
            raise InvalidRequestError(field, prompt, _PROMPT_FORMS)
        self._check_vocab(field, ids)
        n = len(ids)
        if n >= self.max_model_len:
            raise InvalidRequestError(
                field, f"<{n} tokens>", f"at most {self.max_model_len - 1} tokens (max_model_len={self.max_model_len}"
                " leaves room for one generated token)",
            )
        if n > self.max_prompt_tokens:
            raise InvalidRequestError(
                field, f"<{n} tokens>", f"at most {self.max_prompt_tokens} tokens, what the KV cache can hold"
            )
        return ProcessedPrompt(text, list(ids))

    def process_score(self, sequences: Any, prompt_lens: Any, temperature: Any) -> list[tuple[list[int], int]]:
        """Validate ``LLM.score``'s arguments; returns (token ids, first position scored) per
        sequence. A sequence may fill the whole model length: nothing is generated after it."""
        forms = "a non-empty list of token-id lists (one sequence is [[...]])"
        if not isinstance(sequences, (list, tuple)) or not sequences or _is_token_list(sequences):
            raise InvalidRequestError("sequences", sequences, forms)
        if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
                and math.isfinite(temperature) and temperature > 0):
            raise InvalidRequestError("temperature", temperature, "a finite float > 0 (1: the model's log-softmax)")
        if prompt_lens is None:
            prompt_lens = [1] * len(sequences)
        elif not isinstance(prompt_lens, (list, tuple)) or len(prompt_lens) != len(sequences):
            raise InvalidRequestError("prompt_lens", prompt_lens, f"None or {len(sequences)} ints (one per sequence)")
        limit = min(self.max_model_len, self.max_prompt_tokens)
        out = []
        for i, (seq, start) in enumerate(zip(sequences, prompt_lens)):
            field = f"sequences[{i}]"
            if not _is_token_list(seq):
                raise InvalidRequestError(field, seq, "a non-empty list of token ids")
            self._check_vocab(field, seq)
            if len(seq) > limit:
                raise InvalidRequestError(
                    field, f"<{len(seq)} tokens>", f"at most {limit} tokens (max_model_len={self.max_model_len}"
                    f" and what the KV cache can hold)",
                )
            if not (isinstance(start, int) and not isinstance(start, bool) and 1 <= start <= len(seq)):
                raise InvalidRequestError(f"prompt_lens[{i}]", start, f"an int in [1, {len(seq)}] (the sequence's length)")
            out.append((list(seq), start))
        return out

    def _check_vocab(self, field: str, ids: Sequence[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                field, bad[:5], f"token ids in [0, {self.vocab_size})", f"{len(bad)} out-of-range id(s)"
            )

    def resolve(self, params: SamplingParams) -> SamplingParams:
        """``params`` checked against this model (``check_params``) with the engine's
        defaults filled in: the same object when nothing was left to the engine."""
        self.check_params(params)
        if params.logprobs_mode is None:
            params = dataclasses.replace(params, logprobs_mode=self.logprobs_mode)
        return params

    def check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: token ids must exist in this model, and
        top-k cannot keep more tokens than it has."""
        if params.top_k > self.vocab_size:
            raise InvalidRequestError(
                "SamplingParams.top_k", params.top_k, f"an int in [1, {self.vocab_size}] (the vocabulary), or 0 / -1 to disable"
            )
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise InvalidRequestError("SamplingParams.stop_token_ids", bad, f"token ids in [0, {self.vocab_size})")
        if params.return_routed_experts and self.routes is None:
            raise InvalidRequestError(
                "SamplingParams.return_routed_experts", True, "False for this model", "it has no MoE layers to route"
            )

    def process_routes(self, routed_experts: Any, checked: list[tuple[list[int], int]]) -> list[torch.Tensor | None]:
        """``LLM.score``'s ``routed_experts``: None, or one entry per sequence, each None (its
        router decides) or the experts of its positions ``[position][moe_layer][k]``: one per
        position but the last (``prompt_routed_experts + routed_experts[1:]`` of a
        generation), or one per position; k distinct ids in [0, num_experts) a position.
        Returns int64 tensors [positions, moe_layer, k]."""
        if routed_experts is None:
            return [None] * len(checked)
        if self.routes is None:
            raise InvalidRequestError("routed_experts", "<routes>", "None for this model", "it has no MoE layers to route")
        if not isinstance(routed_experts, (list, tuple)) or len(routed_experts) != len(checked):
            raise InvalidRequestError(
                "routed_experts", "<routes>", f"None or {len(checked)} entries (one per sequence)",
            )
        shape = self.routes
        out: list[torch.Tensor | None] = []
        for i, (r, (ids, _)) in enumerate(zip(routed_experts, checked)):
            field = f"routed_experts[{i}]"
            if r is None:
                out.append(None)
                continue
            want = f"[{len(ids) - 1} or {len(ids)}][{shape.num_moe_layers}][{shape.top_k}] expert ids"
            try:
                t = torch.as_tensor(r)
            except (TypeError, ValueError, RuntimeError) as e:
                raise InvalidRequestError(field, "<routes>", want, str(e)) from None
            if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
                raise InvalidRequestError(field, f"<{t.dtype} routes>", want + " (integers)")
            if t.dim() != 3 or t.shape[0] not in (len(ids) - 1, len(ids)) or tuple(t.shape[1:]) != (
                shape.num_moe_layers, shape.top_k,
            ):
                raise InvalidRequestError(field, f"<routes of shape {list(t.shape)}>", want)
            t = t.to(torch.int64, copy=True)  # ours: a caller changing theirs later changes nothing
            if t.numel() and (t.min() < 0 or t.max() >= shape.num_experts):
                raise InvalidRequestError(field, "<routes>", f"expert ids in [0, {shape.num_experts})")
            if shape.top_k > 1 and bool((t.sort(-1).values.diff(dim=-1) == 0).any()):
                raise InvalidRequestError(field, "<routes>", f"{shape.top_k} distinct experts per position and layer")
            out.append(t)
        return out

    def _tokenize(self, text: Any, field: str) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequestError(field, text, "a str")
        if text == "":
            raise InvalidRequestError(field, text, "a non-empty prompt")
        if self.tokenizer is None:
            raise InvalidRequestError(field, text, "token ids: this engine has no tokenizer (pass tokenizer=)")
        return list(self.tokenizer(text).input_ids)


def expand_params(params: SamplingParams | Sequence[SamplingParams] | None, num_prompts: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * num_prompts
    if isinstance(params, SamplingParams):
        params.validate()  # again: fields may have been changed since construction
        return [params] * num_prompts
    if isinstance(params, (list, tuple)) and all(isinstance(p, SamplingParams) for p in params):
        if len(params) != num_prompts:
            raise InvalidRequestError(
                "sampling_params", f"<{len(params)} SamplingParams>", f"one SamplingParams or exactly {num_prompts} (one per prompt)"
            )
        for p in params:
            p.validate()
        return list(params)
    raise InvalidRequestError("sampling_params", params, "None, a SamplingParams, or a list of them (one per prompt)")
