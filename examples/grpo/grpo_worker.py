"""One GRPO rank, shared by both drivers (``grpo.py`` under torchrun, ``ray_grpo.py`` on
Ray): the trainer (fp32 HF SmolLM2, AdamW) and a colocated rollout ``LLM`` built from it,
in the same process, on the same device.

Each rank is a data-parallel replica (TP=1): it takes its own share of the step's prompts
(``split_for_dp``) and gradients are averaged with ``all_reduce``. One step, the
colocated cycle of ``trainers_integration.colocate``: wake the weights -> load the
trainer's current weights -> wake the KV cache -> generate ``n`` samples per prompt with
their logprobs (the old policy) -> score two of them with the engine -> sleep; then
group-normalised advantages, the trainer's forward on the same two sequences (the
engine-vs-trainer check: same weights, same tokens), and one clipped policy-gradient step
(+ optional k3 KL to a frozen reference). ``step`` returns this rank's metrics;
``examples.common.metrics.merge_metrics`` folds every rank's into the one ``METRICS`` line a
driver prints.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from typing import Any, TextIO

import torch
import torch.distributed as dist

from examples.common.arith_task import chat_prompts, make_problems, reward
from examples.common.smollm2 import load_smollm2
from examples.common.trainer_logprobs import MismatchMeter, padded, sequence_logprobs
from rollout import LLM, SamplingParams
from rollout.distributed import dp_rank_and_size, split_for_dp
from trainers_integration import iter_hf_weights, rollout_phase

CSV_HEADER = "step,reward,loss,rollout_probs_diff_max,rollout_probs_diff_mean,rollout_k3_kl"


def add_grpo_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of one GRPO run, the same for both drivers."""
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
    p.add_argument("--csv", type=str, default=None, help="write step,reward,... here (the driver / rank 0)")
    return p


class GRPOWorker:
    """The trainer and its colocated engine on one rank. Reads its rank from
    ``torch.distributed`` when a world is initialised (torchrun or a Ray ``WorkerGroup``),
    else runs alone. On CUDA both live on the current device."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world = dist.get_world_size() if distributed else 1
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        torch.manual_seed(args.seed)  # the trainer's own process: fine in an example

        self.tok, self.model = load_smollm2(self.device)
        self.ref = copy.deepcopy(self.model).eval().requires_grad_(False) if args.kl_coef > 0 else None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=0.0)
        self.probe_name, self.probe = next((n, p) for n, p in self.model.named_parameters() if "layers.0.self_attn.q_proj" in n)
        self.probe0 = self.probe.detach().clone()

        # TP=1: every rank is its own data-parallel replica (llm.parallel is None).
        self.llm = LLM(self.model, tokenizer=self.tok, max_model_len=512, num_kv_blocks=256, seed=args.seed + self.rank,
                       device=self.device)
        self.llm.sleep(1)  # the trainer holds the memory between rollouts
        _, self.dp_size = dp_rank_and_size(self.llm.parallel)
        self.params = SamplingParams(n=args.group_size, temperature=1.0, max_tokens=args.max_tokens, logprobs=0)

    def close(self) -> None:
        """Shut the engine down (a Ray WorkerGroup calls this before destroying the world;
        the torchrun script does too): its CUDA graphs must not outlive the NCCL world."""
        self.llm.shutdown()

    def step(self, step: int) -> dict[str, Any]:
        """One GRPO step on this rank's share; returns its metrics (plain numbers)."""
        args = self.args
        m: dict[str, Any] = {"step": step, "dp_size": self.dp_size, "probe": self.probe_name}
        problems = make_problems(random.Random(args.seed * 100003 + step), args.prompts_per_rank * self.dp_size, args.max_operand)
        mine = split_for_dp(problems, self.llm.parallel)
        prompts = chat_prompts(self.tok, mine)

        # ---- rollout: the colocated cycle with the trainer's current weights ----
        with rollout_phase(self.llm, iter_hf_weights(self.model), version=step) as cycle:
            t0 = time.perf_counter()
            outs = self.llm.generate(prompts, self.params)
            m["timing/rollout_s"] = time.perf_counter() - t0
            seqs, old_lp, rewards, advantages = _groups(outs, mine)
            check = seqs[:2]  # the engine scores a couple of sequences under the synced weights
            engine_lp = self.llm.score([p + c for p, c in check], prompt_lens=[len(p) for p, _ in check])
        m["timing/sync_s"], m["timing/wake_s"], m["timing/sleep_s"] = cycle["sync_s"], cycle["wake_s"], cycle["sleep_s"]
        m["memory/freed_bytes"] = cycle["bytes_freed"]
        num_tokens = sum(len(c) for _, c in seqs)
        m["rollout/tokens_per_s"] = num_tokens / m["timing/rollout_s"]
        m["rollout/num_tokens"] = num_tokens

        # ---- the trainer's forward on the same tokens, same weights: engine vs trainer ----
        trainer_lp = [lp[i, : len(c)].tolist() for _, lp, _ in sequence_logprobs(self.model, check, 2, grad=False)
                      for i, (_, c) in enumerate(check)]
        m["check/engine_vs_trainer_max_abs"] = max(
            (abs(x - y) for e, t in zip(engine_lp, trainer_lp) for x, y in zip(e, t)), default=0.0
        )

        # ---- train: one clipped policy-gradient step on the rollout ----
        t0 = time.perf_counter()
        loss, meter = self._train(seqs, old_lp, advantages, num_tokens)
        m["timing/train_s"] = time.perf_counter() - t0
        m.update(meter.metrics())
        m["check/weights_delta"] = float((self.probe.detach() - self.probe0).abs().max())
        m["loss"] = loss
        m["reward"] = sum(rewards) / len(rewards)
        return m

    def _train(self, seqs, old_lp, advantages, num_tokens: int) -> tuple[float, MismatchMeter]:
        args, model = self.args, self.model
        self.opt.zero_grad(set_to_none=True)
        adv = torch.tensor(advantages, device=self.device)
        meter = MismatchMeter()
        loss_sum = torch.zeros((), device=self.device)
        ref_lps = {}
        if self.ref is not None:
            for lo, lp, _ in sequence_logprobs(self.ref, seqs, args.micro_batch, grad=False):
                ref_lps[lo] = lp
        for lo, lp, mask in sequence_logprobs(model, seqs, args.micro_batch, grad=True):
            rows = slice(lo, lo + lp.shape[0])
            old = padded(old_lp[rows], lp.shape[1], self.device)
            a = adv[rows, None]
            meter.add(lp, old, mask)  # rollout vs trainer on the sampled tokens
            ratio = torch.exp(lp - old)
            surr = torch.minimum(ratio * a, ratio.clamp(1 - args.clip, 1 + args.clip) * a)
            loss = -(surr * mask)
            if self.ref is not None:
                log_ref = (ref_lps[lo] - lp) * mask
                loss = loss + args.kl_coef * (log_ref.exp() - log_ref - 1)
            loss = (loss * mask).sum() / num_tokens  # token mean over this rank's batch
            loss.backward()
            loss_sum = loss_sum + loss.detach()
        if self.world > 1:  # data parallel: average the gradients
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
        self.opt.step()
        return float(loss_sum), meter


def _groups(outs, problems) -> tuple[list, list, list, list]:
    """Per sample: (prompt ids, completion ids), rollout logprobs, reward, and the advantage
    normalised within its prompt's group."""
    seqs, old_lp, rewards, advantages = [], [], [], []
    for out, (_, answer) in zip(outs, problems):
        group = [reward(s.text, answer) for s in out.outputs]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / max(len(group) - 1, 1))
        for s, r in zip(out.outputs, group):
            seqs.append((list(out.prompt_token_ids), list(s.token_ids)))
            old_lp.append(list(s.token_logprobs))
            rewards.append(r)
            advantages.append((r - mean) / (std + 1e-6))
    return seqs, old_lp, rewards, advantages


class MetricsLog:
    """Prints one ``METRICS {json}`` line per step and, with a path, appends the CSV row."""

    def __init__(self, csv_path: str | None) -> None:
        self.csv: TextIO | None = None
        if csv_path:
            self.csv = open(csv_path, "w")  # noqa: SIM115 - held for the run, closed in close()
            self.csv.write(CSV_HEADER + "\n")

    def write(self, merged: dict[str, Any]) -> None:
        print("METRICS " + json.dumps(merged), flush=True)
        if self.csv:
            self.csv.write(f"{merged['step']},{merged['reward']},{merged['loss']},{merged['training/rollout_probs_diff_max']},"
                           f"{merged['training/rollout_probs_diff_mean']},{merged['training/rollout_k3_kl']}\n")
            self.csv.flush()

    def close(self) -> None:
        if self.csv:
            self.csv.close()
            self.csv = None
