"""The trainer's side of exact on-policy mode: rollout's own model definition and
batch-invariant kernels as a differentiable forward over the trainer's weights.

An engine built with ``LLM(..., batch_invariant=True)`` computes every token with kernels
whose result does not depend on the rest of the batch. ``ExactForward`` runs the *same*
model code with the *same* kernels over whole sequences, taking the weights from the
trainer's parameters (HF names) at each call: the logprobs it returns for the tokens a
rollout sampled are bitwise the logprobs the engine returned while sampling them, and
gradients flow back into the trainer's parameters (the backward need not be invariant).

The weights stay the trainer's: no copy is kept. The fused engine parameters (q/k/v,
gate/up) are concatenated from the trainer's tensors in each forward (differentiably), in
the layout of the engine's ``weight_loader`` (checked by the tests); a MoE layer's stacked
experts (``experts.w13`` [E, 2I, H], ``experts.w2`` [E, H, I]) are stacked from each
expert's gate/up/down tensors, or taken as they are from a transformers v5 module, which
holds them stacked (``experts.gate_up_proj``, ``experts.down_proj``). FSDP2 parameters
(DTensors) are gathered with ``full_tensor()``, which is differentiable. A DeepSpeed ZeRO-3
module's parameters are read inside ``deepspeed.zero.GatheredParameters(module.parameters())``
(logprobs only: ZeRO-3 reduces gradients through its own module hooks, which this functional
forward bypasses).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rollout.errors import InvalidRequestError, UnsupportedFeatureError, WeightUpdateError
from rollout.models.backends import AttentionMetadata, create_attention_backend, get_ops
from rollout.models.forward_context import ForwardContext, set_forward_context
from rollout.models.layers.rotary import RotaryEmbedding
from rollout.models.loader import build_model
from rollout.models.quantization import quantization_of
from rollout.models.weights import WHOLE, WeightMap
from rollout.outputs import SamplingMask
from rollout.platforms import get_platform

_BLOCK_SIZE = 16


class ExactForward:
    """``ExactForward(hf_config, dtype=..., device=...)``: the engine's forward for that
    config (Llama, Qwen2, Qwen3, Qwen3-MoE; one rank), with the batch-invariant kernels of the device's
    platform. Call ``token_logprobs(params, sequences, prompt_lens, temperature)`` with the
    trainer's parameters by HF name (``dict(module.named_parameters())``)."""

    def __init__(self, hf_config: Any, *, dtype: torch.dtype, device: str | torch.device,
                 architectures: list[str] | None = None) -> None:
        quantization = quantization_of(hf_config)
        if quantization is not None:  # as the engine's exact mode (EngineConfig) refuses it
            raise UnsupportedFeatureError(
                f"ExactForward: quantization {quantization!r}: the batch-invariant kernels have no fp8 GEMM yet "
                "and the engine refuses batch_invariant=True with it; give a full-precision config"
            )
        self.device = torch.device(device)
        self.dtype = dtype
        # The module tree only: parameters live on the meta device and are never filled.
        self.model = build_model(hf_config, dtype, torch.device("meta"), architectures)
        self._materialize_buffers()
        self.weight_map = WeightMap(self.model)
        # Engine parameter name -> (HF name, shard id) of each of its shards, in shard order.
        self.sources: dict[str, list[tuple[str, Any]]] = {}
        # Stacked parameter name -> the one HF tensor that may stand for all its shards.
        self.whole: dict[str, str] = {}
        for name, param in self.model.named_parameters():
            shards = [s for (pid, s) in self.weight_map.required if pid == id(param)]
            self.sources[name] = [(self.weight_map.required[(id(param), s)], s) for s in shards]
            whole = _whole_name(self.model, name)
            if whole is not None:
                self.whole[name] = whole
        attention, ops = get_platform(self.device).invariant_backends()
        self.backend = create_attention_backend(attention)
        self.ops = get_ops(ops)
        cfg = hf_config
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.num_layers = cfg.num_hidden_layers
        self.vocab_size = cfg.vocab_size

    @classmethod
    def for_module(cls, module: nn.Module, device: str | torch.device | None = None) -> ExactForward:
        """For an HF ``PreTrainedModel`` (plain, FSDP2-sharded or ZeRO-3): its config, dtype
        and device."""
        p = next(module.parameters())
        dev = device if device is not None else (p.device if p.device.type != "meta" else "cpu")
        if getattr(p, "device_mesh", None) is not None:  # an FSDP2 DTensor
            dev = device or p.to_local().device
        # Configs built in memory (from a GGUF file, say) may not record it; the class does.
        archs = getattr(module.config, "architectures", None) or [type(module).__name__]
        return cls(module.config, dtype=p.dtype, device=dev, architectures=archs)

    def _materialize_buffers(self) -> None:
        # Buffers are computed, not loaded (the rotary cos/sin cache): rebuild them on the device.
        for mod in self.model.modules():
            if isinstance(mod, RotaryEmbedding):
                with torch.device(self.device):
                    fresh = RotaryEmbedding(*mod.init_args)
                mod.cos_sin_cache = fresh.cos_sin_cache

    # ---- weights ----------------------------------------------------------------------
    def engine_params(self, hf_params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The engine's parameters (fused or stacked where the engine fuses or stacks) built
        from the trainer's tensors by HF name, differentiably. Raises ``WeightUpdateError``
        naming a missing or misshaped tensor."""
        out: dict[str, torch.Tensor] = {}
        problems = []
        for name, param in self.model.named_parameters():
            sources = self.sources[name]
            if name in self.whole and self.whole[name] in hf_params:  # stacked already (transformers v5)
                sources = [(self.whole[name], WHOLE)]
            parts = []
            for hf_name, _ in sources:
                t = _full(hf_params.get(hf_name))
                if t is None and self.weight_map.is_tied(param):
                    t = _full(hf_params.get(name))
                if t is None:
                    alt = f" (or {self.whole[name]!r} stacked)" if name in self.whole else ""
                    problems.append(f"missing {hf_name!r}{alt}")
                    continue
                parts.append(t)
            if len(parts) != len(sources):
                continue
            fused = _assemble(parts, [s for _, s in sources])
            if fused.shape != param.shape:
                problems.append(f"{name!r}: got {tuple(fused.shape)} from {[n for n, _ in sources]}, "
                                f"expected {tuple(param.shape)}")
                continue
            out[name] = fused.to(device=self.device, dtype=self.dtype)
        if problems:
            raise WeightUpdateError("; ".join(problems[:10]))
        return out

    # ---- forward ----------------------------------------------------------------------
    def hidden_states(self, params: dict[str, torch.Tensor], sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """The last hidden state of every token of every sequence, packed in order:
        [sum(len), hidden]. One causal pass per sequence through the engine's kernels."""
        lens = [len(s) for s in sequences]
        dev = self.device
        num_blocks_each = [-(-n // _BLOCK_SIZE) for n in lens]
        max_blocks = max(num_blocks_each)
        total_blocks = sum(num_blocks_each)
        block_tables = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
        slots, start = [], 0
        for i, (n, nb) in enumerate(zip(lens, num_blocks_each)):
            block_tables[i, :nb] = torch.arange(start, start + nb, dtype=torch.int32)
            slots.append(torch.arange(n) + start * _BLOCK_SIZE)
            start += nb
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        seq_lens = torch.tensor(lens, dtype=torch.int32)
        md = AttentionMetadata(
            slot_mapping=torch.cat(slots).to(dev), block_tables=block_tables.to(dev), query_start_loc=cu.to(dev),
            seq_lens=seq_lens.to(dev), query_start_loc_cpu=cu, seq_lens_cpu=seq_lens,
            max_query_len=max(lens), max_seq_len=max(lens),
        )
        shape = (2, total_blocks, _BLOCK_SIZE, self.num_kv_heads, self.head_dim)
        grad = torch.is_grad_enabled()
        # Written in place by each layer: under autograd it must not be a leaf.
        kv = [
            torch.zeros(shape, dtype=self.dtype, device=dev, requires_grad=grad).clone() if grad
            else torch.zeros(shape, dtype=self.dtype, device=dev)
            for _ in range(self.num_layers)
        ]
        ids = torch.tensor([t for s in sequences for t in s], dtype=torch.int64, device=dev)
        positions = torch.cat([torch.arange(n) for n in lens]).to(dev)
        with set_forward_context(ForwardContext(md, kv, self.backend, self.ops)):
            return torch.func.functional_call(self.model, params, (ids, positions), strict=False)

    def token_logprobs(
        self, hf_params: Mapping[str, torch.Tensor], sequences: Sequence[Sequence[int]],
        prompt_lens: Sequence[int], temperature: float = 1.0,
        sampling_masks: Sequence[Sequence[SamplingMask] | None] | None = None,
    ) -> list[torch.Tensor]:
        """For each sequence ``s`` with prompt length ``p``: fp32 ``logprob(s[i] | s[:i])`` for
        ``i in range(p, len(s))`` under ``log_softmax(logits / temperature)``, differentiable
        w.r.t. the trainer's parameters: bitwise what ``LLM(batch_invariant=True)`` returns
        while generating those tokens ("raw" logprobs at temperature 1, "scaled" at the
        sampling temperature; "processed" too when no filter truncated the distribution)
        and what its ``score()`` returns.

        ``sampling_masks`` (truncation replay): per sequence None or its
        ``CompletionOutput.sampling_masks`` (one ``SamplingMask`` per scored token, from an
        engine run with ``SamplingParams(return_sampling_mask=True)``). Each masked row's
        scaled logits get ``-inf`` outside the kept set (``kept_token_ids`` when given, else
        the scaled logits ``>= min_kept_logit``) before the log-softmax: the "processed"
        logprobs of the top-k / top-p / min-p distribution the engine sampled from, bitwise
        the engine's in exact mode (the same division, masking and log-softmax in fp32)."""
        _check(sequences, prompt_lens, temperature)
        _check_masks(sampling_masks, sequences, prompt_lens, self.vocab_size)
        params = self.engine_params(hf_params)
        hidden = self.hidden_states(params, sequences)
        rows, targets, starts = [], [], [0]
        offset = 0
        for s, p in zip(sequences, prompt_lens):
            n = len(s)
            rows.append(torch.arange(offset + p - 1, offset + n - 1))
            targets.extend(s[p:])
            starts.append(starts[-1] + n - p)
            offset += n
        idx = torch.cat(rows).to(self.device)
        logits = self.logits(params, hidden[idx]).float()
        if temperature != 1.0:
            # A device tensor, as the sampler's: CUDA divides by a Python scalar through its
            # reciprocal, which is not the same rounding.
            logits = logits / torch.full((1, 1), temperature, dtype=torch.float32, device=self.device)
        if sampling_masks is not None:
            logits = logits.masked_fill(~self._kept(logits.detach(), sampling_masks, starts), float("-inf"))
        logprobs = self.ops.log_softmax(logits)
        tok = logprobs.gather(-1, torch.tensor(targets, device=self.device)[:, None]).squeeze(-1)
        return [tok[starts[i] : starts[i + 1]] for i in range(len(sequences))]

    def _kept(self, scaled: torch.Tensor, masks: Sequence[Sequence[SamplingMask] | None], starts: list[int]) -> torch.Tensor:
        """[rows, vocab] bool: the tokens each row's mask keeps (every token where none)."""
        threshold = torch.full((scaled.shape[0],), float("-inf"), dtype=torch.float32)  # [rows]: -inf keeps all
        id_rows, id_cols = [], []
        for seq_masks, start in zip(masks, starts):
            for j, m in enumerate(seq_masks or ()):
                if m.kept_token_ids is None:
                    threshold[start + j] = m.min_kept_logit
                else:
                    threshold[start + j] = float("inf")  # nothing by threshold: exactly the ids
                    id_rows.extend([start + j] * len(m.kept_token_ids))
                    id_cols.extend(m.kept_token_ids)
        # fp32 as the engine reported it: min_kept_logit is an fp32 value in a Python float.
        kept = scaled >= threshold.to(self.device)[:, None]
        if id_rows:
            kept[torch.tensor(id_rows, device=self.device), torch.tensor(id_cols, device=self.device)] = True
        return kept

    def logits(self, params: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        """The engine's ``compute_logits`` over ``hidden`` [rows, hidden] with ``params``."""
        head = {n[len("lm_head."):]: t for n, t in params.items() if n.startswith("lm_head.")}
        if not head:  # tied: the head's weight is the embedding's
            head = {"weight": params["model.embed_tokens.weight"]}
        with set_forward_context(ForwardContext(None, [], self.backend, self.ops)):
            return torch.func.functional_call(self.model.lm_head, head, (hidden,))


def _whole_name(model: nn.Module, name: str) -> str | None:
    """The HF name of one tensor holding every shard of engine parameter ``name`` (the
    mapping's ``WHOLE`` entry: a transformers v5 module's ``experts.gate_up_proj``), or None."""
    for fused, parts in getattr(model, "packed_modules_mapping", {}).items():
        for hf_part, shard_id in parts:
            if shard_id == WHOLE and f".{fused}." in f".{name}.":
                return f".{name}.".replace(f".{fused}.", f".{hf_part}.")[1:-1]
    return None


def _assemble(parts: list[torch.Tensor], shard_ids: list[Any]) -> torch.Tensor:
    """One engine parameter from its HF tensors, laid out as its ``weight_loader`` lays
    them: a single tensor as is; shards concatenated along dim 0 in shard order (q, k, v;
    gate, up); a stacked parameter's shards ``(expert, part)`` concatenated per expert in
    shard order (gate, up) and stacked along a new dim 0 in expert order."""
    if len(parts) == 1 and not isinstance(shard_ids[0], tuple):
        return parts[0]
    if not isinstance(shard_ids[0], tuple):
        return torch.cat(parts, dim=0)
    per_expert: dict[int, list[torch.Tensor]] = {}
    for t, (expert, _) in zip(parts, shard_ids):
        per_expert.setdefault(expert, []).append(t)
    return torch.stack([torch.cat(per_expert[e]) if len(per_expert[e]) > 1 else per_expert[e][0]
                        for e in sorted(per_expert)])


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """An FSDP2 DTensor gathered (differentiably); anything else as is."""
    if t is not None and hasattr(t, "full_tensor"):
        return t.full_tensor()
    return t


def _check(sequences: Any, prompt_lens: Any, temperature: Any) -> None:
    if not isinstance(sequences, (list, tuple)) or not sequences or not all(
        isinstance(s, (list, tuple)) and s and all(isinstance(t, int) for t in s) for s in sequences
    ):
        raise InvalidRequestError("sequences", sequences, "a non-empty list of non-empty token-id lists")
    if not isinstance(prompt_lens, (list, tuple)) or len(prompt_lens) != len(sequences) or not all(
        isinstance(p, int) and 1 <= p <= len(s) for p, s in zip(prompt_lens, sequences)
    ):
        raise InvalidRequestError("prompt_lens", prompt_lens, "one int in [1, len(sequence)] per sequence")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise InvalidRequestError("temperature", temperature, "a float > 0")


def _check_masks(masks: Any, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int], vocab: int) -> None:
    if masks is None:
        return
    allowed = ("None, or per sequence None or a list of SamplingMask, one per scored token "
               "(len(sequence) - prompt_len), with token ids in [0, vocab)")
    if not isinstance(masks, (list, tuple)) or len(masks) != len(sequences):
        raise InvalidRequestError("sampling_masks", masks, allowed)
    for seq_masks, s, p in zip(masks, sequences, prompt_lens):
        if seq_masks is None:
            continue
        if not isinstance(seq_masks, (list, tuple)) or len(seq_masks) != len(s) - p or not all(
            isinstance(m, SamplingMask) and (m.kept_token_ids is None or all(
                isinstance(t, int) and 0 <= t < vocab for t in m.kept_token_ids))
            for m in seq_masks
        ):
            raise InvalidRequestError("sampling_masks", masks, allowed)
