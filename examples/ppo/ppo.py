"""PPO on short arithmetic with SmolLM2-135M-Instruct: the HF policy with a value head
trains, a colocated rollout ``LLM`` in the same process samples.

    torchrun --nproc-per-node 2 examples/ppo/ppo.py --steps 20        # CPU, gloo, DP=2
    python examples/ppo/ppo.py --steps 2                               # one process
    torchrun --nproc-per-node 1 examples/ppo/ppo.py --device cuda     # GPU, NCCL

Each rank holds the trainer (fp32 HF policy + value head) and its own engine (TP=1): the
ranks are data-parallel replicas that take different prompts (``split_for_dp``) and average
their gradients with ``all_reduce``. One step, through the colocated cycle
(``trainers_integration.colocate``): wake the engine's weights -> ``update_weights`` with the
trainer's current ones -> wake the KV cache -> generate ``n`` samples per prompt with
logprobs (the old policy) -> check the engine's ``score`` against the trainer's forward ->
sleep. Then, with the engine's memory handed back: one no-grad pass for the trainer's
logprobs (the rollout-vs-trainer mismatch, before any update), the old values and the
reference logprobs -> per-token rewards (the score on the last token, minus ``kl_coef`` x
(old - reference) on every token) -> GAE -> advantages whitened over all ranks -> K epochs
of minibatches, each one optimizer step on the clipped policy loss + ``vf_coef`` x the
clipped value loss.

The critic is a linear head (hidden -> 1, started at zero) on the policy's last hidden
state, the one the LM head reads: one forward gives both logprobs and values, so PPO costs
no second 135M model to hold, run and step, and nothing extra to sync to the engine (the
head is not part of the HF model). The trunk is shared: the value loss, scaled by
``vf_coef``, also trains it, but through the head's weights, which start at zero, so the
critic reaches the policy only as it learns; the head gets its own learning rate
(``--critic-lr``) since it starts from nothing while the trunk is pretrained.

The engine runs in the trainer's fp32 by default (``--engine-dtype``), so the rollout
logprobs are the trainer's to ~1e-5 and the first minibatch's ratio is 1; it sleeps at level
2 between rollouts (``--sleep-level``): every cycle loads all the weights anyway, so no
host copy of them is kept.

Rank 0 prints one ``METRICS {json}`` line per step: timings, tokens/s, memory freed, reward,
the losses, verl's names for the rollout-vs-trainer mismatch on the sampled tokens, the
engine-vs-trainer check after the sync, and the PPO statistics.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import pathlib
import random
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repository root: examples.common

from examples.common.arith_task import chat_prompts, make_problems, reward
from examples.common.metrics import SAME_KEYS, merge_metrics
from examples.common.ppo_losses import (
    gae,
    masked_mean,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from examples.common.smollm2 import load_smollm2
from examples.common.trainer_logprobs import MismatchMeter, padded, sequence_logprobs
from rollout import LLM, SamplingParams
from rollout.distributed import dp_rank_and_size, gather_from_dp, split_for_dp
from trainers_integration.colocate import begin_rollout, end_rollout
from trainers_integration.hf_module import iter_hf_weights


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts-per-rank", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt (n); not --n: torchrun takes that for a prefix of its own options")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-5, help="policy (trunk and LM head)")
    p.add_argument("--critic-lr", type=float, default=1e-4, help="value head")
    p.add_argument("--ppo-epochs", type=int, default=2, help="passes over the step's rollout")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per minibatch: one forward/backward and one optimizer step")
    p.add_argument("--clip", type=float, default=0.2, help="policy ratio clip epsilon")
    p.add_argument("--value-clip", type=float, default=0.2, help="how far a value may move from the old one before its loss is clipped")
    p.add_argument("--vf-coef", type=float, default=0.5, help="weight of the value loss")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    p.add_argument("--kl-coef", type=float, default=0.0, help="> 0: per-token KL penalty to a frozen reference, in the rewards")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-operand", type=int, default=9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=str, default="cpu", help="cpu (gloo) or cuda (NCCL, cuda:LOCAL_RANK)")
    p.add_argument("--engine-dtype", type=str, default="auto", help="auto: the trainer's fp32; bfloat16 is faster, with a larger mismatch")
    p.add_argument("--num-kv-blocks", type=int, default=512, help="engine KV cache, blocks of 16 tokens")
    p.add_argument("--sleep-level", type=int, default=2, choices=(1, 2),
                   help="2: drop the engine's weights too (every step loads all of them again)")
    p.add_argument("--csv", type=str, default=None, help="write every step's metrics here (rank 0)")
    return p.parse_args()


def average_gradients(params: list[torch.nn.Parameter], world: int, bucket_numel: int = 1 << 24) -> None:
    """Data parallel: every gradient replaced by its mean over the ranks, a bucket of about
    ``bucket_numel`` elements per ``all_reduce``. Every rank passes the same parameters."""
    bucket: list[torch.Tensor] = []
    numel = 0
    for p in params:
        if p.grad is None:
            continue
        bucket.append(p.grad)
        numel += p.grad.numel()
        if numel >= bucket_numel:
            _reduce_bucket(bucket, world)
            bucket, numel = [], 0
    if bucket:
        _reduce_bucket(bucket, world)


def _reduce_bucket(grads: list[torch.Tensor], world: int) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def to_padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Micro-batches of [b, t_i] rows into one [B, width] tensor, zero-padded."""
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1])) for r in rows])


@torch.no_grad()
def prepare(model, head, ref, seqs, old_lp, scores, args, distributed) -> tuple[dict, MismatchMeter]:
    """The no-grad pass before any update: the trainer's logprobs (the mismatch meter), the
    old values and the reference logprobs; then rewards, GAE and whitened advantages.
    Returns [N, T] tensors (T the longest completion of this rank) and the meter."""
    device = next(model.parameters()).device
    width = max(len(c) for _, c in seqs)
    meter = MismatchMeter()
    values, masks, ref_rows = [], [], []
    for lo, lp, mask, hidden in sequence_logprobs(model, seqs, args.micro_batch, grad=False, hidden=True):
        meter.add(lp, padded(old_lp[lo : lo + lp.shape[0]], lp.shape[1], device), mask)
        values.append(head(hidden).squeeze(-1) * mask)
        masks.append(mask)
    if ref is not None:
        ref_rows = [lp for _, lp, _ in sequence_logprobs(ref, seqs, args.micro_batch, grad=False)]
    batch = {"old_lp": padded(old_lp, width, device), "values": to_padded(values, width),
             "mask": to_padded(masks, width)}
    kl = None
    if ref is not None:
        kl = (batch["old_lp"] - to_padded(ref_rows, width)) * batch["mask"]  # k1, per token
    rewards = token_rewards(torch.tensor(scores, device=device), batch["mask"], kl, args.kl_coef)
    advantages, batch["returns"] = gae(rewards, batch["values"], batch["mask"], args.gamma, args.lam)
    batch["advantages"] = whiten(advantages, batch["mask"], distributed)
    batch["kl_ref"] = 0.0 if kl is None else float(masked_mean(kl, batch["mask"]))
    return batch, meter


def ppo_update(model, head, opt, seqs, batch, args, world, gen) -> dict[str, float]:
    """K epochs over shuffled minibatches of this rank's sequences, one optimizer step each
    (gradients averaged over the ranks). Returns the losses and statistics, averaged."""
    params = [p for group in opt.param_groups for p in group["params"]]
    sums: dict[str, float] = {}
    num_updates = 0
    for _ in range(args.ppo_epochs):
        order = torch.randperm(len(seqs), generator=gen).tolist()
        for lo in range(0, len(seqs), args.micro_batch):
            idx = order[lo : lo + args.micro_batch]
            _, lp, mask, hidden = next(sequence_logprobs(model, [seqs[i] for i in idx], len(idx), grad=True, hidden=True))
            rows = torch.tensor(idx, device=lp.device)
            mine = {k: batch[k][rows, : lp.shape[1]] for k in ("old_lp", "values", "returns", "advantages")}
            p_loss, stats = policy_loss(lp, mine["old_lp"], mine["advantages"], mask, args.clip)
            v_loss = value_loss(head(hidden).squeeze(-1), mine["values"], mine["returns"], mask, args.value_clip)
            loss = p_loss + args.vf_coef * v_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                average_gradients(params, world)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            opt.step()
            stats.update(loss=float(loss.detach()), policy_loss=float(p_loss.detach()),
                         value_loss=float(v_loss.detach()), grad_norm=float(grad_norm))
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            num_updates += 1
    return {k: v / num_updates for k, v in sums.items()}


def rollout(llm, model, tok, problems, params, step, args) -> tuple[list, list, list, dict]:
    """One colocated cycle: wake the weights -> sync the trainer's -> wake the KV cache ->
    generate (and score a couple of samples with the engine) -> sleep; the synced weights
    are version ``step`` (the policy of this step's samples). Returns the sampled
    (prompt_ids, completion_ids), their rollout logprobs, their scores and the metrics."""
    m: dict = {}
    cycle = begin_rollout(llm, iter_hf_weights(model), version=step, level=args.sleep_level)
    try:
        t0 = time.perf_counter()
        outs = llm.generate(chat_prompts(tok, problems), params)
        m["timing/rollout_s"] = time.perf_counter() - t0
        seqs, old_lp, scores = [], [], []
        for out, (_, answer) in zip(outs, problems):
            for s in out.outputs:
                seqs.append((list(out.prompt_token_ids), list(s.token_ids)))
                old_lp.append(list(s.token_logprobs))
                scores.append(reward(s.text, answer))
        check = seqs[:2]
        engine_lp = llm.score([p + c for p, c in check], prompt_lens=[len(p) for p, _ in check])
    finally:
        end_rollout(llm, cycle, args.sleep_level)
    # After the sync the engine scores like the trainer's forward on the same tokens.
    _, trainer_lp, _ = next(sequence_logprobs(model, check, len(check), grad=False))
    m["check/engine_vs_trainer_max_abs"] = max(
        (abs(x - y) for e, t in zip(engine_lp, trainer_lp.tolist()) for x, y in zip(e, t)), default=0.0)
    num_tokens = sum(len(c) for _, c in seqs)
    m.update({"rollout/tokens_per_s": num_tokens / m["timing/rollout_s"], "rollout/num_tokens": num_tokens,
              "timing/sync_s": cycle["sync_s"], "timing/wake_s": cycle["wake_s"],
              "timing/sleep_s": cycle["sleep_s"], "memory/freed_bytes": cycle["bytes_freed"]})
    return seqs, old_lp, scores, m


def main() -> None:
    args = parse_args()
    distributed = "WORLD_SIZE" in os.environ
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    torch.manual_seed(args.seed)  # the trainer's own process: fine in an example

    tok, model = load_smollm2(device)
    head = torch.nn.Linear(model.config.hidden_size, 1, device=device)  # the critic
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    ref = None
    if args.kl_coef > 0:
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW([{"params": list(model.parameters()), "lr": args.lr},
                             {"params": list(head.parameters()), "lr": args.critic_lr}], weight_decay=0.0)
    probe_name, probe = next((n, p) for n, p in model.named_parameters() if "layers.0.self_attn.q_proj" in n)
    probe0 = probe.detach().clone()
    gen = torch.Generator().manual_seed(args.seed * 1009 + rank)  # minibatch order

    # TP=1: every rank is its own data-parallel replica (llm.parallel is None). The engine
    # sleeps from the start: each step's cycle wakes it and loads the trainer's weights.
    llm = LLM(model, tokenizer=tok, dtype=args.engine_dtype, device=device, max_model_len=512,
              num_kv_blocks=args.num_kv_blocks, seed=args.seed + rank)
    llm.sleep(args.sleep_level)
    _, dp_size = dp_rank_and_size(llm.parallel)
    params = SamplingParams(n=args.group_size, temperature=1.0, max_tokens=args.max_tokens, logprobs=0)
    columns = None
    with contextlib.ExitStack() as stack:
        csv = stack.enter_context(open(args.csv, "w")) if args.csv and rank == 0 else None
        for step in range(args.steps):
            problems = make_problems(random.Random(args.seed * 100003 + step), args.prompts_per_rank * dp_size, args.max_operand)
            mine = split_for_dp(problems, llm.parallel)  # this replica's share of the prompts
            seqs, old_lp, scores, m = rollout(llm, model, tok, mine, params, step, args)

            # ---- train: the no-grad pass, GAE, then K epochs of minibatch PPO updates ----
            t0 = time.perf_counter()
            batch, meter = prepare(model, head, ref, seqs, old_lp, scores, args, distributed)
            m.update(ppo_update(model, head, opt, seqs, batch, args, world, gen))
            m["timing/train_s"] = time.perf_counter() - t0
            m.update(meter.metrics())
            m.update(returns_mean=float(masked_mean(batch["returns"], batch["mask"])),
                     values_mean=float(masked_mean(batch["values"], batch["mask"])), kl_ref=batch["kl_ref"])
            m["check/weights_delta"] = float((probe.detach() - probe0).abs().max())
            m["reward"] = sum(scores) / len(scores)

            # Whole-run view: every replica's numbers, averaged (max for the worst-case ones).
            m.update(step=step, dp_size=dp_size, probe=probe_name)
            per_rank = gather_from_dp([m], llm.parallel, device=device)
            if rank == 0:
                merged = merge_metrics(per_rank)
                print("METRICS " + json.dumps(merged), flush=True)
                if csv:
                    if columns is None:  # every number, step first
                        columns = ["step", "dp_size", *(k for k in merged if k not in SAME_KEYS)]
                        csv.write(",".join(columns) + "\n")
                    csv.write(",".join(str(merged[k]) for k in columns) + "\n")
                    csv.flush()
    llm.shutdown()  # before the world goes: graphs holding NCCL work block its destroy
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
