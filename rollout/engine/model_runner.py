"""ModelRunner: turns a SchedulerOutput into flat tensors, runs the model once, samples.

One forward covers every scheduled token of every request (prefill chunks and decodes
alike); the last position of each request is sampled.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from rollout.engine.cuda_graphs import CudaGraphRunner
from rollout.engine.input_batch import InputBatch
from rollout.engine.penalties import PenaltyState
from rollout.engine.request import TokenLogprobs
from rollout.engine.routes import RouteRecorder, RouteShape
from rollout.engine.sampler import LOGPROBS_MODE_IDS, Sampler, SamplingMetadata, gather_logprobs
from rollout.engine.scheduler import SchedulerOutput
from rollout.engine.staging import Staging
from rollout.engine.step_data import (
    HostInputs, ModelRunnerOutput, PromptLogprobsChunk, SampledCopies, StepHandle, StepInputs,
)
from rollout.models.backends import AttentionMetadata, BackendLimits, create_attention_backend, get_ops
from rollout.models.forward_context import ForwardContext, set_forward_context
from rollout.memory.arena import Arena
from rollout.config import EngineConfig
from rollout.outputs import SamplingMask
from rollout.platforms import Platform

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: nn.Module, platform: Platform, config: EngineConfig) -> None:
        max_num_seqs = config.scheduler.max_num_seqs
        max_model_len = config.model.max_model_len
        max_num_batched_tokens = config.scheduler.max_num_batched_tokens
        seed = config.model.seed
        device = config.device
        self.max_num_batched_tokens = max_num_batched_tokens
        self.model = model
        self.platform = platform
        self.device = device
        self.block_size = config.cache.block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_req = -(-(max_model_len + 1) // self.block_size)
        self.batch = InputBatch(max_num_seqs, max_model_len, self.max_blocks_per_req)
        # Exact on-policy mode: kernels whose result for a token never depends on the batch.
        attention, ops = (
            platform.invariant_backends() if config.batch_invariant else (platform.attention_backend(), platform.ops_backend())
        )
        self.backend = create_attention_backend(
            attention, BackendLimits(model.num_kv_heads, max_num_batched_tokens, max_num_seqs, device),
        )
        self.ops = get_ops(ops)
        self.sampler = Sampler(self.ops.sample_tokens, self.ops.rank_tokens, self.ops.apply_penalties)
        # Each row's token history on the device, for repetition/presence/frequency penalties.
        self.penalties = PenaltyState(max_num_seqs, config.model.vocab_size, device, platform.pin_host_memory)
        # Unseeded requests draw from this engine generator (seeded by LLM(seed=...)), or
        # from a per-step seed of the host one when the fused sampler draws its own noise.
        self.generator = platform.manual_seed_generator(seed, device)
        self.noise_seeds = torch.Generator().manual_seed(seed)
        self.kv_arena: Arena | None = None
        self.graphs: CudaGraphRunner | None = None
        self.kv_caches: list[torch.Tensor] = []
        self.staging = Staging(self._max_step_bytes(max_num_batched_tokens), device, platform.pin_host_memory)
        # MoE models: the routed experts of the rows that ask (or give them, to replay).
        self.routes = RouteRecorder(RouteShape.of(model), max(max_num_batched_tokens, max_num_seqs), device)
        # The last launched step's sampled ids [num_reqs] on the device: inputs of the next.
        self._last_sampled: torch.Tensor | None = None

    def _max_step_bytes(self, max_num_batched_tokens: int) -> int:
        """An upper bound of what ``Staging.send`` carries in one step (see _prepare_inputs,
        _sampling_metadata and RouteRecorder.plan): per token 5 int64 (4 without routed
        experts), per row 14 int64/fp32 (8 without penalties and sampling masks) and a
        block-table row, plus alignment."""
        tokens = max(max_num_batched_tokens, self.batch.max_num_seqs)
        rows = self.batch.max_num_seqs
        return 8 * 5 * tokens + 8 * 14 * (rows + 1) + 4 * rows * self.max_blocks_per_req + 16 * 16

    # ---- KV cache --------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        layers = len(self.model.model.layers)
        elem = next(self.model.parameters()).element_size()
        return 2 * layers * self.block_size * self.model.num_kv_heads * self.model.head_dim * elem

    def init_kv_cache(self, num_blocks: int) -> Arena:
        """One arena for every layer's K and V; layers see views, so sleep can release and
        re-back it as a whole."""
        layers = len(self.model.model.layers)
        dtype = next(self.model.parameters()).dtype
        # One block more than the pool manages: the scratch block CUDA-graph padding writes to.
        self.scratch_block = num_blocks
        shape = (layers, 2, num_blocks + 1, self.block_size, self.model.num_kv_heads, self.model.head_dim)
        self.kv_arena = self.platform.create_arena((num_blocks + 1) * self.kv_bytes_per_block(), self.device)
        self.kv_caches = list(self.kv_arena.view(0, shape, dtype).unbind(0))
        return self.kv_arena

    @torch.inference_mode()
    def profile_run(self) -> None:
        """Run the largest step the scheduler can make (``max_num_batched_tokens`` tokens and
        ``max_num_seqs`` sampled rows through the filtering sampler) on a throw-away KV cache,
        so the allocator reserves its peak activation memory before the KV cache is sized."""
        num_tokens = min(self.max_num_batched_tokens, self.max_model_len)
        num_rows = min(self.batch.max_num_seqs, num_tokens)
        layers = len(self.model.model.layers)
        dtype = next(self.model.parameters()).dtype
        num_blocks = -(-num_tokens // self.block_size)
        kv = torch.zeros((layers, 2, num_blocks, self.block_size, self.model.num_kv_heads, self.model.head_dim),
                         dtype=dtype, device=self.device)
        dev = self.device
        positions = torch.arange(num_tokens, device=dev)
        md = AttentionMetadata(
            slot_mapping=positions.clone(), block_tables=torch.arange(num_blocks, dtype=torch.int32, device=dev)[None],
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=dev),
            query_start_loc_cpu=torch.tensor([0, num_tokens]), seq_lens_cpu=torch.tensor([num_tokens]),
            max_query_len=num_tokens, max_seq_len=num_tokens,
        )
        with set_forward_context(ForwardContext(md, list(kv.unbind(0)), self.backend, self.ops)):
            hidden = self.model(torch.zeros(num_tokens, dtype=torch.int64, device=dev), positions)
            logits = self.model.compute_logits(hidden[-num_rows:])
        f32 = dict(dtype=torch.float32, device=dev)
        md_s = SamplingMetadata(
            temperature=torch.ones(num_rows, **f32), top_k=torch.full((num_rows,), 50, dtype=torch.int64, device=dev),
            top_p=torch.full((num_rows,), 0.9, **f32), min_p=torch.full((num_rows,), 0.05, **f32),
            generators={}, default_generator=self.generator, all_greedy=False, max_num_logprobs=1,
            banned_token_ids={}, mask_rows=torch.arange(num_rows, device=dev),
        )
        self.sampler(logits, md_s)
        self.platform.synchronize(self.device)
        del kv, hidden, logits

    def graph_blockers(self) -> list[str]:
        """The ops this model runs that the op set computes with host syncs (no CUDA graph
        can capture them): the torch MoE loops, e.g. FP8 experts on a GPU without fp8 dots."""
        used = {m.op_name for m in self.model.modules() if hasattr(m, "op_name")}
        return sorted(used & set(self.ops.host_sync_ops))

    def capture_cuda_graphs(self) -> None:
        """Capture decode steps for a ladder of batch sizes (CUDA platforms only); none when
        the model runs an op that syncs with the host (``graph_blockers``): decode is eager."""
        blockers = self.graph_blockers()
        if blockers:
            logger.warning("no CUDA graphs: op set %r runs %s with host syncs; decode steps run eagerly",
                           self.ops.name, blockers)
            return
        self.graphs = CudaGraphRunner(
            self.model, self.kv_caches, self.backend, self.ops, self.device, max_num_seqs=self.batch.max_num_seqs,
            max_blocks_per_req=self.max_blocks_per_req, block_size=self.block_size,
            scratch_block=self.scratch_block, max_model_len=self.max_model_len,
            expert_routes=self.routes.graph_routes(),
        )
        self.graphs.capture()

    def release_cuda_graphs(self) -> None:
        """Drop the captured graphs; later decode steps run eagerly."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    # ---- one step ----------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> StepHandle:
        """Queue one step on the device and return without waiting for it: the sampled
        tokens come back through ``finish``. Rows whose input token is still in flight (the
        last step's sample) read it from that step's device tensor, so step N+1 can be
        queued before step N is read back."""
        self._update_batch(sched)
        b = self.batch
        req_ids = list(sched.num_scheduled_tokens)
        rows = torch.tensor([b.rows[r] for r in req_ids], dtype=torch.int64)  # [num_reqs]
        num_sched = torch.tensor(list(sched.num_scheduled_tokens.values()), dtype=torch.int64)
        # Rows that reach the end of their tokens keep their sample; a prefill chunk's is discarded.
        completes_t = b.num_computed_cpu[rows] + num_sched >= b.num_tokens_cpu[rows]  # [num_reqs] bool
        completes = completes_t.tolist()
        row_list = rows.tolist()
        host = self._prepare_inputs(rows, num_sched)
        smd, sampling_host = self._sampling_metadata(row_list, completes)
        routes, routes_host = self.routes.plan(b.states, row_list, host.cu_cpu, host.positions_cpu, completes)
        dev = self.staging.send({**host.send, **sampling_host, **routes_host})
        inputs = self._device_inputs(host, dev)
        self._fill_sampling_metadata(smd, dev)
        md = inputs.attn
        # Graphs record every decode row's routes into the plan's buffer; a step that replays
        # given routes runs eagerly.
        if (routes is None or routes.routes.replay is None) and self._use_graphs(rows, md):
            hidden = None
            logits = self.graphs.run(inputs.input_ids, inputs.positions, md.slot_mapping, md.block_tables, md.seq_lens)
        else:
            expert_routes = None if routes is None else routes.routes
            with set_forward_context(ForwardContext(md, self.kv_caches, self.backend, self.ops, expert_routes)):
                hidden = self.model(inputs.input_ids, inputs.positions)  # [num_tokens, hidden]
                logits = self.model.compute_logits(hidden[inputs.logits_indices])  # [num_reqs, vocab]
        out = self.sampler(logits, smd)
        self.penalties.record(smd.penalties, out.sampled_token_ids)  # before the next step's penalties
        prompt_lp: dict[str, PromptLogprobsChunk] = {}
        self._prompt_logprobs(req_ids, rows, num_sched, inputs, hidden, prompt_lp)

        # Host mirrors move on now; the sampled tokens fill their placeholders in finish().
        b.num_computed_cpu[rows] += num_sched
        done_idx = completes_t.nonzero().squeeze(1)  # [num_done] index into this step's rows
        done_rows = rows[done_idx]
        done_pos = b.num_tokens_cpu[done_rows].clone()  # where each sampled token goes
        b.num_tokens_cpu[done_rows] += 1
        b.pending_idx_cpu.fill_(-1)
        b.pending_idx_cpu[done_rows] = done_idx
        b.pending_pos_cpu[done_rows] = done_pos
        self._last_sampled = out.sampled_token_ids
        want_lp = smd.max_num_logprobs is not None
        # The sampled logprobs always come back (a float a row): NaN or inf anywhere in a row's
        # logits makes its log-normaliser, so its sampled logprob, non-finite.
        masks = out.masks
        copies = SampledCopies(*(None if t is None else t.to("cpu", non_blocking=True) for t in (
            out.sampled_token_ids,
            out.sampled_logprobs, out.sampled_ranks if want_lp else None,
            out.topk_token_ids if want_lp else None, out.topk_logprobs if want_lp else None,
            *((masks.num_kept, masks.min_kept, masks.top_ids) if masks is not None else (None, None, None)),
        )), routes=None if routes is None else routes.copy_out(dev.get("route_idx")))
        return StepHandle(
            req_ids, copies, self.platform.record_step_done(self.device), want_lp,
            [b.states[r].params.logprobs for r in row_list] if want_lp else [], prompt_lp,
            done_idx, done_rows, done_pos, b.row_gen_cpu[done_rows].clone(),
            sampling_host["mask_rows"].tolist() if "mask_rows" in sampling_host else [],
            routes.rows if routes is not None else [],
        )

    def finish(self, handle: StepHandle) -> ModelRunnerOutput:
        """Wait for a launched step and return its sampled tokens and logprobs (the step's
        one host sync); the tokens also take their place in the host token table."""
        handle.done.synchronize()
        c = handle.sampled
        sampled_t, lp_t, ranks_t, top_ids_t, top_lp_t = c.token_ids, c.logprobs, c.ranks, c.topk_ids, c.topk_logprobs
        sampled = sampled_t.tolist()
        b = self.batch
        # Rows dropped or handed to another request since the launch take nothing.
        live = b.row_gen_cpu[handle.done_rows] == handle.done_gens
        b.token_ids_cpu[handle.done_rows[live], handle.done_pos[live]] = sampled_t[handle.done_idx[live]]
        nonfinite: list[str] = []
        if not bool(torch.isfinite(lp_t).all()):  # rare: one check a step otherwise
            bad = handle.done_idx[~torch.isfinite(lp_t[handle.done_idx])].tolist()
            nonfinite = [handle.req_ids[i] for i in bad]
        logprobs: list[TokenLogprobs | None] = [None] * len(handle.req_ids)
        if handle.want_logprobs:
            lp, ranks = lp_t.tolist(), ranks_t.tolist()
            top_ids = top_ids_t.tolist() if top_ids_t is not None else None
            top_lp = top_lp_t.tolist() if top_lp_t is not None else None
            for i, k in enumerate(handle.num_logprobs):
                if k is None:
                    continue
                ids = top_ids[i][:k] if top_ids else []
                vals = top_lp[i][:k] if top_lp else []
                keep = [j for j, v in enumerate(vals) if v != float("-inf")]
                logprobs[i] = TokenLogprobs(lp[i], ranks[i], [ids[j] for j in keep], [vals[j] for j in keep])
        routes = [None] * len(handle.req_ids)
        if handle.route_rows:
            routes = RouteRecorder.unpack(handle.route_rows, c.routes, len(handle.req_ids))
        return ModelRunnerOutput(
            handle.req_ids, sampled, logprobs, handle.prompt_logprobs, nonfinite, _sampling_masks(handle), routes,
        )

    def _use_graphs(self, rows: torch.Tensor, md: AttentionMetadata) -> bool:
        """Replay a graph for steps of single-token requests none of which needs the hidden
        states of its prompt (prompt logprobs)."""
        if self.graphs is None or md.max_query_len != 1 or not self.graphs.can_run(len(rows)):
            return False
        states = self.batch.states
        return all(states[r].prompt_logprobs is None for r in rows.tolist())

    def _update_batch(self, sched: SchedulerOutput) -> None:
        for req_id in sched.removed_req_ids:
            self.batch.remove(req_id)
        for new in sched.new_reqs:
            self.batch.add(new)
        if sched.new_reqs:
            self.penalties.add_rows(self.batch, [self.batch.rows[new.req_id] for new in sched.new_reqs])
        for cached in sched.cached_reqs:
            if cached.new_block_ids:
                self.batch.append_blocks(self.batch.rows[cached.req_id], cached.new_block_ids)

    def _prepare_inputs(self, rows: torch.Tensor, num_sched: torch.Tensor) -> HostInputs:
        """The step's inputs on the host: ``send`` holds what goes to the device."""
        b = self.batch
        num_reqs, total = len(rows), int(num_sched.sum())
        cu = torch.zeros(num_reqs + 1, dtype=torch.int64)  # [num_reqs + 1]
        torch.cumsum(num_sched, 0, out=cu[1:])
        start = b.num_computed_cpu[rows]  # [num_reqs]
        req_of_token = torch.repeat_interleave(torch.arange(num_reqs), num_sched)  # [total]
        positions = start[req_of_token] + torch.arange(total) - cu[:-1][req_of_token]  # [total]
        token_rows = rows[req_of_token]
        input_ids = b.token_ids_cpu[token_rows, positions]
        # Tokens still in flight: the last step's samples, read on the device (-1: known here).
        src = b.pending_idx_cpu[token_rows]  # [total]
        from_last = (src >= 0) & (positions == b.pending_pos_cpu[token_rows])
        slots = b.block_table_cpu[token_rows, positions // self.block_size].long() * self.block_size
        slots += positions % self.block_size
        seq_lens = start + num_sched  # [num_reqs]
        max_blocks = -(-int(seq_lens.max()) // self.block_size)
        send = {
            "input_ids": input_ids,  # [total] int64
            "positions": positions,  # [total] int64
            "slot_mapping": slots,  # [total] int64
            "block_tables": b.block_table_cpu[rows, :max_blocks],  # [num_reqs, max_blocks] int32
            "query_start_loc": cu.to(torch.int32),  # [num_reqs + 1]
            "seq_lens": seq_lens.to(torch.int32),  # [num_reqs]
            "logits_indices": cu[1:] - 1,  # [num_reqs] int64
        }
        any_from_last = bool(from_last.any())
        if any_from_last:
            send["from_last"] = torch.where(from_last, src, -1)  # [total] int64
        return HostInputs(
            send, any_from_last, positions, cu, seq_lens, int(num_sched.max()), int(seq_lens.max()),
        )

    def _device_inputs(self, host: HostInputs, dev: dict[str, torch.Tensor]) -> StepInputs:
        input_ids = dev["input_ids"]
        if host.any_from_last:
            src = dev["from_last"]
            input_ids = torch.where(src >= 0, self._last_sampled[src.clamp(min=0)], input_ids)
        attn = AttentionMetadata(
            slot_mapping=dev["slot_mapping"], block_tables=dev["block_tables"],
            query_start_loc=dev["query_start_loc"], seq_lens=dev["seq_lens"],
            query_start_loc_cpu=host.cu_cpu, seq_lens_cpu=host.seq_lens_cpu,
            max_query_len=host.max_query_len, max_seq_len=host.max_seq_len,
        )
        return StepInputs(input_ids, dev["positions"], dev["logits_indices"], attn, host.positions_cpu, host.cu_cpu)

    def _sampling_metadata(self, rows: list[int], completes: list[bool]) -> tuple[SamplingMetadata, dict]:
        """The step's SamplingMetadata, its per-row tensors still on the host (returned
        beside it, to be staged; ``_fill_sampling_metadata`` puts the device ones in)."""
        states = [self.batch.states[r] for r in rows]
        params = [s.params for s in states]
        f32 = torch.float32
        send = {"temperature": torch.tensor([0.0 if p.greedy else p.temperature for p in params], dtype=f32)}
        if any(p.top_k > 0 for p in params):
            send["top_k"] = torch.tensor([p.top_k for p in params], dtype=torch.int64)
        if any(p.top_p < 1.0 for p in params):
            send["top_p"] = torch.tensor([p.top_p for p in params], dtype=f32)
        if any(p.min_p > 0.0 for p in params):
            send["min_p"] = torch.tensor([p.min_p for p in params], dtype=f32)
        modes = [LOGPROBS_MODE_IDS[p.logprobs_mode] for p in params]
        if any(modes):
            send["logprobs_mode"] = torch.tensor(modes, dtype=torch.int64)
        send.update(self.penalties.host_inputs(rows, params, completes))  # {} when no row has any
        # Sampling masks only for samples that are kept (a prefill chunk's is thrown away).
        mask_rows = [i for i, (p, c) in enumerate(zip(params, completes)) if p.return_sampling_mask and c]
        if mask_rows:
            send["mask_rows"] = torch.tensor(mask_rows, dtype=torch.int64)  # [m]
        banned = {}
        for i, (r, s) in enumerate(zip(rows, states)):
            if s.params.min_tokens and s.stop_token_ids:  # cheap test first: a tensor read is not
                num_out = int(self.batch.num_tokens_cpu[r]) - s.num_prompt_tokens
                if num_out < s.params.min_tokens:
                    banned[i] = list(s.stop_token_ids)
        k = [p.logprobs for p in params if p.logprobs is not None]
        md = SamplingMetadata(
            temperature=send["temperature"], top_k=None, top_p=None, min_p=None,
            # Only a sample that is kept draws from the request's own generator, so a seeded
            # stream does not depend on how its prompt was chunked or recomputed.
            generators={
                i: s.generator for i, (s, c) in enumerate(zip(states, completes)) if s.generator is not None and c
            },
            default_generator=self.generator,
            all_greedy=all(p.greedy for p in params),
            max_num_logprobs=max(k) if k else None,
            banned_token_ids=banned,
            noise_seed=int(torch.randint(2**31 - 1, (1,), generator=self.noise_seeds)),
        )
        return md, send

    def _fill_sampling_metadata(self, md: SamplingMetadata, dev: dict[str, torch.Tensor]) -> None:
        md.temperature = dev["temperature"]
        for name in ("top_k", "top_p", "min_p", "logprobs_mode", "mask_rows"):
            setattr(md, name, dev.get(name))
        md.penalties = self.penalties.metadata(dev)

    def _prompt_logprobs(
        self, req_ids: list[str], rows: torch.Tensor, num_sched: torch.Tensor, inputs: StepInputs,
        hidden: torch.Tensor | None, out: dict[str, PromptLogprobsChunk],
    ) -> None:
        """Logprobs of the prompt tokens this step's chunk predicts (prompt_logprobs, and
        LLM.score's teacher forcing): only positions from ``spec.start - 1`` on."""
        b = self.batch
        cu, positions = inputs.cu_cpu, inputs.positions_cpu
        for i, r in enumerate(rows.tolist()):
            st = b.states[r]
            spec = st.prompt_logprobs
            if spec is None:
                continue
            lo, hi = int(cu[i]), int(cu[i + 1])
            pos = positions[lo:hi]
            # Positions that predict a prompt token from spec.start on.
            keep = (pos + 1 < st.num_prompt_tokens) & (pos + 1 >= spec.start)
            if not bool(keep.any()):
                continue
            idx = torch.arange(lo, hi)[keep]
            targets = b.token_ids_cpu[r, pos[keep] + 1]
            with set_forward_context(ForwardContext(None, [], self.backend, self.ops)):  # the step's linear op
                logits = self.model.compute_logits(hidden[idx.to(self.device)]).float()
            if spec.temperature != 1.0:
                logits /= spec.temperature
            lp = self.ops.log_softmax(logits)
            tok_lp, ranks, top_ids, top_lp = gather_logprobs(lp, targets.to(self.device), spec.num_top)
            entries = [
                TokenLogprobs(
                    v, rk, top_ids[j].tolist() if top_ids is not None else [],
                    top_lp[j].tolist() if top_lp is not None else [],
                )
                for j, (v, rk) in enumerate(zip(tok_lp.tolist(), ranks.tolist()))
            ]
            out[req_ids[i]] = PromptLogprobsChunk(int(pos[keep][0]), entries)


def _sampling_masks(handle: StepHandle) -> list[SamplingMask | None]:
    """Per row of the step, its SamplingMask (None for rows that did not ask)."""
    masks: list[SamplingMask | None] = [None] * len(handle.req_ids)
    if not handle.mask_rows:
        return masks
    c = handle.sampled
    for i, num_kept, min_kept, top_ids in zip(
        handle.mask_rows, c.mask_num_kept.tolist(), c.mask_min_kept.tolist(), c.mask_top_ids.tolist(),
    ):
        masks[i] = SamplingMask(num_kept, min_kept, top_ids[:num_kept] if num_kept <= len(top_ids) else None)
    return masks
