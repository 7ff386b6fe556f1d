"""Child process of tests/test_triton_engine.py, run with TRITON_INTERPRET=1: the engine on
CPU with the Triton attention backend and op set (the GPU's kernels, interpreted), greedy
generation of a few model variants. ``python -m tests.helpers.triton_engine_case WORKDIR
MODE`` (MODE ``torch`` or ``triton``) prints one JSON line: per model, per prompt, the token
ids and logprobs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rollout import LLM, SamplingParams
from rollout.platforms.cpu import CpuPlatform
from tests.gpu.engine_cases import _dirs

MODELS = ("llama", "qwen3", "qwen2")  # qwen3: q/k norm fused into rotary; qwen2: qkv bias
# A 40-token prompt split into prefill chunks of 16 (max_num_batched_tokens), the same prompt
# twice (a prefix-cache hit), one-token and short prompts: mixed prefill/decode steps.
PROMPTS = [list(range(10, 50)), list(range(10, 50)), [9], [5, 6, 7]]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)


def main(work: str, mode: str) -> None:
    if mode == "triton":
        # This process only: the CPU platform asks for the GPU platform's kernels.
        CpuPlatform.attention_backend = lambda self: "triton"
        CpuPlatform.ops_backend = lambda self: "triton"
    dirs = _dirs(Path(work))
    out = {}
    for name in MODELS:
        llm = LLM(str(dirs[name]), dtype="float32", num_kv_blocks=32, max_num_seqs=4, max_num_batched_tokens=16)
        assert llm.stats().op_set == mode and llm.stats().attention_backend == ("triton" if mode == "triton" else "torch_sdpa")
        outs = llm.generate(PROMPTS, GREEDY)
        out[name] = [{"ids": list(o.outputs[0].token_ids), "lps": o.outputs[0].token_logprobs,
                      "cached": o.num_cached_tokens} for o in outs]
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
