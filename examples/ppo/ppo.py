"""PPO on short arithmetic with SmolLM2-135M-Instruct: the HF policy with a value head
trains, a colocated rollout ``LLM`` in the same process samples. Run from the repository
root:

    torchrun --standalone --nproc-per-node 2 -m examples.ppo.ppo --steps 3        # CPU, gloo, DP=2
    python -m examples.ppo.ppo --steps 2                                           # one process

Each rank is a ``PPOWorker``: the shared ``RLWorker`` (``examples/common/worker.py``: the
trainer, its engine, the colocated rollout cycle, the same driver and logs as GRPO) plus
what PPO is. With the engine's memory handed back after the rollout: one no-grad pass for
the trainer's logprobs (the rollout-vs-trainer mismatch, before any update), the old values
and the reference logprobs -> per-token rewards (the score on the last token, minus
``kl_coef`` x (old - reference) on every token) -> GAE -> advantages whitened over all
ranks -> K epochs of minibatches, each one optimizer step on the clipped policy loss +
``vf_coef`` x the clipped value loss (the maths: ``losses.py``).

The critic is a linear head (hidden -> 1, started at zero) on the policy's last hidden
state, the one the LM head reads: one forward gives both logprobs and values, so PPO costs
no second 135M model to hold, run and step, and nothing extra to sync to the engine (the
head is not part of the HF model). The trunk is shared: the value loss, scaled by
``vf_coef``, also trains it, but through the head's weights, which start at zero, so the
critic reaches the policy only as it learns; the head gets its own learning rate
(``--critic-lr``) since it starts from nothing while the trunk is pretrained.

Rank 0 prints one progress line per step and writes every metric as a JSON line to
``--metrics-file`` (default ``runs/ppo-<time>/metrics.jsonl``): GRPO's plus
``policy_loss``, ``value_loss``, ``clip_frac``, ``approx_kl``, ``grad_norm``,
``returns_mean``, ``values_mean``, ``kl_ref``.
"""

from __future__ import annotations

import argparse

import torch

from examples.common.driver import run_torchrun
from examples.common.metrics import add_output_args
from examples.common.trainer_logprobs import MismatchMeter, padded, sequence_logprobs
from examples.common.worker import Rollout, RLWorker, add_worker_args
from examples.ppo.losses import gae, masked_mean, policy_loss, token_rewards, value_loss, whiten


def add_ppo_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--critic-lr", type=float, default=1e-4, help="value head")
    p.add_argument("--ppo-epochs", type=int, default=2, help="passes over the step's rollout")
    p.add_argument("--value-clip", type=float, default=0.2, help="how far a value may move from the old one before its loss is clipped")
    p.add_argument("--vf-coef", type=float, default=0.5, help="weight of the value loss")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    return p


def to_padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Micro-batches of [b, t_i] rows into one [B, width] tensor, zero-padded."""
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1])) for r in rows])


class PPOWorker(RLWorker):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.head = torch.nn.Linear(self.model.config.hidden_size, 1, device=self.device)  # the critic
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.opt = torch.optim.AdamW([{"params": list(self.model.parameters()), "lr": args.lr},
                                      {"params": list(self.head.parameters()), "lr": args.critic_lr}], weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(args.seed * 1009 + self.rank)  # minibatch order

    def train(self, batch: Rollout) -> dict[str, float]:
        tensors, meter = self.prepare(batch)
        m = self.update(batch.seqs, tensors)
        m.update(meter.metrics())
        m.update(returns_mean=float(masked_mean(tensors["returns"], tensors["mask"])),
                 values_mean=float(masked_mean(tensors["values"], tensors["mask"])), kl_ref=tensors["kl_ref"])
        return m

    @torch.no_grad()
    def prepare(self, batch: Rollout) -> tuple[dict, MismatchMeter]:
        """The no-grad pass before any update: the trainer's logprobs (the mismatch meter),
        the old values and the reference logprobs; then rewards, GAE and whitened
        advantages. Returns [N, T] tensors (T the longest completion of this rank) and the
        meter."""
        args, seqs = self.args, batch.seqs
        width = max(len(c) for _, c in seqs)
        meter = MismatchMeter()
        values, masks = [], []
        for lo, lp, mask, hidden in sequence_logprobs(self.model, seqs, args.micro_batch, grad=False, hidden=True):
            meter.add(lp, padded(batch.old_logprobs[lo : lo + lp.shape[0]], lp.shape[1], self.device), mask)
            values.append(self.head(hidden).squeeze(-1) * mask)
            masks.append(mask)
        t = {"old_lp": padded(batch.old_logprobs, width, self.device), "values": to_padded(values, width),
             "mask": to_padded(masks, width)}
        kl = None
        if self.ref is not None:
            ref_rows = [lp for _, lp, _ in sequence_logprobs(self.ref, seqs, args.micro_batch, grad=False)]
            kl = (t["old_lp"] - to_padded(ref_rows, width)) * t["mask"]  # k1, per token
        rewards = token_rewards(torch.tensor(batch.scores, device=self.device), t["mask"], kl, args.kl_coef)
        advantages, t["returns"] = gae(rewards, t["values"], t["mask"], args.gamma, args.lam)
        t["advantages"] = whiten(advantages, t["mask"], distributed=self.world > 1)
        t["kl_ref"] = 0.0 if kl is None else float(masked_mean(kl, t["mask"]))
        return t, meter

    def update(self, seqs: list, t: dict) -> dict[str, float]:
        """K epochs over shuffled minibatches of this rank's sequences, one optimizer step
        each (gradients averaged over the ranks). Returns the losses and statistics,
        averaged."""
        args = self.args
        params = [p for group in self.opt.param_groups for p in group["params"]]
        sums: dict[str, float] = {}
        num_updates = 0
        for _ in range(args.ppo_epochs):
            order = torch.randperm(len(seqs), generator=self.gen).tolist()
            for lo in range(0, len(seqs), args.micro_batch):
                idx = order[lo : lo + args.micro_batch]
                _, lp, mask, hidden = next(sequence_logprobs(self.model, [seqs[i] for i in idx], len(idx), grad=True, hidden=True))
                rows = torch.tensor(idx, device=lp.device)
                mine = {k: t[k][rows, : lp.shape[1]] for k in ("old_lp", "values", "returns", "advantages")}
                p_loss, stats = policy_loss(lp, mine["old_lp"], mine["advantages"], mask, args.clip)
                v_loss = value_loss(self.head(hidden).squeeze(-1), mine["values"], mine["returns"], mask, args.value_clip)
                loss = p_loss + args.vf_coef * v_loss
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.average_gradients(params)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                self.opt.step()
                stats.update(loss=float(loss.detach()), policy_loss=float(p_loss.detach()),
                             value_loss=float(v_loss.detach()), grad_norm=float(grad_norm))
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                num_updates += 1
        return {k: v / num_updates for k, v in sums.items()}


def build_parser() -> argparse.ArgumentParser:
    return add_output_args(add_ppo_args(add_worker_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))))


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.exact:  # the value head reads HF's hidden states, which the exact forward does not give
        parser.error("--exact is GRPO's for now: PPO's value head needs the HF forward's hidden states")
    run_torchrun(PPOWorker, args, "ppo")


if __name__ == "__main__":
    main()
