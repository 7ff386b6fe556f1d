"""PenaltyState: each row's token history on the device, for the sampling penalties.

Repetition, presence and frequency penalties need, per request, which tokens its prompt
holds and how often each token occurs in its output so far. Two device tables indexed by
``req_idx`` (the rows of ``InputBatch``) hold that:

    output_counts  [max_num_seqs, vocab] int32   occurrences in the output so far
    prompt_mask    [max_num_seqs, vocab] bool    occurs in the prompt

allocated on the first request with penalties (an engine that never sees one never holds
them; then 5 bytes per row and vocab entry, 190 MiB for 256 rows of a 152k vocab).

Steps overlap: step N+1 is built on the host and queued before step N's sampled tokens
are read back, so when its metadata is built, a row's newest output token exists only on
the device. The host therefore never counts tokens of running rows: right after step N's
sampler, ``record`` adds each kept sample to its row's counts on the device, from the
sampled tensor itself. Step N+1's penalties run after it on the same stream and see it.
The host writes a row's history only when the row is added (``add_rows``): a new request,
or one resumed after preemption, whose tokens are all on the host then (the scheduler
re-admits a preempted request only once its token in flight is back), prompt and outputs
split at ``num_prompt_tokens`` (outputs stay outputs through a recompute). A prefill
chunk's discarded sample adds 0; a row dropped with a token in flight is reset when it is
reused. Rows without penalties are never written or read, and a step with no penalised row
sends nothing and launches nothing.
"""

from __future__ import annotations

import torch

from rollout.engine.input_batch import InputBatch
from rollout.engine.sampler import PenaltyMetadata
from rollout.sampling_params import SamplingParams


class PenaltyState:
    def __init__(self, max_num_seqs: int, vocab_size: int, device: torch.device, pin: bool) -> None:
        self.max_num_seqs = max_num_seqs
        self.vocab_size = vocab_size
        self.device = device
        self.pin = pin
        self.output_counts: torch.Tensor | None = None  # [max_num_seqs, vocab] int32
        self.prompt_mask: torch.Tensor | None = None  # [max_num_seqs, vocab] bool

    def add_rows(self, batch: InputBatch, rows: list[int]) -> None:
        """Write the history of newly added ``rows`` (those with penalties) from the host
        token table: one host-to-device copy for all of them."""
        rows = [r for r in rows if batch.states[r].params.has_penalties]
        if not rows:
            return
        if self.output_counts is None:
            shape = (self.max_num_seqs, self.vocab_size)
            self.output_counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self.prompt_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
        # Flat (row, token id) pairs: the prompts', then the outputs'.
        prompt_rows, prompt_ids, output_rows, output_ids = [], [], [], []
        for r in rows:
            num_prompt, num_tokens = batch.states[r].num_prompt_tokens, int(batch.num_tokens_cpu[r])
            ids = batch.token_ids_cpu[r, :num_tokens]
            prompt_rows.append(torch.full((num_prompt,), r, dtype=torch.int64))
            prompt_ids.append(ids[:num_prompt])
            output_rows.append(torch.full((num_tokens - num_prompt,), r, dtype=torch.int64))
            output_ids.append(ids[num_prompt:])
        host = torch.cat([torch.tensor(rows, dtype=torch.int64), *prompt_rows, *prompt_ids, *output_rows, *output_ids])
        dev = self._to_device(host)
        k, num_p, num_o = len(rows), sum(len(t) for t in prompt_ids), sum(len(t) for t in output_ids)
        new_rows = dev[:k]  # [k]
        prompt_pairs = dev[k : k + 2 * num_p].view(2, num_p)  # [2, num_p]: rows, token ids
        output_pairs = dev[k + 2 * num_p :].view(2, num_o)  # [2, num_o]
        self.output_counts.index_fill_(0, new_rows, 0)
        self.prompt_mask.index_fill_(0, new_rows, False)
        self.prompt_mask.index_put_((prompt_pairs[0], prompt_pairs[1]), torch.ones((), dtype=torch.bool, device=self.device))
        ones = torch.ones(output_pairs.shape[1], dtype=torch.int32, device=self.device)
        self.output_counts.index_put_((output_pairs[0], output_pairs[1]), ones, accumulate=True)

    def host_inputs(self, rows: list[int], params: list[SamplingParams], completes: list[bool]) -> dict[str, torch.Tensor]:
        """What a step with these rows must stage for its penalties: nothing when no row
        has them, else the penalised rows' indices and values."""
        pen = [i for i, p in enumerate(params) if p.has_penalties]
        if not pen:
            return {}
        return {
            # [3, m] int64: index in the step, req_idx, 1 if the sample is kept
            "penalty_rows": torch.tensor([pen, [rows[i] for i in pen], [int(completes[i]) for i in pen]],
                                         dtype=torch.int64),
            # [3, m] fp32: repetition, presence, frequency
            "penalty_values": torch.tensor(
                [[params[i].repetition_penalty for i in pen], [params[i].presence_penalty for i in pen],
                 [params[i].frequency_penalty for i in pen]], dtype=torch.float32,
            ),
        }

    def metadata(self, dev: dict[str, torch.Tensor]) -> PenaltyMetadata | None:
        """The step's ``PenaltyMetadata`` from its staged tensors (None: no penalised row)."""
        if "penalty_rows" not in dev:
            return None
        idx, rows, kept = dev["penalty_rows"]
        return PenaltyMetadata(idx, rows, kept, dev["penalty_values"], self.output_counts, self.prompt_mask)

    def record(self, pen: PenaltyMetadata | None, sampled: torch.Tensor) -> None:
        """Count the step's kept samples of penalised rows, on the device (queued after the
        sampler that produced ``sampled`` [num_reqs], before the next step's penalties)."""
        if pen is None:
            return
        self.output_counts.index_put_((pen.rows, sampled[pen.idx]), pen.kept.to(torch.int32), accumulate=True)

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """One copy to the device that does not wait for the stream: from pinned memory
        (the caching host allocator keeps it until the copy is done)."""
        if not self.pin:
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

