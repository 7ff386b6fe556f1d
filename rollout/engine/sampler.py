"""Sampler: logits of the last position of each request -> one token per request.

Processing order (see ``SamplingParams``): penalties (repetition, presence, frequency),
banned tokens, temperature, min-p, top-k, top-p. Every mask writes ``-inf`` into fp32
logits; the "processed distribution" is the softmax of what is left, and returned logprobs
come from its log-softmax, unless a row's ``logprobs_mode`` asks for the temperature-scaled
or raw distribution instead (the token is still drawn from the processed one).

Penalties count in the processed distribution only: "scaled" and "raw" are computed from
the model's logits as they came in (the caller's tensor is never changed), so they carry no
penalty, as vLLM's ``raw_*`` modes and as ``SamplingParams`` documents. The penalties need
each row's token history; ``PenaltyMetadata`` points at the device tables that hold it
(``engine.penalties.PenaltyState``) and the op set's ``apply_penalties`` applies them.

Rows that ask for a sampling mask (``SamplingParams.return_sampling_mask``) get, from the
processed logits, their kept-token count, smallest kept logit and top ``MAX_KEPT_IDS``
ids (a greedy row: its maximal logits only), all on the device: what the trainer needs to
replay the truncation (``rollout.outputs.SamplingMask``).

Random rows sample with the exponential race ``argmax(probs / q)``, ``q ~ Exp(1)``
(equivalent to Gumbel-max). A seeded row draws its ``q`` from its own generator only, so
its samples do not depend on the rest of the batch; the global RNG is never used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rollout.kernels.penalties import apply_penalties_ref
from rollout.outputs import MAX_KEPT_IDS
from rollout.sampling_params import GREEDY_EPS as _GREEDY_EPS

# SamplingParams.logprobs_mode -> the id SamplingMetadata.logprobs_mode carries.
LOGPROBS_MODE_IDS = {"processed": 0, "scaled": 1, "raw": 2}


@dataclass
class PenaltyMetadata:
    """The rows of a step that have penalties (only those: the others cost nothing)."""

    idx: torch.Tensor  # [m] int64: rows of this step's logits
    rows: torch.Tensor  # [m] int64: their req_idx in the history tables
    kept: torch.Tensor  # [m] int64: 1 where the row keeps its sample (a prefill chunk's: 0)
    values: torch.Tensor  # [3, m] fp32: repetition, presence, frequency penalty
    output_counts: torch.Tensor  # [max_num_seqs, vocab] int32: output occurrences so far
    prompt_mask: torch.Tensor  # [max_num_seqs, vocab] bool: occurs in the prompt


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [num_reqs] fp32; 0.0 for greedy rows
    top_k: torch.Tensor | None  # [num_reqs] int64; 0 disables the row; None: no row uses it
    top_p: torch.Tensor | None  # [num_reqs] fp32; 1.0 disables the row; None: no row uses it
    min_p: torch.Tensor | None  # [num_reqs] fp32; 0.0 disables the row; None: no row uses it
    generators: dict[int, torch.Generator]  # req_idx -> that request's own generator
    default_generator: torch.Generator | None  # for random rows not in ``generators``
    all_greedy: bool  # every row greedy: no noise drawn
    max_num_logprobs: int | None  # k top logprobs returned for every row (None: none)
    banned_token_ids: dict[int, list[int]]  # req_idx -> token ids forbidden this step
    # [num_reqs] int64, LOGPROBS_MODE_IDS of each row's logprobs_mode; None: all "processed".
    logprobs_mode: torch.Tensor | None = None
    # A fresh seed per step for noise the fused kernel may draw itself (Philox), used when
    # no row has its own generator; None: noise always comes from the generators.
    noise_seed: int | None = None
    # The step's penalised rows; None: no row of the step has penalties.
    penalties: PenaltyMetadata | None = None
    # [m] int64: the rows that asked for a sampling mask; None: no row did (nothing computed).
    mask_rows: torch.Tensor | None = None


@dataclass
class MaskTensors:
    """The sampling masks of ``SamplingMetadata.mask_rows``, on the device."""

    num_kept: torch.Tensor  # [m] int64: finite processed logits
    min_kept: torch.Tensor  # [m] fp32: the smallest of them
    top_ids: torch.Tensor  # [m, min(MAX_KEPT_IDS, vocab)] int64, most likely first


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [num_reqs] int64
    sampled_logprobs: torch.Tensor  # [num_reqs] fp32, under each row's logprobs_mode
    sampled_ranks: torch.Tensor | None  # [num_reqs] int64, 1 = most likely; None: not asked for
    topk_token_ids: torch.Tensor | None  # [num_reqs, k] int64, most likely first
    topk_logprobs: torch.Tensor | None  # [num_reqs, k] fp32; -inf entries are masked tokens
    masks: MaskTensors | None = None  # for SamplingMetadata.mask_rows; None when no row asked


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Logprob and 1-based rank of ``token_ids`` in ``logprobs`` [N, vocab], plus the top ``k``.

    The rank counts strictly more likely tokens, so a token tied for first has rank 1.
    """
    token_logprobs = logprobs.gather(-1, token_ids[:, None]).squeeze(-1)  # [N]
    ranks = (logprobs > token_logprobs[:, None]).sum(-1) + 1  # [N] int64
    if k == 0:
        return token_logprobs, ranks, None, None
    topk_logprobs, topk_ids = logprobs.topk(k, dim=-1)  # [N, k] each
    return token_logprobs, ranks, topk_ids, topk_logprobs


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor | None) -> torch.Tensor:
    """Mask tokens whose prob is below ``min_p`` times the row's top prob."""
    if min_p is None:
        return logits
    probs = logits.softmax(-1)  # [num_reqs, vocab]
    threshold = probs.amax(-1, keepdim=True) * min_p[:, None]  # [num_reqs, 1]; 0 keeps all
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Keep each row's ``top_k`` largest logits (ties kept), then its top-``top_p`` nucleus."""
    if top_p is None:
        return logits if top_k is None else _apply_top_k_only(logits, top_k)
    vocab = logits.shape[-1]
    sorted_logits, sorted_ids = logits.sort(dim=-1)  # [num_reqs, vocab] ascending
    if top_k is not None:
        k = top_k.clamp(max=vocab)
        # Disabled rows (k = 0) compare against their smallest logit, which masks nothing.
        kth_pos = torch.where(k > 0, vocab - k, 0)  # [num_reqs]
        kth = sorted_logits.gather(-1, kth_pos[:, None])  # [num_reqs, 1]
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    cum_probs = sorted_logits.softmax(-1).cumsum(-1)  # [num_reqs, vocab]
    # A token is dropped when the strictly more likely tokens already reach top_p.
    drop = cum_probs <= 1 - top_p[:, None]
    drop[:, -1] = False  # the most likely token always stays
    # Rows with top_p = 1 stay untouched even where fp32 probs underflow to 0.
    drop &= (top_p < 1)[:, None]
    sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_ids, sorted_logits)


def _apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Top-k without a full sort: ``torch.topk`` up to the largest k in the batch."""
    k = top_k.clamp(max=logits.shape[-1])  # [num_reqs]
    # One host sync: topk needs a Python int. Disabled rows don't raise it.
    max_k = int(k.max())
    if max_k <= 0:
        return logits
    top_values = logits.topk(max_k, dim=-1).values  # [num_reqs, max_k] descending
    kth = top_values.gather(-1, (k.clamp(min=1) - 1)[:, None])  # [num_reqs, 1]
    kth.masked_fill_((k <= 0)[:, None], float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


class Sampler:
    """Stateless: everything a step needs comes in ``SamplingMetadata``.

    ``fused_sample`` (a one-pass kernel: temperature, exponential race, logprob) takes the
    steps where no row filters (top-k, top-p, min-p), reports another logprobs mode, asks
    for top-k logprobs or for a sampling mask: the common RL case, with no sort and no full
    softmax passes.
    """

    def __init__(
        self, fused_sample: Callable | None = None, fused_rank: Callable | None = None,
        apply_penalties: Callable = apply_penalties_ref,
    ) -> None:
        self.fused_sample = fused_sample
        self.fused_rank = fused_rank or _rank_tokens
        self.apply_penalties = apply_penalties

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        if self.fused_sample is not None and _fusable(md):
            return self._fused(logits, md)
        return self._torch(logits, md)

    def _fused(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        if md.banned_token_ids or md.penalties is not None:
            logits = logits.to(torch.float32, copy=True)
            self._penalise(logits, md.penalties)
            _ban_tokens(logits, md.banned_token_ids)
        if md.all_greedy:
            sampled, token_logprobs = self.fused_sample(logits, md.temperature, None)
        elif not md.generators and md.noise_seed is not None:
            # No row has its own stream: the kernel draws the noise itself.
            sampled, token_logprobs = self.fused_sample(logits, md.temperature, None, seed=md.noise_seed)
        else:
            sampled, token_logprobs = self.fused_sample(logits, md.temperature, _exponential_noise(logits, md))
        # Rank under the same (tempered) distribution, only when logprobs are returned.
        ranks = None if md.max_num_logprobs is None else self.fused_rank(logits, md.temperature, sampled)
        return SamplerOutput(sampled, token_logprobs, ranks, None, None)

    def _torch(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        # A copy, so the caller's logits (maybe reused for prompt logprobs) stay raw.
        raw_logits = logits
        logits = logits.to(torch.float32, copy=True)  # [num_reqs, vocab]
        self._penalise(logits, md.penalties)
        _ban_tokens(logits, md.banned_token_ids)
        greedy = md.temperature < _GREEDY_EPS  # [num_reqs] bool
        if not md.all_greedy:
            # Greedy rows report the untempered distribution.
            temperature = torch.where(greedy, 1.0, md.temperature)  # [num_reqs]
            logits.div_(temperature[:, None])
        logits = apply_min_p(logits, md.min_p)
        logits = apply_top_k_top_p(logits, md.top_k, md.top_p)
        logprobs = logits.log_softmax(-1)  # [num_reqs, vocab]

        sampled = logits.argmax(-1)  # [num_reqs] int64
        if not md.all_greedy:
            q = _exponential_noise(logits, md)  # [num_reqs, vocab]
            raced = logits.softmax(-1).div_(q).argmax(-1)  # [num_reqs]
            sampled = torch.where(greedy, sampled, raced)

        if md.logprobs_mode is not None:
            logprobs = _logprobs_by_mode(logprobs, raw_logits, greedy, md)
        k = md.max_num_logprobs or 0
        token_logprobs, ranks, topk_ids, topk_logprobs = gather_logprobs(logprobs, sampled, k)
        masks = None if md.mask_rows is None else _sampling_masks(logits, greedy, md.mask_rows)
        return SamplerOutput(sampled, token_logprobs, ranks, topk_ids, topk_logprobs, masks)

    def _penalise(self, logits: torch.Tensor, pen: PenaltyMetadata | None) -> None:
        """Penalties on the penalised rows of the fp32 copy ``logits``, in place."""
        if pen is not None:
            self.apply_penalties(logits, pen.idx, pen.rows, pen.values, pen.output_counts, pen.prompt_mask)


def _rank_tokens(logits: torch.Tensor, temperature: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """1-based rank of ``token_ids`` under ``logits / T`` (greedy rows untempered)."""
    greedy = temperature < _GREEDY_EPS
    scaled = logits.float() / torch.where(greedy, 1.0, temperature)[:, None]  # [num_reqs, vocab]
    return (scaled > scaled.gather(-1, token_ids[:, None])).sum(-1) + 1


def _fusable(md: SamplingMetadata) -> bool:
    return (
        md.top_k is None and md.top_p is None and md.min_p is None
        and md.logprobs_mode is None and not md.max_num_logprobs and md.mask_rows is None
    )


def _sampling_masks(processed: torch.Tensor, greedy: torch.Tensor, rows: torch.Tensor) -> MaskTensors:
    """The kept set of ``rows`` of the processed logits [num_reqs, vocab] (masked: -inf),
    without a host sync. A greedy row keeps only its maximal logits (what argmax drew from)."""
    kept = processed[rows]  # [m, vocab] fp32
    top = kept.amax(-1, keepdim=True)  # [m, 1]
    kept = torch.where(greedy[rows][:, None] & (kept != top), float("-inf"), kept)
    finite = kept.isfinite()  # [m, vocab]
    min_kept = kept.masked_fill(~finite, float("inf")).amin(-1)  # [m]
    top_ids = kept.topk(min(MAX_KEPT_IDS, kept.shape[-1]), dim=-1).indices  # [m, k]
    return MaskTensors(finite.sum(-1), min_kept, top_ids)


def _logprobs_by_mode(
    processed: torch.Tensor, raw_logits: torch.Tensor, greedy: torch.Tensor, md: SamplingMetadata
) -> torch.Tensor:
    """Each row's logprobs under its mode: processed, scaled (temperature only; greedy rows
    untempered) or raw (the model's log-softmax). [num_reqs, vocab] fp32."""
    mode = md.logprobs_mode  # [num_reqs]
    scaled = (mode == LOGPROBS_MODE_IDS["scaled"]) & ~greedy  # [num_reqs] bool
    temperature = torch.where(scaled, md.temperature, 1.0)  # [num_reqs]
    other = (raw_logits.float() / temperature[:, None]).log_softmax(-1)  # [num_reqs, vocab]
    return torch.where((mode == LOGPROBS_MODE_IDS["processed"])[:, None], processed, other)


def _ban_tokens(logits: torch.Tensor, banned_token_ids: dict[int, list[int]]) -> None:
    """Write -inf at banned (row, token) pairs, in place. Scales with banned ids, not vocab."""
    if not banned_token_ids:
        return
    rows = [row for row, ids in banned_token_ids.items() for _ in ids]
    cols = [tok for ids in banned_token_ids.values() for tok in ids]
    rows_t = torch.tensor(rows, dtype=torch.long, device=logits.device)
    cols_t = torch.tensor(cols, dtype=torch.long, device=logits.device)
    logits[rows_t, cols_t] = float("-inf")


def _exponential_noise(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Exp(1) noise [num_reqs, vocab]: seeded rows from their own generator, rest batched."""
    q = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    if len(md.generators) < logits.shape[0]:
        if md.default_generator is None:
            raise ValueError("default_generator is required when some row has no generator")
        q.exponential_(generator=md.default_generator)
    for row, gen in md.generators.items():
        # Same draw as torch.empty(vocab).exponential_(generator=gen): a row's stream
        # depends only on its generator, never on batch size or order.
        q[row].exponential_(generator=gen)
    # Exp draws can be exactly 0; keep probs / q finite so a masked token (prob 0) never wins.
    return q.clamp_min_(torch.finfo(q.dtype).tiny)
