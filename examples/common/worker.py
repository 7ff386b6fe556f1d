"""One rank of an RL example: the trainer (fp32 HF SmolLM2) and a colocated rollout ``LLM``
built from it, in the same process, on the same device. GRPO and PPO subclass ``RLWorker``
and write only ``train``; both drivers (``driver.run_torchrun`` under torchrun, a Ray
``WorkerGroup`` in ``grpo/ray_grpo.py``) call ``step`` on every rank in lockstep.

Each rank is a data-parallel replica (TP=1): it takes its own share of the step's prompts
(``split_for_dp``) and the subclass averages its gradients over the ranks
(``average_gradients``). One step:

1. ``rollout``, the colocated cycle of ``trainers_integration.colocate``: wake the engine's
   weights -> load the trainer's current ones -> wake the KV cache -> generate ``n`` samples
   per prompt with their logprobs (the old policy) -> score two of them with the engine ->
   sleep. Then the trainer's forward on those two (same weights, same tokens: the
   engine-vs-trainer check).
2. ``train`` (the subclass): the algorithm's update on the rollout, returning its metrics.

``step`` returns this rank's metrics (plain numbers and a few labels);
``metrics.merge_metrics`` folds every rank's into one line per step.
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from examples.common.arith_task import chat_prompts, make_problems, reward
from examples.common.smollm2 import load_smollm2
from examples.common.trainer_logprobs import sequence_logprobs
from trainers_integration.exact import ExactForward
from rollout import LLM, SamplingParams
from rollout.distributed import dp_rank_and_size, split_for_dp
from trainers_integration import iter_hf_weights, rollout_phase


def add_worker_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every RL example shares (the algorithm adds its own)."""
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts-per-rank", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt (n); not --n: torchrun takes that for a prefix of its own options")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-5, help="policy learning rate")
    p.add_argument("--clip", type=float, default=0.2, help="policy ratio clip epsilon")
    p.add_argument("--kl-coef", type=float, default=0.0, help="> 0: KL to a frozen reference model (GRPO: k3 in the loss; PPO: a per-token penalty in the rewards)")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per trainer forward")
    p.add_argument("--max-operand", type=int, default=9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=str, default=None, help="cpu (gloo) or cuda (NCCL, cuda:LOCAL_RANK); default: cuda if there is one")
    p.add_argument("--engine-dtype", type=str, default="auto", help="auto: the trainer's fp32; bfloat16 is faster, with a larger mismatch")
    p.add_argument("--num-kv-blocks", type=int, default=512, help="engine KV cache, blocks of 16 tokens")
    p.add_argument("--exact", action="store_true",
                   help="exact on-policy mode: a batch-invariant engine and the trainer's logprobs from rollout's "
                        "own forward (trainers_integration.exact), so training/rollout_probs_diff_max is 0")
    p.add_argument("--sleep-level", type=int, default=2, choices=(1, 2),
                   help="2: the sleeping engine keeps no copy of its weights (every step loads all of them anyway)")
    return p


def pick_device(name: str | None) -> torch.device:
    """``--device``: cuda if there is one unless told otherwise; on CUDA the current device
    (the driver sets it: LOCAL_RANK under torchrun, Ray's one visible GPU)."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass
class Rollout:
    """This rank's samples of one step, ``n`` consecutive ones per prompt: (prompt ids,
    completion ids), their rollout logprobs, their rewards; and the cycle's metrics."""

    seqs: list[tuple[list[int], list[int]]]
    old_logprobs: list[list[float]]
    scores: list[float]
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for _, c in self.seqs)


class RLWorker:
    """The trainer and its colocated engine on one rank. Reads its rank from
    ``torch.distributed`` when a world is initialised (torchrun or a Ray ``WorkerGroup``),
    else runs alone. Subclasses build their optimizer and write ``train``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world = dist.get_world_size() if distributed else 1
        self.device = pick_device(args.device)
        torch.manual_seed(args.seed)  # the trainer's own process: fine in an example

        self.tok, self.model = load_smollm2(self.device, verbose=getattr(args, "verbose", False))
        self.ref = copy.deepcopy(self.model).eval().requires_grad_(False) if args.kl_coef > 0 else None
        self.probe_name, self.probe = next((n, p) for n, p in self.model.named_parameters() if "layers.0.self_attn.q_proj" in n)
        self.probe0 = self.probe.detach().clone()

        # TP=1: every rank is its own data-parallel replica (llm.parallel is None). The engine
        # sleeps from the start: each step's cycle wakes it and loads the trainer's weights.
        exact = getattr(args, "exact", False)
        self.llm = LLM(self.model, tokenizer=self.tok, dtype=args.engine_dtype, device=self.device, max_model_len=512,
                       num_kv_blocks=args.num_kv_blocks, seed=args.seed + self.rank, batch_invariant=exact,
                       # sleep(1) keeps a host copy of the weights: allocate it in the background now.
                       enable_sleep_mode=args.sleep_level == 1)
        #: The trainer's forward in exact mode (rollout's model code and kernels on its weights).
        self.exact = ExactForward.for_module(self.model) if exact else None
        self.llm.sleep(args.sleep_level)
        _, self.dp_size = dp_rank_and_size(self.llm.parallel)
        self.params = SamplingParams(n=args.group_size, temperature=1.0, max_tokens=args.max_tokens, logprobs=0)

    def close(self) -> None:
        """Shut the engine down (a Ray WorkerGroup calls this before destroying the world;
        the torchrun driver does too): its CUDA graphs must not outlive the NCCL world."""
        self.llm.shutdown()

    def step(self, step: int) -> dict[str, Any]:
        """One step on this rank's share; returns its metrics."""
        batch = self.rollout(step)
        t0 = time.perf_counter()
        m = dict(batch.metrics)
        m.update(self.train(batch))
        m["timing/train_s"] = time.perf_counter() - t0
        m["check/weights_delta"] = float((self.probe.detach() - self.probe0).abs().max())
        m["reward"] = sum(batch.scores) / len(batch.scores)
        m.update(step=step, dp_size=self.dp_size, probe=self.probe_name)
        return m

    def train(self, batch: Rollout) -> dict[str, float]:
        """The algorithm's update on this rank's rollout; returns its metrics, among them
        ``loss`` and verl's ``training/rollout_*`` / ``rollout_corr/*`` mismatch (``MismatchMeter``)."""
        raise NotImplementedError

    def rollout(self, step: int) -> Rollout:
        """The colocated cycle with the trainer's current weights (version ``step``: the
        policy of this step's samples), then the engine-vs-trainer check."""
        args = self.args
        problems = make_problems(random.Random(args.seed * 100003 + step), args.prompts_per_rank * self.dp_size, args.max_operand)
        mine = split_for_dp(problems, self.llm.parallel)  # this replica's share of the prompts
        with rollout_phase(self.llm, iter_hf_weights(self.model), version=step, level=args.sleep_level) as cycle:
            t0 = time.perf_counter()
            outs = self.llm.generate(chat_prompts(self.tok, mine), self.params)
            rollout_s = time.perf_counter() - t0
            batch = Rollout([], [], [])
            for out, (_, answer) in zip(outs, mine):
                for s in out.outputs:
                    batch.seqs.append((list(out.prompt_token_ids), list(s.token_ids)))
                    batch.old_logprobs.append(list(s.token_logprobs))
                    batch.scores.append(reward(s.text, answer))
            check = batch.seqs[:2]  # the engine scores a couple of sequences under the synced weights
            engine_lp = self.llm.score([p + c for p, c in check], prompt_lens=[len(p) for p, _ in check])
        # After the sync the engine scores like the trainer's forward on the same tokens.
        _, trainer_lp, _ = next(sequence_logprobs(self.model, check, len(check), grad=False, exact=self.exact))
        batch.metrics = {
            "timing/rollout_s": rollout_s, "rollout/tokens_per_s": batch.num_tokens / rollout_s,
            "rollout/num_tokens": batch.num_tokens,
            "timing/sync_s": cycle["sync_s"], "timing/wake_s": cycle["wake_s"], "timing/sleep_s": cycle["sleep_s"],
            "memory/freed_bytes": cycle["bytes_freed"],
            "check/engine_vs_trainer_max_abs": max(
                (abs(x - y) for e, t in zip(engine_lp, trainer_lp.tolist()) for x, y in zip(e, t)), default=0.0),
        }
        return batch

    def average_gradients(self, params: list[torch.nn.Parameter], bucket_numel: int = 1 << 24) -> None:
        """Data parallel: every gradient replaced by its mean over the ranks, a bucket of
        about ``bucket_numel`` elements per ``all_reduce``. Every rank passes the same
        parameters. Nothing to do alone."""
        if self.world == 1:
            return
        bucket: list[torch.Tensor] = []
        numel = 0
        for p in params:
            if p.grad is None:
                continue
            bucket.append(p.grad)
            numel += p.grad.numel()
            if numel >= bucket_numel:
                self._reduce_bucket(bucket)
                bucket, numel = [], 0
        if bucket:
            self._reduce_bucket(bucket)

    def _reduce_bucket(self, grads: list[torch.Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
