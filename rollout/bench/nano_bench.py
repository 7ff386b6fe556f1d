"""nano-bench: the nano-vllm README workload. 256 sequences, prompt and output lengths
uniform in [100, 1024] (random.Random(0); prompts drawn first, then outputs, as nano-vllm
does), random token ids, temperature 1.0, ignore_eos, all submitted in one generate call.
Reported: output tok/s, the roofline ceiling tok/s of the same sequences and the fraction."""

from __future__ import annotations

import random
from typing import Any

from rollout.bench import roofline, throughput
from rollout.bench.common import Options, build_llm, dispose, scaled
from rollout.bench.configs import hf_config
from rollout import SamplingParams

DEFAULT_MODEL = "qwen3-0.6b"


def workload(scale: float, seed: int, vocab: int) -> tuple[list[list[int]], list[int]]:
    """(prompts, output lengths)."""
    rng = random.Random(seed)
    num_seqs = scaled(256, scale)
    lo, hi = scaled(100, scale), scaled(1024, scale)
    max_id = min(10000, vocab - 1)
    prompts = [[rng.randint(0, max_id) for _ in range(rng.randint(lo, hi))] for _ in range(num_seqs)]
    return prompts, [rng.randint(lo, hi) for _ in range(num_seqs)]


def max_model_len(scale: float) -> int:
    return 2 * scaled(1024, scale) + 1


def run(opts: Options, hw: roofline.Hardware) -> dict[str, Any]:
    model = opts.model or DEFAULT_MODEL
    prompts, output_lens = workload(opts.scale, opts.seed, hf_config(model).vocab_size)
    llm = build_llm(opts, model, max_model_len=max_model_len(opts.scale))
    res = run_on(llm, hw, prompts, output_lens)
    dispose(llm)
    return {"model": model, "num_seqs": len(prompts), "rows": [_row(res)], "roofline_fraction": res["roofline_fraction"],
            "detail": res}


def run_on(llm, hw: roofline.Hardware, prompts: list[list[int]], output_lens: list[int]) -> dict[str, Any]:
    throughput.warm_up(llm)
    params = [SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=n) for n in output_lens]
    seconds, num_tokens, gc = throughput.generate_timed(llm, prompts, params)
    lens = [len(p) for p in prompts]
    return {**throughput.result(llm, hw, seconds, num_tokens, lens, output_lens, lens), "gc": gc}


def _row(res: dict[str, Any]) -> dict[str, Any]:
    keys = ("seconds", "output_tokens", "tok_s", "ceiling_tok_s", "roofline_fraction")
    return {k: res[k] for k in keys}
