"""SamplingParams: vLLM's field names and meanings, validated on construction."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from rollout.errors import InvalidRequestError, UnsupportedFeatureError

# Temperatures below this are greedy (argmax, untempered logprobs); the sampler uses it too.
GREEDY_EPS = 1e-5
# Bound on top-logprobs per step: each one costs a dict entry per generated token.
MAX_LOGPROBS = 20
# Bound on samples per prompt: each is a request with its own state, created at submission.
# Far above RL group sizes (8-512); a larger n is a typo, not a workload.
MAX_N = 4096
# Which distribution ``logprobs`` are reported under (see SamplingParams).
LOGPROBS_MODES = ("processed", "scaled", "raw")
# vLLM's presence/frequency penalty bounds (OpenAI's API).
MAX_ABS_PENALTY = 2.0


@dataclass
class StructuredOutputsParams:
    """vLLM's structured-output constraints (``json``, ``regex``, ``choice``, ``grammar``).
    Importable so that code building them runs; a ``SamplingParams`` that carries one is
    refused with ``UnsupportedFeatureError``: rollout does not constrain decoding yet."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None


class RequestOutputKind(enum.IntEnum):
    """What ``LLM.step()`` (and ``generate_stream``) emits for a request, as in vLLM.

    CUMULATIVE: each step a request advanced in, everything generated so far.
    DELTA: each step a request advanced in, only what is new since its previous output.
    FINAL_ONLY: one output, when the request has finished (what ``generate`` uses).
    """

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    """How to sample one prompt's completions.

    Field names and meanings follow vLLM. ``n`` is at most ``MAX_N`` (4096). ``temperature=0``
    is greedy. ``top_k`` 0, -1 or None disables top-k, else at most the model's vocabulary (checked
    on submission, where the model is known). ``max_tokens=None`` generates until a stop condition or the model length.

    ``logprobs=k`` returns, per generated token, the sampled token's logprob plus the ``k``
    most likely tokens (``k=0``: the sampled token only) and fills
    ``CompletionOutput.token_logprobs``. These are fp32 log-probabilities under the
    distribution actually sampled from: after temperature, min-p, top-k and top-p, in that
    order, with banned tokens (stop tokens before ``min_tokens``) removed. Greedy requests
    report the untempered distribution after the same filters.

    ``logprobs_mode`` picks that distribution: "processed" (the default, as above: what was
    actually sampled from), "scaled" (temperature only: the logits divided by the
    temperature, no filters or banned tokens; greedy rows untempered) or "raw" (the model's
    log-softmax). The token itself is always drawn from the processed distribution; the
    mode changes only the reported logprobs, ranks and top-k.

    ``prompt_logprobs=k`` returns, per prompt token after the first, the model's raw
    log-softmax (no temperature or filters) of that token and the ``k`` most likely ones;
    such a prompt is always recomputed rather than read from the prefix cache.

    ``output_kind`` (a ``RequestOutputKind`` or its name) says what the request-level API
    streams: cumulative snapshots (default), deltas, or the final output only.

    Penalties, as in vLLM, act on the logits before temperature: ``repetition_penalty``
    (> 0, 1 = off) divides positive and multiplies negative logits of every token seen in the
    prompt or the output so far; ``presence_penalty`` (in [-2, 2]) is subtracted once from
    the logit of every token generated so far, ``frequency_penalty`` (in [-2, 2]) once per
    time it was generated. They change the distribution sampled from, so they count in the
    "processed" logprobs (not in "scaled" or "raw").

    ``return_sampling_mask=True`` fills ``CompletionOutput.sampling_masks``: per generated
    token a ``SamplingMask`` (``rollout.outputs``) telling which tokens the truncation
    (temperature, min-p, top-k, top-p, banned tokens) kept, so a trainer can apply the same
    truncation to its own logits (truncation replay) instead of the full softmax. It is
    refused with penalties: the mask is stated over the temperature-scaled logits, and
    penalties change which tokens survive in a way a trainer would have to replay too.

    ``return_routed_experts=True`` (MoE models only; refused on submission for a model
    without MoE layers) fills ``CompletionOutput.routed_experts`` (per generated token, the
    experts ``[moe_layer][k]`` of the position that sampled it) and
    ``RequestOutput.prompt_routed_experts`` (per prompt position): routing replay, so a
    trainer's forward can send each token to the experts the engine used.

    ``logprobs_mode=None`` (the default) takes the engine's: ``LLM(logprobs_mode=...)``,
    "processed" unless set there. ``structured_outputs`` is accepted as a name only:
    anything but None raises ``UnsupportedFeatureError``.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True
    include_stop_str_in_output: bool = False
    logprobs_mode: str | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    return_sampling_mask: bool = False
    return_routed_experts: bool = False
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.output_kind, str) and self.output_kind.upper() in RequestOutputKind.__members__:
            self.output_kind = RequestOutputKind[self.output_kind.upper()]
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k is None or (_is_int(self.top_k) and self.top_k == -1):  # vLLM's "off" values
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Raise InvalidRequestError for the first invalid field (run again on submission,
        since a dataclass can be changed after construction)."""

        def bad(name: str, allowed: str) -> InvalidRequestError:
            return InvalidRequestError(f"SamplingParams.{name}", getattr(self, name), allowed)

        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise bad("n", f"an int in [1, {MAX_N}]")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a finite float >= 0 (0 is greedy)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a float in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "an int >= 1, or 0 / -1 to disable")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "a float in [0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**63):
            raise bad("seed", "None or a 64-bit int")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "None or an int >= 1")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "an int >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"an int <= max_tokens={self.max_tokens}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "None, a non-empty str or a list of non-empty str")
        if not isinstance(self.stop_token_ids, list) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of token ids (ints >= 0)")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise bad(name, f"None or an int in [0, {MAX_LOGPROBS}]")
        for name in ("ignore_eos", "skip_special_tokens", "detokenize", "include_stop_str_in_output",
                     "return_sampling_mask", "return_routed_experts"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")
        if self.stop and not self.detokenize:
            raise bad("stop", "empty when detokenize=False (stop strings need text)")
        if self.logprobs_mode is not None and self.logprobs_mode not in LOGPROBS_MODES:
            raise bad("logprobs_mode", f"None (the engine's) or one of {LOGPROBS_MODES}")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a finite float > 0 (1.0: off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_real(getattr(self, name)) or abs(getattr(self, name)) > MAX_ABS_PENALTY:
                raise bad(name, f"a float in [-{MAX_ABS_PENALTY}, {MAX_ABS_PENALTY}] (0.0: off)")
        if self.return_sampling_mask and self.has_penalties:
            raise InvalidRequestError(
                "SamplingParams.return_sampling_mask", True,
                "False while repetition_penalty, presence_penalty or frequency_penalty is set",
                "a sampling mask is stated over the temperature-scaled logits; penalties change which tokens "
                "survive in a way a trainer would have to replay too",
            )
        if self.structured_outputs is not None:
            raise UnsupportedFeatureError(
                f"SamplingParams.structured_outputs={self.structured_outputs!r}: rollout does not constrain "
                "decoding yet (structured outputs are not supported); leave it None"
            )
        if not isinstance(self.output_kind, RequestOutputKind):
            raise bad("output_kind", f"a RequestOutputKind or one of {tuple(k.name.lower() for k in RequestOutputKind)}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def for_sample(self, index: int) -> SamplingParams:
        """The params of the ``index``-th of ``n`` samples: n=1 and, if seeded, seed + index."""
        from dataclasses import replace

        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
