"""InputBatch: the runner's persistent per-request rows (tokens, block table, sampling params).

Rows live in preallocated host tables indexed by ``req_idx``; a step gathers the rows it
schedules, so nothing is rebuilt per request per step beyond index lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rollout.engine.request import PromptLogprobsSpec
from rollout.engine.scheduler import NewRequestData
from rollout.sampling_params import SamplingParams


@dataclass
class RowState:
    req_id: str
    params: SamplingParams
    stop_token_ids: tuple[int, ...]
    generator: torch.Generator | None
    num_prompt_tokens: int
    prompt_logprobs: PromptLogprobsSpec | None = None
    replay_routes: torch.Tensor | None = None  # [positions, moe_layer, k] int64


class InputBatch:
    def __init__(self, max_num_seqs: int, max_model_len: int, max_blocks_per_req: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.token_ids_cpu = torch.zeros(max_num_seqs, max_model_len + 1, dtype=torch.int64)
        self.num_tokens_cpu = torch.zeros(max_num_seqs, dtype=torch.int64)  # [max_num_seqs]
        self.num_computed_cpu = torch.zeros(max_num_seqs, dtype=torch.int64)
        self.block_table_cpu = torch.zeros(max_num_seqs, max_blocks_per_req, dtype=torch.int32)
        self.num_blocks_cpu = torch.zeros(max_num_seqs, dtype=torch.int64)
        # ``num_tokens_cpu`` counts a row's tokens still in flight (sampled by the last step
        # launched, not read back yet): placeholders in ``token_ids_cpu``. For those rows,
        # the index of their token in that step's sampled tensor and its position (-1: none).
        self.pending_idx_cpu = torch.full((max_num_seqs,), -1, dtype=torch.int64)  # [max_num_seqs]
        self.pending_pos_cpu = torch.zeros(max_num_seqs, dtype=torch.int64)
        # Bumped whenever a row changes owner, so a late result never lands in a reused row.
        self.row_gen_cpu = torch.zeros(max_num_seqs, dtype=torch.int64)
        self.rows: dict[str, int] = {}
        self.states: dict[int, RowState] = {}
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))

    def add(self, new: NewRequestData) -> None:
        idx = self._free_rows.pop()
        self.rows[new.req_id] = idx
        n = len(new.token_ids)
        self.token_ids_cpu[idx, :n] = torch.tensor(new.token_ids, dtype=torch.int64)
        self.num_tokens_cpu[idx] = n
        self.num_computed_cpu[idx] = new.num_computed_tokens
        self.num_blocks_cpu[idx] = 0
        self.pending_idx_cpu[idx] = -1
        self.row_gen_cpu[idx] += 1
        self.append_blocks(idx, new.block_ids)
        self.states[idx] = RowState(
            new.req_id, new.sampling_params, new.stop_token_ids, new.generator, new.num_prompt_tokens,
            new.prompt_logprobs, new.replay_routes,
        )

    def remove(self, req_id: str) -> None:
        idx = self.rows.pop(req_id, None)
        if idx is not None:
            del self.states[idx]
            self.pending_idx_cpu[idx] = -1
            self.row_gen_cpu[idx] += 1
            self._free_rows.append(idx)

    def append_blocks(self, idx: int, block_ids: list[int]) -> None:
        if not block_ids:
            return
        start = int(self.num_blocks_cpu[idx])
        self.block_table_cpu[idx, start : start + len(block_ids)] = torch.tensor(block_ids, dtype=torch.int32)
        self.num_blocks_cpu[idx] = start + len(block_ids)
