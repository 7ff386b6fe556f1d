"""Routed experts of MoE models: recorded for the rows that ask, replayed for rows that give them.

``RouteShape`` is what a model's routes look like (MoE layers, experts per token, experts);
``RouteRecorder`` is the model runner's part: it owns one ``ExpertRoutes`` buffer sized for
the largest step (allocated at the first step that needs it) and, per step, plans which
token rows come back and which are replayed. A step where no row asks and no row gives
routes gets no plan: no buffer in the forward context, nothing staged, nothing copied.

What comes back for a recording row (``RouteChunk``): the routes of the prompt positions
the step computed (``[position][moe_layer][k]``) and, when its sample is kept, those of
the position that sampled it. A replaying row (``LLM.score(..., routed_experts=...)``)
carries its given routes ``[position, moe_layer, k]``; its tokens take them instead of the
router's choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rollout.models.forward_context import ExpertRoutes

# A token's routes: [moe_layer][k] expert ids.
TokenRoutes = list[list[int]]


@dataclass(frozen=True)
class RouteShape:
    num_moe_layers: int
    top_k: int
    num_experts: int

    @staticmethod
    def of(model: Any) -> RouteShape | None:
        """The routes of ``model``'s tokens; None for a model without MoE layers."""
        num = getattr(model, "num_moe_layers", 0)
        if not num:
            return None
        return RouteShape(num, model.num_experts_per_tok, model.config.num_experts)


@dataclass
class RouteChunk:
    """One row's routes from one step."""

    prompt_start: int  # the first prompt position of ``prompt``
    prompt: list[TokenRoutes]  # the prompt positions this step computed, in order
    sampled: TokenRoutes | None  # the sampling position's, when the sample is kept


@dataclass
class RoutePlan:
    """A step's routes: the context's buffer, and how to read the copied rows back."""

    routes: ExpertRoutes
    # Per recording row: (index in the step, first prompt position, prompt rows copied,
    # sample kept, the sampling position copied after them (else it is the last prompt one)).
    rows: list[tuple[int, int, int, bool, bool]]

    def copy_out(self, gather_idx: torch.Tensor | None) -> torch.Tensor | None:
        """The buffer rows ``gather_idx`` names (the staged ``route_idx``) on their way to
        the host ([num_copied, moe_layer, k] int32, non-blocking, like the step's other
        sampled tensors); None when nothing is copied."""
        if gather_idx is None:
            return None
        picked = self.routes.topk_ids[:, gather_idx].transpose(0, 1).to(torch.int32)
        return picked.to("cpu", non_blocking=True)


class RouteRecorder:
    def __init__(self, shape: RouteShape | None, max_num_tokens: int, device: torch.device) -> None:
        self.shape = shape
        self.max_num_tokens = max_num_tokens
        self.device = device
        self._buffer: torch.Tensor | None = None  # [num_moe_layers, max_num_tokens, k] int64

    def plan(
        self, row_states: dict[int, Any], rows: list[int], cu: torch.Tensor, positions: torch.Tensor,
        completes: list[bool],
    ) -> tuple[RoutePlan | None, dict[str, torch.Tensor]]:
        """The step's plan (None when no row records or replays) and what to stage: the
        buffer rows to copy back (``route_idx``). ``rows`` are the step's rows in order
        (their ``RowState``s in ``row_states``), ``cu`` its cumulative token counts,
        ``positions`` each token's position."""
        if self.shape is None:
            return None, {}
        states = [row_states[r] for r in rows]
        asking = [
            i for i, s in enumerate(states) if s.params.return_routed_experts or s.replay_routes is not None
        ]
        if not asking:
            return None, {}
        buffer = self._ensure_buffer()
        rows: list[tuple[int, int, int, bool]] = []
        gather: list[torch.Tensor] = []
        replay_idx: list[torch.Tensor] = []
        replay_ids: list[torch.Tensor] = []
        for i in asking:
            st, lo, hi = states[i], int(cu[i]), int(cu[i + 1])
            start = int(positions[lo])
            if st.replay_routes is not None:  # positions past the given routes follow the router
                n = max(0, min(len(st.replay_routes) - start, hi - lo))
                replay_idx.append(torch.arange(lo, lo + n))
                replay_ids.append(st.replay_routes[start : start + n])
            if st.params.return_routed_experts:
                n = max(0, min(st.num_prompt_tokens - start, hi - lo))  # prompt positions of the chunk
                gather.append(torch.arange(lo, lo + n))
                extra = completes[i] and n < hi - lo  # the sampling position is past the prompt
                if extra:
                    gather.append(torch.tensor([hi - 1]))
                rows.append((i, start, n, completes[i], extra))
        replay = None
        if replay_idx:
            idx = torch.cat(replay_idx).to(self.device)
            buffer[:, idx] = torch.cat(replay_ids).transpose(0, 1).to(self.device)
            replay = torch.zeros(int(cu[-1]), dtype=torch.bool, device=self.device)
            replay[idx] = True
        send = {"route_idx": torch.cat(gather)} if gather else {}  # [num_copied] int64
        return RoutePlan(ExpertRoutes(buffer, replay), rows), send

    def graph_routes(self) -> ExpertRoutes | None:
        """What CUDA-graph decode steps record into (None for a model without MoE layers):
        the buffer ``plan`` reads back, so a recording decode step can replay its graph."""
        return None if self.shape is None else ExpertRoutes(self._ensure_buffer())

    def _ensure_buffer(self) -> torch.Tensor:
        """The [num_moe_layers, max_num_tokens, k] int64 buffer, allocated once: graphs
        capture its address."""
        if self._buffer is None:
            s = self.shape
            self._buffer = torch.zeros(s.num_moe_layers, self.max_num_tokens, s.top_k, dtype=torch.int64, device=self.device)
        return self._buffer

    @staticmethod
    def unpack(
        rows: list[tuple[int, int, int, bool, bool]], copied: torch.Tensor | None, num_rows: int,
    ) -> list[RouteChunk | None]:
        """Per row of the step, its RouteChunk (None for rows that did not record)."""
        out: list[RouteChunk | None] = [None] * num_rows
        routes = [] if copied is None else copied.tolist()  # [num_copied][moe_layer][k]
        at = 0
        for i, start, n, kept, extra in rows:
            prompt = routes[at : at + n]
            at += n
            sampled = None
            if extra:
                sampled, at = routes[at], at + 1
            elif kept:  # the chunk ends at the last prompt position, which sampled
                sampled = prompt[-1]
            out[i] = RouteChunk(start, prompt, sampled)
        return out
