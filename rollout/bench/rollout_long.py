"""rollout-long: an RL rollout. 256 prompts x 512 random tokens, n=8 samples each (the 8
share the prompt's prefill through the prefix cache), 4096 output tokens, temperature 1.0,
ignore_eos, one generate call. ``--scale f`` shrinks the prompt count, prompt length and
output length by f (n stays 8). Reported: output tok/s, ceiling and fraction."""

from __future__ import annotations

import random
from typing import Any

from rollout.bench import roofline, throughput
from rollout.bench.common import Options, build_llm, dispose, scaled
from rollout.bench.configs import hf_config
from rollout import SamplingParams

DEFAULT_MODEL = "qwen2.5-1.5b"
N = 8


def run(opts: Options, hw: roofline.Hardware) -> dict[str, Any]:
    model = opts.model or DEFAULT_MODEL
    num_prompts, prompt_len, output_len = scaled(256, opts.scale), scaled(512, opts.scale), scaled(4096, opts.scale)
    rng = random.Random(opts.seed)
    vocab = hf_config(model).vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(num_prompts)]
    llm = build_llm(opts, model, max_model_len=prompt_len + output_len + 1)
    throughput.warm_up(llm)
    params = SamplingParams(n=N, temperature=1.0, ignore_eos=True, max_tokens=output_len)
    seconds, num_tokens, gc = throughput.generate_timed(llm, prompts, [params] * num_prompts)
    res = throughput.result(llm, hw, seconds, num_tokens, [prompt_len] * (num_prompts * N),
                            [output_len] * (num_prompts * N), [prompt_len] * num_prompts)
    dispose(llm)
    row = {k: res[k] for k in ("seconds", "output_tokens", "tok_s", "ceiling_tok_s", "roofline_fraction")}
    return {"model": model, "num_prompts": num_prompts, "n": N, "prompt_len": prompt_len, "output_len": output_len,
            "rows": [row], "roofline_fraction": res["roofline_fraction"], "detail": {**res, "gc": gc}}
