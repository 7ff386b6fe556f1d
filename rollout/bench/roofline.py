"""The roofline every result is compared with, measured on the same device in the same run.

Hardware (``measure_hardware``):
- ``copy_bw``: device-to-device copy of a large buffer (1 GiB on GPU), counting the bytes
  read plus the bytes written, median of several copies. The attainable memory bandwidth.
- ``matmul_rate``: a bf16 (the run's dtype) 8192^3 matmul of random data, 2*n^3 FLOPs,
  median of several. The attainable dense FLOP rate.
- ``h2d_bw`` / ``d2h_bw`` (GPU only): a copy of a large pinned host buffer to / from the
  device: the floor of sleep(level=1) (device -> host) and its wake (host -> device).

Model (``ModelStats``), from the engine's parameters: W = bytes of every distinct parameter
that a step reads (an untied input embedding is only gathered, B rows, so it is left out),
P = the parameters a token is multiplied with (the same set), KV = bytes of K and V per
token = 2 * layers * kv_heads * head_dim * itemsize.

One decode step of B sequences attending to C context tokens in total (sum of seq lens):
    bytes = W + KV * C (KV read) + KV * B (KV write) + B * vocab * itemsize (logits write)
    flops = 2 * P * B + 4 * layers * heads * head_dim * C (QK^T and PV)
    t     = max(bytes / copy_bw, flops / matmul_rate)
A prefill of prompts of lengths l_i (T tokens, steps of at most ``max_batched_tokens``):
    bytes = W * ceil(T / max_batched_tokens) + KV * T
    flops = 2 * (P - P_lm_head) * T + 2 * P_lm_head * num_prompts + 2 * layers * heads * head_dim * sum(l_i^2)
A throughput workload (``ideal_generation_time``): one prefill of the distinct prompts, then
decode steps of an ideal scheduler that knows every output length: sequences start in order
while fewer than ``max_num_seqs`` run and their full lengths fit the engine's KV capacity;
each step decodes one token of every running sequence at the t above. The ceiling is
output tokens / that time; a workload's fraction is ceiling time / measured time.
Activations and norms are not counted (small next to weights and KV at these sizes).

Mixture of experts: W holds every expert, but a step of T tokens reads only the experts
they route to: W_step = W - X * (1 - a(T)) with X the experts' bytes and a(T) = 1 - (1 -
k/E)^T the expected fraction of a layer's E experts that T tokens picking k each reach
(uniform routing, which random weights approach), and a token multiplies with P - P_X *
(1 - k/E) parameters. Quantized weights count their own bytes (fp8: 1 per element plus the
fp32 block scales); the activations, KV and logits stay in the run's dtype, and the FLOP
rate stays the run's dtype's (a conservative floor for an fp8 GEMM that is compute-bound).

Tensor parallelism over K ranks (``ModelStats.from_model(..., tensor_parallel_size=K)``,
built from one rank's shard): every quantity is that rank's, i.e. one GPU's, and the
formulas above stay as they are. W and P = the shard's parameters: 1/K of every linear
layer, ceil(vocab / K) rows of the LM head (and of an untied embedding, left out as
above), the norms replicated whole (small), so W is slightly above W_full / K; with
K > kv_heads the k/v projections hold one kv head, replicated on K / kv_heads ranks.
KV = 2 * layers * kv_heads_r * head_dim * itemsize with kv_heads_r the rank's kv heads
(kv_heads / K, or 1 when K > kv_heads: then KV shrinks only by kv_heads, not K); heads
= heads / K (attention flops). The logits term keeps the full vocab: the slices are
all-gathered, so every rank writes B * vocab. Not counted: the communication, per step
2 * layers + 1 all-reduces of B * hidden * itemsize (attention and MLP outputs, embedding)
and one all-gather of the logits; small in bytes at decode, latency-bound, so the gap
between this roofline and a TP step is mostly theirs. K = 1 gives the numbers above.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Hardware:
    copy_bw: float  # bytes/s, read + write
    matmul_rate: float  # FLOP/s in the run's dtype
    h2d_bw: float | None = None  # bytes/s from pinned host memory
    d2h_bw: float | None = None  # bytes/s into pinned host memory
    matmul_n: int = 8192

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "copy_GBps": self.copy_bw / 1e9, "matmul_TFLOPs": self.matmul_rate / 1e12}


def _median_seconds(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_hardware(device: torch.device, dtype: torch.dtype) -> Hardware:
    """Copy bandwidth and matmul rate (and pinned-copy bandwidths on GPU); ~2 s on an H100.
    Off GPU the sizes are small: the numbers only exercise the formulas."""
    gpu = device.type == "cuda"
    nbytes, n, reps = (1 << 30, 8192, 10) if gpu else (32 << 20, 256, 3)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_bw = 2 * nbytes / _median_seconds(lambda: dst.copy_(src), device, reps)
    a = torch.randn(n, n, generator=gen, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device, dtype=torch.float32).to(dtype)
    matmul_rate = 2 * n**3 / _median_seconds(lambda: torch.mm(a, b), device, reps)
    h2d = d2h = None
    if gpu:
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        h2d = nbytes / _median_seconds(lambda: src.copy_(host, non_blocking=True), device, 5)
        d2h = nbytes / _median_seconds(lambda: host.copy_(src, non_blocking=True), device, 5)
        del host
    del src, dst, a, b
    if gpu:
        torch.cuda.empty_cache()  # the engine sizes its KV cache from free memory
    return Hardware(copy_bw, matmul_rate, h2d, d2h, n)


@dataclass(frozen=True)
class ModelStats:
    weight_bytes: int  # W: read by every step (all experts of a MoE model; see expert_bytes)
    matmul_params: int  # P
    lm_head_params: int
    kv_bytes_per_token: int
    layers: int
    heads: int
    head_dim: int
    vocab: int  # the full vocab (logits are gathered whole on every rank)
    itemsize: int  # of the activations, KV and logits (the run's dtype)
    tensor_parallel_size: int = 1  # K: the fields above are one rank's of K
    # MoE: the routed experts' share of W and P (every MoE layer's stacked experts, with
    # their fp8 scales), and how many experts a layer has and a token picks.
    expert_bytes: int = 0
    expert_params: int = 0
    num_experts: int = 0
    top_k: int = 0

    @classmethod
    def from_model(cls, model: torch.nn.Module, hf_config: Any, tensor_parallel_size: int = 1) -> ModelStats:
        """The stats of ``model``, this rank's shard of a model over ``tensor_parallel_size``
        ranks (the whole model for 1); see the module docstring. Bytes are each parameter's
        own (an fp8 weight 1 per element, its fp32 scales 4)."""
        k = tensor_parallel_size
        named = {id(p): (n, p) for n, p in model.named_parameters()}.values()
        numel = sum(p.numel() for n, p in named if not n.endswith("_scale_inv"))  # fp8 scales multiply nothing
        nbytes = sum(p.numel() * p.element_size() for _, p in named)
        embedding = model.get_parameter("model.embed_tokens.weight")
        itemsize = embedding.element_size()
        vocab, hidden = hf_config.vocab_size, hf_config.hidden_size
        vocab_rows = -(-vocab // k)  # the rank's vocab-parallel slice, padded (the whole vocab for 1)
        untied_embedding = 0 if getattr(hf_config, "tie_word_embeddings", False) else vocab_rows * hidden
        experts = [p for n, p in named if ".experts." in n]  # with their scales
        heads = hf_config.num_attention_heads
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
        # The model's own count when it has one (the engine sizes its KV cache by it): with
        # K > kv heads every rank holds one, replicated.
        kv_heads = getattr(model, "num_kv_heads", None) or max(1, kv_heads // k)
        head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
        layers = hf_config.num_hidden_layers
        return cls(
            weight_bytes=nbytes - untied_embedding * itemsize, matmul_params=numel - untied_embedding,
            lm_head_params=vocab_rows * hidden, kv_bytes_per_token=2 * layers * kv_heads * head_dim * itemsize,
            layers=layers, heads=heads // k, head_dim=head_dim, vocab=vocab, itemsize=itemsize,
            tensor_parallel_size=k,
            expert_bytes=sum(p.numel() * p.element_size() for p in experts),
            expert_params=sum(p.numel() for n, p in named if ".experts." in n and not n.endswith("_scale_inv")),
            num_experts=getattr(hf_config, "num_experts", 0) if experts else 0,
            top_k=getattr(hf_config, "num_experts_per_tok", 0) if experts else 0,
        )

    def active_expert_fraction(self, tokens: int) -> float:
        """The expected fraction of a MoE layer's experts that ``tokens`` tokens route to,
        each picking ``top_k`` of ``num_experts`` uniformly (random weights route near
        uniformly; a trained router's skew only lowers it): 1 - (1 - k/E)^T. 1 without experts."""
        if not self.num_experts:
            return 1.0
        return 1.0 - (1.0 - self.top_k / self.num_experts) ** tokens

    def step_weight_bytes(self, tokens: int) -> float:
        """W a step of ``tokens`` tokens reads: every dense weight, the experts it routes to."""
        return self.weight_bytes - self.expert_bytes * (1.0 - self.active_expert_fraction(tokens))

    def token_params(self) -> float:
        """The parameters one token is multiplied with: P less the experts it does not pick."""
        if not self.num_experts:
            return self.matmul_params
        return self.matmul_params - self.expert_params * (1.0 - self.top_k / self.num_experts)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Cost:
    bytes: float
    flops: float

    def seconds(self, hw: Hardware) -> float:
        return max(self.bytes / hw.copy_bw, self.flops / hw.matmul_rate)

    def bound(self, hw: Hardware) -> str:
        return "memory" if self.bytes / hw.copy_bw >= self.flops / hw.matmul_rate else "compute"


def decode_step(m: ModelStats, batch: int, total_context: int) -> Cost:
    attn = 4 * m.layers * m.heads * m.head_dim
    return Cost(
        bytes=m.step_weight_bytes(batch) + m.kv_bytes_per_token * (total_context + batch)
        + batch * m.vocab * m.itemsize,
        flops=2 * m.token_params() * batch + attn * total_context,
    )


def prefill(m: ModelStats, prompt_lens: list[int], max_batched_tokens: int) -> Cost:
    total = sum(prompt_lens)
    steps = max(1, math.ceil(total / max_batched_tokens))
    attn = 2 * m.layers * m.heads * m.head_dim * sum(n * n for n in prompt_lens)
    return Cost(
        bytes=m.step_weight_bytes(min(total, max_batched_tokens)) * steps + m.kv_bytes_per_token * total,
        flops=2 * (m.token_params() - m.lm_head_params) * total + 2 * m.lm_head_params * len(prompt_lens) + attn,
    )


def ideal_generation_time(
    m: ModelStats, hw: Hardware, prompt_lens: list[int], output_lens: list[int], *, distinct_prompt_lens: list[int],
    max_num_seqs: int, kv_capacity_tokens: int, max_batched_tokens: int,
) -> dict[str, float]:
    """Seconds an ideal engine needs for these sequences (see the module docstring)."""
    t_prefill = prefill(m, distinct_prompt_lens, max_batched_tokens).seconds(hw)
    t_decode, steps = 0.0, 0
    running: list[tuple[int, int]] = []  # heap of (step after its last decode, index)
    batch = context = reserved = 0  # running sequences, sum of their seq lens, of their full lengths
    nxt, n = 0, len(prompt_lens)
    while nxt < n or running:
        while running and running[0][0] <= steps:
            _, i = heapq.heappop(running)
            batch -= 1
            context -= prompt_lens[i] + output_lens[i]
            reserved -= prompt_lens[i] + output_lens[i]
        while nxt < n and batch < max_num_seqs and (
            batch == 0 or reserved + prompt_lens[nxt] + output_lens[nxt] <= kv_capacity_tokens
        ):
            # The prefill gave the first token; each other token takes one decode step.
            if output_lens[nxt] > 1:
                heapq.heappush(running, (steps + output_lens[nxt] - 1, nxt))
                batch, context = batch + 1, context + prompt_lens[nxt] + 1
                reserved += prompt_lens[nxt] + output_lens[nxt]
            nxt += 1
        if batch == 0:
            continue
        t_decode += decode_step(m, batch, context).seconds(hw)
        context += batch
        steps += 1
    total = t_prefill + t_decode
    return {"prefill_s": t_prefill, "decode_s": t_decode, "decode_steps": steps, "total_s": total,
            "ceiling_tok_s": sum(output_lens) / total if total > 0 else float("inf")}
