"""decode-step: ms per steady-state decode step of a fixed batch at context 2048.

For each batch size B: B requests with random 2047-token prompts (no prefix shared),
temperature 1.0, ignore_eos, max_tokens beyond the run, through the request-level API
(``llm.add_request``, final outputs only, as ``generate``); ``llm.step()`` until every
prefill is done, a few warm-up steps, then ``steps`` timed ``llm.step()`` calls, each one
decode step of the whole batch (checked: B tokens per step, no preemption). Reported:
- ``step_ms``: wall time of the timed steps over their number (host clock, the device
  synchronized before and after the loop only: steps overlap, the host preparing step N+1
  while the device runs step N). ``call_ms_all``: the host time of each ``step()`` call.
- ``forward_ms``: median device span of the model forward (``ForwardTimer``), and
  ``host_overhead_ms`` = step_ms - forward_ms: sampling, and the host work (scheduling,
  input preparation, output processing) the overlap did not hide. Unavailable (None) when
  the forward is replayed from a CUDA graph; ``--enforce-eager`` shows the eager split.
- ``roofline_ms`` and ``roofline_fraction`` = roofline_ms / step_ms (see roofline.py), with
  the mean context actually attended (prefill steps interleave decodes of early requests).
- with ``--return-routes`` (MoE models): every request asks for its routed experts, so
  each step also copies them to the host (routing replay's cost: compare with a run
  without). The roofline's expert bytes are those of the experts B tokens reach
  (roofline.py).
- with ``--profile-steps N``: ``profile``, N more steps under the torch profiler, kernel
  time per step by category (kernel_profile.py); not part of the timings above.

Tensor parallelism (``--tensor-parallel-size K`` under ``torchrun``, see dist.py): every
rank builds its shard and runs the same loop on the same requests (the prompts come from
a seeded ``random.Random``; a digest is compared across ranks before the batch starts).
The ranks step in lockstep through the model's collectives; rank 0's timings are reported,
with ``step_ms_by_rank`` beside them, and ``steady`` holds on every rank. ``tok_s`` is one
model's (one TP group's); ``roofline_ms`` is one GPU's (roofline.py: the rank's shard).
"""

from __future__ import annotations

import hashlib
import random
import time
from typing import Any

from rollout.bench import kernel_profile, roofline
from rollout.bench.common import ForwardTimer, GcWatch, Options, build_llm, dispose, median, now, scaled
from rollout.bench.configs import hf_config
from rollout.bench.dist import check_same_on_all_ranks, gather, world_size
from rollout import SamplingParams

DEFAULT_MODEL = "qwen2.5-1.5b"
CONTEXT = 2048
WARMUP_STEPS = 5
STEPS = 50


def run(opts: Options, hw: roofline.Hardware) -> dict[str, Any]:
    model = opts.model or DEFAULT_MODEL
    context = scaled(CONTEXT, opts.scale, minimum=8)
    batches = opts.decode_batches()
    steps = scaled(STEPS, opts.scale, minimum=3)
    block_size = 16
    # Room for the decodes interleaved with prefill (at most one per prefill step).
    max_model_len = context + max(batches) * context // 4096 + WARMUP_STEPS + steps + 16
    blocks_per_seq = -(-(max_model_len + 1) // block_size)
    llm = build_llm(opts, model, max_model_len=max_model_len, max_num_seqs=max(batches),
                    block_size=block_size, num_kv_blocks=max(batches) * blocks_per_seq + 8)
    stats = roofline.ModelStats.from_model(llm.model, llm.hf_config, opts.tensor_parallel_size)
    vocab = hf_config(model).vocab_size
    if opts.return_routes and not stats.num_experts:
        raise ValueError(f"--return-routes needs a MoE model; {model} has no experts")
    rows = [_one_batch(llm, b, context, steps, vocab, stats, hw, random.Random(opts.seed + b), opts.profile_steps,
                       opts.return_routes)
            for b in batches]
    dispose(llm)
    world = world_size()
    if world > 1:  # after every timed loop: gather is a collective
        per_rank = gather([(r["step_ms"], r["steady"]) for r in rows])
        for i, r in enumerate(rows):
            r["step_ms_by_rank"] = [mine[i][0] for mine in per_rank]
            r["steady"] = all(mine[i][1] for mine in per_rank)
    return {
        "model": model, "context": context, "steps": steps, "rows": rows, "model_stats": stats.to_json(),
        "tensor_parallel_size": opts.tensor_parallel_size, "world_size": world,
        "roofline_fraction": {f"B={r['batch']}": r["roofline_fraction"] for r in rows},
    }



def _one_batch(llm, batch: int, context: int, steps: int, vocab: int, stats: roofline.ModelStats,
               hw: roofline.Hardware, rng: random.Random, profile_steps: int = 0,
               return_routes: bool = False) -> dict[str, Any]:
    device = llm.device
    # FINAL_ONLY, as generate: a step builds no outputs for requests still running.
    params = SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=llm.max_model_len - (context - 1),
                            detokenize=False, output_kind="final_only", return_routed_experts=return_routes)
    req_ids = [f"decode-b{batch}-{i}" for i in range(batch)]
    prompts = [[rng.randrange(vocab) for _ in range(context - 1)] for _ in req_ids]
    # The ranks of a TP group must be given the same requests.
    check_same_on_all_ranks(f"B={batch} prompts", hashlib.sha256(repr(prompts).encode()).hexdigest())
    for rid, prompt in zip(req_ids, prompts):
        llm.add_request(prompt, params, request_id=rid)
    reqs = [llm.worker.scheduler.requests[rid] for rid in req_ids]  # engine state, read only
    while any(r.num_output_tokens == 0 for r in reqs):
        llm.step()
    for _ in range(WARMUP_STEPS):
        llm.step()
    timer = ForwardTimer(llm.model, device)
    tokens_before = sum(r.num_output_tokens for r in reqs)
    total_context = sum(r.num_tokens for r in reqs)  # seq lens of the first timed step
    # Steps overlap (the host prepares step N+1 while step N runs), so the device is
    # synchronized only around the whole loop; per-call host times are kept for reference.
    walls = []
    with GcWatch() as gc_watch:
        t_start = now(device)
        for _ in range(steps):
            t0 = time.perf_counter()
            llm.step()
            walls.append((time.perf_counter() - t0) * 1e3)
        loop_ms = (now(device) - t_start) * 1e3
    spans = timer.spans_ms()
    timer.close()
    steady = sum(r.num_output_tokens for r in reqs) - tokens_before == batch * steps and all(
        r.num_preemptions == 0 for r in reqs
    )
    prof = kernel_profile.profile_steps(llm.step, profile_steps, device) if profile_steps else None
    llm.abort(req_ids)
    step_ms = loop_ms / steps
    mean_context = total_context + batch * (steps - 1) / 2
    cost = roofline.decode_step(stats, batch, round(mean_context))
    forward_ms = median(spans) if len(spans) == steps else None
    return {
        "batch": batch,
        "mean_context": mean_context / batch,
        "step_ms": step_ms,
        "tok_s": batch / step_ms * 1e3,
        "forward_ms": forward_ms,
        "host_overhead_ms": None if forward_ms is None else step_ms - forward_ms,
        "roofline_ms": cost.seconds(hw) * 1e3,
        "bound": cost.bound(hw),
        "roofline_fraction": cost.seconds(hw) * 1e3 / step_ms,
        "steady": steady,
        "call_ms_all": walls,
        "gc": gc_watch.to_json(),
        **({"profile": prof} if prof is not None else {}),
    }
