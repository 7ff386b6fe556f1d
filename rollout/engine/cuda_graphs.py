"""CUDA graphs for decode steps: captured once per batch size of a ladder, replayed with the
batch padded up to the nearest captured size.

A captured step reads its inputs from persistent device buffers (token ids, positions,
slot mapping, block tables, sequence lengths) that ``run`` fills before each replay.
Padding rows write their K/V into a scratch block outside the pool and attend to it alone,
so they never touch a request's cache. Weights and KV live in arenas whose addresses
survive sleep/wake, so the graphs stay valid without recapture.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch
from torch import nn

from rollout.models.backends import AttentionBackend, AttentionMetadata, Ops
from rollout.models.forward_context import ExpertRoutes, ForwardContext, set_forward_context

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to ``max_num_seqs`` (and it)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class CudaGraphRunner:
    def __init__(
        self, model: nn.Module, kv_caches: list[torch.Tensor], backend: AttentionBackend, ops: Ops,
        device: torch.device, *, max_num_seqs: int, max_blocks_per_req: int, block_size: int,
        scratch_block: int, max_model_len: int, expert_routes: ExpertRoutes | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.ops = ops
        self.device = device
        # MoE models: every replay writes its rows' routed experts here (RouteRecorder.graph_routes).
        self.expert_routes = expert_routes
        self.sizes = capture_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        n = self.sizes[-1]
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)  # [max_reqs]
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), self.scratch_slot, dtype=torch.int64, device=device)
        self.block_tables = torch.full((n, max_blocks_per_req), scratch_block, **i32)  # [max_reqs, max_blocks]
        self.seq_lens = torch.ones(n, **i32)
        self.query_start_loc = torch.arange(n + 1, **i32)  # one token per request
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def _forward(self, size: int) -> torch.Tensor:
        md = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
            query_start_loc=self.query_start_loc[: size + 1], seq_lens=self.seq_lens[:size],
            query_start_loc_cpu=None, seq_lens_cpu=None, max_query_len=1, max_seq_len=self.max_model_len,
            decode_only=True,
        )
        with set_forward_context(ForwardContext(md, self.kv_caches, self.backend, self.ops, self.expert_routes)):
            hidden = self.model(self.input_ids[:size], self.positions[:size])
            return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):  # largest first: smaller ones reuse its pool
                for _ in range(2):  # warm-up: lazy inits and autotuning stay out of the graph
                    self._forward(size)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                    logits = self._forward(size)
                self.graphs[size] = (graph, logits)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        logger.info("captured %d CUDA graphs (sizes %s) in %.1fs", len(self.sizes), self.sizes, time.perf_counter() - t0)

    def release(self) -> None:
        """Free every graph and its memory pool. NCCL cannot tear down a communicator while
        a graph that captured its collectives is alive (pytorch#115388), so this must run
        before the caller's ``destroy_process_group`` under tensor parallelism."""
        for graph, _ in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self._pool = None

    def can_run(self, num_reqs: int) -> bool:
        return bool(self.graphs) and num_reqs <= self.sizes[-1]

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
        block_tables: torch.Tensor, seq_lens: torch.Tensor,
    ) -> torch.Tensor:
        """Replay the smallest graph that fits ``num_reqs = len(input_ids)`` rows; returns
        their logits [num_reqs, vocab] (a view of the graph's output buffer)."""
        num_reqs = input_ids.shape[0]
        size = self.sizes[bisect.bisect_left(self.sizes, num_reqs)]
        self.input_ids[:num_reqs].copy_(input_ids, non_blocking=True)
        self.positions[:num_reqs].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_reqs].copy_(slot_mapping, non_blocking=True)
        width = block_tables.shape[1]
        self.block_tables[:num_reqs, :width].copy_(block_tables, non_blocking=True)
        self.seq_lens[:num_reqs].copy_(seq_lens, non_blocking=True)
        if size > num_reqs:  # padding rows: scratch slot, context of one token
            self.slot_mapping[num_reqs:size].fill_(self.scratch_slot)
            self.block_tables[num_reqs:size].fill_(self.scratch_block)
            self.seq_lens[num_reqs:size].fill_(1)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:num_reqs]
