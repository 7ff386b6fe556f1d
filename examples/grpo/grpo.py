"""GRPO on short arithmetic with SmolLM2-135M-Instruct: the HF model trains, a colocated
rollout ``LLM`` in the same process samples. Run from the repository root:

    torchrun --standalone --nproc-per-node 2 -m examples.grpo.grpo --steps 3      # CPU, gloo, DP=2
    python -m examples.grpo.grpo --steps 2                                         # one process

Each rank is a ``GRPOWorker``: the shared ``RLWorker`` (``examples/common/worker.py``: the
trainer, its engine, the colocated rollout cycle) plus what GRPO is: advantages normalised
within each prompt's group of ``n`` samples, and one clipped policy-gradient step on the
rollout (token mean, + an optional k3 KL to a frozen reference). ``ray_grpo.py`` drives the
same worker from Ray.

Rank 0 prints one progress line per step and writes every metric as a JSON line to
``--metrics-file`` (default ``runs/grpo-<time>/metrics.jsonl``): timings, tokens/s, memory
freed, reward, loss, and the rollout-vs-trainer mismatch on the sampled tokens under
verl's names (``trainers_integration.mismatch``: ``training/rollout_probs_diff_max``/
``_mean``/``_std``, ``rollout_corr/k3_kl`` and the TIS ratio statistics
``rollout_corr/rollout_is_*``), with ``training/rollout_k3_kl`` the k3 KL's older name.
"""

from __future__ import annotations

import argparse

import torch

from examples.common.driver import run_torchrun
from examples.common.metrics import add_output_args
from examples.common.trainer_logprobs import MismatchMeter, padded, sequence_logprobs
from examples.common.worker import Rollout, RLWorker, add_worker_args


def group_advantages(scores: list[float], group_size: int) -> list[float]:
    """Each sample's reward minus its group's mean, over the group's std (unbiased): the
    ``n`` samples of a prompt are consecutive."""
    groups = torch.tensor(scores, dtype=torch.float64).view(-1, group_size)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
    return ((groups - groups.mean(dim=1, keepdim=True)) / (std + 1e-6)).view(-1).tolist()


class GRPOWorker(RLWorker):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=0.0)

    def train(self, batch: Rollout) -> dict[str, float]:
        """One optimizer step over all micro-batches of the rollout. The trainer's weights
        are still the rollout's, so the meter sees the rollout-vs-trainer mismatch."""
        args, model = self.args, self.model
        self.opt.zero_grad(set_to_none=True)
        adv = torch.tensor(group_advantages(batch.scores, args.group_size), dtype=torch.float32, device=self.device)
        meter = MismatchMeter()
        loss_sum = torch.zeros((), device=self.device)
        ref_lps = {}
        if self.ref is not None:
            ref_lps = {lo: lp for lo, lp, _ in sequence_logprobs(self.ref, batch.seqs, args.micro_batch, grad=False)}
        for lo, lp, mask in sequence_logprobs(model, batch.seqs, args.micro_batch, grad=True, exact=self.exact):
            rows = slice(lo, lo + lp.shape[0])
            old = padded(batch.old_logprobs[rows], lp.shape[1], self.device)
            a = adv[rows, None]
            meter.add(lp, old, mask)
            ratio = torch.exp(lp - old)
            loss = -torch.minimum(ratio * a, ratio.clamp(1 - args.clip, 1 + args.clip) * a)
            if self.ref is not None:
                log_ref = (ref_lps[lo] - lp) * mask
                loss = loss + args.kl_coef * (log_ref.exp() - log_ref - 1)
            loss = (loss * mask).sum() / batch.num_tokens  # token mean over this rank's batch
            loss.backward()
            loss_sum = loss_sum + loss.detach()
        self.average_gradients(list(model.parameters()))
        self.opt.step()
        return {"loss": float(loss_sum), **meter.metrics()}


def build_parser() -> argparse.ArgumentParser:
    return add_output_args(add_worker_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0])))


def main() -> None:
    run_torchrun(GRPOWorker, build_parser().parse_args(), "grpo")


if __name__ == "__main__":
    main()
