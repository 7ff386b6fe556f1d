"""peer: one workload through rollout and through HF transformers ``generate``, in the
same process and run, and the ratio rollout / HF.

HF runs first (then is freed, so rollout sizes its KV cache as usual): a model built with
``AutoModelForCausalLM.from_config`` from the same config (random weights), same dtype and
device, ``do_sample=True``, temperature 1.0 with no top-k/top-p, all prompts in one batch,
left-padded, ``min_new_tokens = max_new_tokens`` so no row stops early.
- nano-bench: HF generates max(output lengths) tokens for every row (one batch cannot stop
  rows at different lengths); ``hf_tok_s`` counts every token it generated (generous to HF)
  and the ratio uses it; ``hf_useful_tok_s`` counts only the workload's tokens.
- decode-step: ms per HF decode step = (time of generate(1 + k tokens) - time of
  generate(1 token)) / k, the prefill cancelling out; the ratio is hf_ms / rollout_ms.
"""

from __future__ import annotations

import gc
import random
from typing import Any

import torch

from rollout.bench import decode_step, nano_bench, roofline
from rollout.bench.common import Options, build_llm, dispose, now, scaled
from rollout.bench.configs import hf_config

WORKLOADS = ("nano-bench", "decode-step")


def run(opts: Options, hw: roofline.Hardware) -> dict[str, Any]:
    if opts.peer_workload == "decode-step":
        return _decode_step(opts, hw)
    if opts.peer_workload == "nano-bench":
        return _nano_bench(opts, hw)
    raise ValueError(f"peer workload must be one of {WORKLOADS}, got {opts.peer_workload!r}")


def _nano_bench(opts: Options, hw: roofline.Hardware) -> dict[str, Any]:
    model = opts.model or nano_bench.DEFAULT_MODEL
    prompts, output_lens = nano_bench.workload(opts.scale, opts.seed, hf_config(model).vocab_size)
    hf = _HF(model, opts)
    hf.generate([[1, 2, 3, 4]], 4)  # warm-up
    max_new = max(output_lens)
    hf_s = hf.generate(prompts, max_new)
    hf.close()
    llm = build_llm(opts, model, max_model_len=nano_bench.max_model_len(opts.scale))
    res = nano_bench.run_on(llm, hw, prompts, output_lens)
    dispose(llm)
    hf_tok_s = len(prompts) * max_new / hf_s
    row = {"rollout_tok_s": res["tok_s"], "hf_tok_s": hf_tok_s, "hf_useful_tok_s": sum(output_lens) / hf_s,
           "ratio": res["tok_s"] / hf_tok_s, "rollout_s": res["seconds"], "hf_s": hf_s}
    return {"model": model, "peer_workload": "nano-bench", "num_seqs": len(prompts), "rows": [row],
            "ratio": row["ratio"], "roofline_fraction": res["roofline_fraction"], "detail": res}


def _decode_step(opts: Options, hw: roofline.Hardware) -> dict[str, Any]:
    model = opts.model or decode_step.DEFAULT_MODEL
    batches = opts.decode_batches()  # before any work: raises if --scale merges batches
    context = scaled(decode_step.CONTEXT, opts.scale, minimum=8)
    steps = scaled(decode_step.STEPS, opts.scale, minimum=3)
    vocab = hf_config(model).vocab_size
    hf = _HF(model, opts)
    hf.generate([[1, 2, 3, 4]], 4)
    hf_ms = {}
    for b in batches:
        rng = random.Random(opts.seed + b)
        prompts = [[rng.randrange(vocab) for _ in range(context - 1)] for _ in range(b)]
        t1 = hf.generate(prompts, 1)
        tk = hf.generate(prompts, 1 + steps)
        hf_ms[b] = max(tk - t1, 0.0) / steps * 1e3
    hf.close()
    res = decode_step.run(opts, hw)
    rows = [{"batch": r["batch"], "rollout_step_ms": r["step_ms"], "hf_step_ms": hf_ms[r["batch"]],
             "ratio": hf_ms[r["batch"]] / r["step_ms"]} for r in res["rows"]]
    return {"model": model, "peer_workload": "decode-step", "context": context, "rows": rows,
            "ratio": {f"B={r['batch']}": r["ratio"] for r in rows}, "roofline_fraction": res["roofline_fraction"],
            "detail": res}


class _HF:
    def __init__(self, model: str, opts: Options) -> None:
        from transformers import AutoModelForCausalLM

        self.device = opts.torch_device
        with torch.device(self.device):
            self.model = AutoModelForCausalLM.from_config(hf_config(model), dtype=opts.torch_dtype).eval()
        self.eos = hf_config(model).eos_token_id

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> float:
        """Seconds for one batched generate call (left padding with id 0)."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        t0 = now(self.device)
        with torch.no_grad():
            self.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=0,
                eos_token_id=self.eos,
            )
        return now(self.device) - t0

    def close(self) -> None:
        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
