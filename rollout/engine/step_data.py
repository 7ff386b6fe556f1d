"""What travels through one step of the model runner, typed: the inputs it builds on the
host and on the device, the handle of a launched step, and what it hands back to the engine.
(What the scheduler hands the runner is ``scheduler.SchedulerOutput``.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rollout.engine.request import TokenLogprobs
from rollout.engine.routes import RouteChunk
from rollout.models.backends import AttentionMetadata
from rollout.outputs import SamplingMask


@dataclass
class HostInputs:
    """A step's inputs built on the host."""

    # Tensors the device needs, by name, staged in one copy (``Staging.send``).
    send: dict[str, torch.Tensor]
    any_from_last: bool  # some input token is the previous step's sample, still in flight
    positions_cpu: torch.Tensor  # [num_tokens] int64
    cu_cpu: torch.Tensor  # [num_reqs + 1] int64, cumulative scheduled tokens
    seq_lens_cpu: torch.Tensor  # [num_reqs] int64
    max_query_len: int
    max_seq_len: int


@dataclass
class StepInputs:
    """A step's inputs on the device, ready for the forward."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    logits_indices: torch.Tensor  # [num_reqs] int64: the last position of each request
    attn: AttentionMetadata
    positions_cpu: torch.Tensor  # host mirrors, for prompt logprobs
    cu_cpu: torch.Tensor


@dataclass
class PromptLogprobsChunk:
    """Prompt logprobs a step's chunk of one request computed."""

    start: int  # the first prompt position covered
    entries: list[TokenLogprobs]


@dataclass
class SampledCopies:
    """Host copies (in flight until the step is done) of what the sampler returned."""

    token_ids: torch.Tensor  # [num_reqs] int64
    logprobs: torch.Tensor  # [num_reqs] fp32, always: non-finite ones flag bad logits
    ranks: torch.Tensor | None  # [num_reqs] int64; None unless a row asked for logprobs
    topk_ids: torch.Tensor | None  # [num_reqs, k] int64
    topk_logprobs: torch.Tensor | None  # [num_reqs, k] fp32
    # Sampling masks of StepHandle.mask_rows (None when no row asked): kept count, smallest
    # kept logit, the top ids.
    mask_num_kept: torch.Tensor | None = None  # [m] int64
    mask_min_kept: torch.Tensor | None = None  # [m] fp32
    mask_top_ids: torch.Tensor | None = None  # [m, min(MAX_KEPT_IDS, vocab)] int64
    # Routed experts of StepHandle.route_rows (None when no row records them).
    routes: torch.Tensor | None = None  # [num_copied, num_moe_layers, k] int32


@dataclass
class StepHandle:
    """A launched step: what ``ModelRunner.finish`` needs to read it back."""

    req_ids: list[str]
    sampled: SampledCopies
    done: Any  # Platform.record_step_done marker
    want_logprobs: bool
    num_logprobs: list[int | None]  # per row, its request's SamplingParams.logprobs
    prompt_logprobs: dict[str, PromptLogprobsChunk]
    done_idx: torch.Tensor  # [num_done] rows of this step that keep their sample
    done_rows: torch.Tensor  # [num_done] their req_idx
    done_pos: torch.Tensor  # [num_done] the position their token takes
    done_gens: torch.Tensor  # [num_done] InputBatch.row_gen_cpu at launch
    mask_rows: list[int] = field(default_factory=list)  # rows of this step with a sampling mask
    # Rows of this step recording routes: routes.RoutePlan.rows.
    route_rows: list[tuple[int, int, int, bool, bool]] = field(default_factory=list)


@dataclass
class ModelRunnerOutput:
    """What a step hands back to the engine, per request in execution order."""

    req_ids: list[str]
    sampled_token_ids: list[int]
    # Per request (same order), when that request asked for logprobs.
    logprobs: list[TokenLogprobs | None]
    prompt_logprobs: dict[str, PromptLogprobsChunk] = field(default_factory=dict)
    # Requests whose kept sample has a NaN/inf logprob: their logits were not finite.
    nonfinite_req_ids: list[str] = field(default_factory=list)
    # Per request (same order), when that request asked for sampling masks (else None).
    sampling_masks: list[SamplingMask | None] = field(default_factory=list)
    # Per request (same order), when that request records routed experts (else None).
    routed_experts: list[RouteChunk | None] = field(default_factory=list)
