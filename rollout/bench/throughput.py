"""Timing one ``llm.generate`` call of a whole workload and comparing it with the roofline
ceiling of the same sequences (shared by nano-bench, rollout-long and peer)."""

from __future__ import annotations

from typing import Any

from rollout.bench import roofline
from rollout.bench.common import GcWatch, now
from rollout import SamplingParams


def warm_up(llm) -> None:
    """One short request first, so lazy set-up (kernel compilation, graphs) is not timed."""
    llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True))


def generate_timed(llm, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[float, int, dict[str, Any]]:
    """(seconds, output tokens, garbage collections during it) of one generate call over the
    whole workload."""
    with GcWatch() as gc_watch:
        t0 = now(llm.device)
        outs = llm.generate(prompts, params)
        seconds = now(llm.device) - t0
    return seconds, sum(len(c.token_ids) for o in outs for c in o.outputs), gc_watch.to_json()


def result(llm, hw: roofline.Hardware, seconds: float, num_tokens: int, prompt_lens: list[int],
           output_lens: list[int], distinct_prompt_lens: list[int]) -> dict[str, Any]:
    """Measured tok/s next to the ideal engine's (same sequences, same KV capacity)."""
    stats = roofline.ModelStats.from_model(llm.model, llm.hf_config)
    sched = llm.config.scheduler
    ideal = roofline.ideal_generation_time(
        stats, hw, prompt_lens, output_lens, distinct_prompt_lens=distinct_prompt_lens,
        max_num_seqs=sched.max_num_seqs, kv_capacity_tokens=llm.stats().kv_capacity_tokens,
        max_batched_tokens=sched.max_num_batched_tokens,
    )
    return {
        "seconds": seconds,
        "output_tokens": num_tokens,
        "expected_output_tokens": sum(output_lens),
        "tok_s": num_tokens / seconds,
        "ceiling_tok_s": ideal["ceiling_tok_s"],
        "roofline_fraction": ideal["total_s"] / seconds,
        "ideal": ideal,
        "kv_capacity_tokens": llm.stats().kv_capacity_tokens,
        "model_stats": stats.to_json(),
    }
