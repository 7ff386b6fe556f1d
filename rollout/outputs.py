"""Public output types, shaped like vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One entry of a per-step logprobs dict: fp32 logprob, 1-based rank, decoded text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# SamplingMask.kept_token_ids is given up to this many kept tokens (else None).
MAX_KEPT_IDS = 64


@dataclass(frozen=True)
class SamplingMask:
    """Which tokens one generated token was sampled among (``SamplingParams.return_sampling_mask``).

    ``num_kept``: the tokens left after temperature, min-p, top-k, top-p and banned tokens
    (stop tokens before ``min_tokens``). ``min_kept_logit``: the smallest fp32
    temperature-scaled logit (``logits.float() / temperature``) among them.
    ``kept_token_ids``: those tokens, most likely first, when ``num_kept <= MAX_KEPT_IDS``
    (64), else None.

    A trainer replays the truncation on its own logits of that position, scaled by the same
    temperature: keep exactly ``kept_token_ids`` when given, else every token whose scaled
    logit is ``>= min_kept_logit``, and set the rest to ``-inf`` before the softmax. The
    threshold set equals the engine's except (a) for exact ties at top-p's boundary, where
    the engine kept only some of the tied tokens (the threshold set is then larger than
    ``num_kept``, which tells), and (b) for banned stop tokens (``min_tokens``) scoring
    above the threshold, which the trainer removes itself. The logits must be the engine's
    for the threshold to mean the same; in exact mode (``LLM(batch_invariant=True)``) they
    are bitwise, and ``trainers_integration.exact.ExactForward.token_logprobs(...,
    sampling_masks=...)`` does all of this.

    A greedy row (``temperature=0``) was sampled from its maximum: ``num_kept`` is 1 (more
    on an exact tie), ``min_kept_logit`` the untempered maximal logit.
    """

    num_kept: int
    min_kept_logit: float
    kept_token_ids: list[int] | None


# Per generated (or prompt) position: token id -> Logprob.
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    """One of a prompt's ``n`` samples.

    ``token_logprobs[i]`` is the logprob of ``token_ids[i]`` under the distribution it was
    sampled from (after temperature, min-p, top-k, top-p), in fp32: what an RL trainer uses
    as the old policy. It is filled whenever ``SamplingParams.logprobs`` is not None;
    ``logprobs`` then holds vLLM's per-step dicts (the sampled token plus the top k).
    ``SamplingParams.logprobs_mode`` can report them under the temperature-scaled or the
    raw model distribution instead.

    ``token_weight_versions[i]`` is the ``LLM.weight_version`` that sampled ``token_ids[i]``:
    a request that lived through ``pause()``/``update_weights()``/``resume()`` carries
    tokens of two versions, which off-policy trainers can correct for.

    ``sampling_masks[i]`` (when ``SamplingParams.return_sampling_mask``) says which tokens
    ``token_ids[i]`` was sampled among: what a trainer needs to apply the same top-k /
    top-p / min-p truncation to its own logits (see ``SamplingMask``).

    ``routed_experts[i]`` (when ``SamplingParams.return_routed_experts``, MoE models) is
    ``[moe_layer][k]``: the experts of the position that sampled ``token_ids[i]`` (the one
    before it), so ``routed_experts[0]`` is the prompt's last position's
    (``RequestOutput.prompt_routed_experts[-1]``). The routes of a whole sequence, one per
    position but the last, are ``prompt_routed_experts + routed_experts[1:]``: what
    ``LLM.score(..., routed_experts=...)`` and a trainer's routing replay take.

    In a streamed output (``RequestOutputKind.DELTA``) the lists hold only the new tokens,
    ``text`` only the new text, and ``cumulative_logprob`` still sums all tokens so far.
    """

    index: int
    text: str
    token_ids: list[int]
    logprobs: SampleLogprobs | None = None
    token_logprobs: list[float] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" (NaN/inf logits)
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    cumulative_logprob: float | None = None
    token_weight_versions: list[int] = field(default_factory=list)
    sampling_masks: list[SamplingMask] | None = None
    routed_experts: list[list[list[int]]] | None = None  # [token][moe_layer][k]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """All samples of one prompt, in prompt order within ``LLM.generate``'s result.

    From ``LLM.step()`` and ``generate_stream`` a request yields one output per step in
    which any of its samples advanced (a snapshot or a delta, see ``RequestOutputKind``);
    the last one has ``finished=True``. ``weight_version`` is the version at submission;
    per-token versions are in ``CompletionOutput.token_weight_versions``. ``error`` is set
    when a sample's logits turned non-finite (see ``rollout.errors.NonFiniteError``).

    ``prompt_routed_experts`` (``SamplingParams.return_routed_experts``): per prompt position
    the experts ``[moe_layer][k]`` its KV was computed with (the first sample's; positions
    served by the prefix cache carry the routes stored with those blocks). Set once the
    whole prompt is computed (a DELTA stream carries it once).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache (first sample)
    weight_version: int = 0  # LLM.weight_version when the request was submitted
    # Set on the final output when a sample ended with finish_reason "error" (a
    # rollout.errors.NonFiniteError naming them); streams and generate raise it.
    error: Exception | None = None
    prompt_routed_experts: list[list[list[int]]] | None = None  # [prompt_token][moe_layer][k]


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's counters and sizes (``LLM.stats()``)."""

    num_steps: int  # steps read back since the engine was built
    num_generated_tokens: int  # tokens handed to requests (prompts excluded)
    num_preemptions: int  # requests sent back to recompute for want of KV blocks
    num_running: int  # requests holding KV blocks now
    num_waiting: int  # requests queued (new or preempted)
    num_kv_blocks: int
    num_free_blocks: int  # free + cached + used == num_kv_blocks
    num_cached_blocks: int  # free but holding a cached prefix
    num_used_blocks: int  # held by a request
    kv_capacity_tokens: int
    prefix_cache_queries: int  # lookups that found at least one cached block
    prefix_cache_hit_blocks: int  # blocks served by the prefix cache
    weight_version: int
    attention_backend: str  # the platform's choice: "torch", "torch_sdpa", "triton"
    op_set: str  # RMSNorm/rotary/SiLU implementation: "torch" or "triton"
    cuda_graph_sizes: tuple[int, ...]  # batch sizes captured for decode; () when eager
