"""Worker classes the Ray worker-group tests build in their actors (imported there by name,
so they live in an importable module, not in the test file)."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
import transformers

from tests.helpers.engine_state import greedy, make_llm
from trainers_integration import iter_hf_weights, rollout_phase


def as_plain(outs: list[tuple[list[int], list[float]]]) -> list[dict]:
    return [{"token_ids": list(ids), "logprobs": list(lps)} for ids, lps in outs]


class EngineWorker:
    """One rank: a tiny engine from ``model_dir`` (TP ``tensor_parallel_size`` over the
    group's world), asleep between rollouts like a colocated trainer's."""

    def __init__(self, model_dir: str, tensor_parallel_size: int = 1, closed_marker: str | None = None) -> None:
        self.rank = dist.get_rank()
        self.llm = make_llm(model_dir, tensor_parallel_size=tensor_parallel_size)
        self.seen: list = []
        self.closed_marker = closed_marker

    def close(self) -> None:
        """Called by the group's shutdown before the world goes; leaves a file per rank
        saying the engine was shut down while the world was still up."""
        self.llm.shutdown()
        if self.closed_marker:
            with open(f"{self.closed_marker}.{self.rank}", "w") as f:
                f.write(f"{self.llm.memory_usage()} world_up={dist.is_initialized()}")

    def info(self) -> dict:
        """What the group set up: the world, the environment, one all-reduce over it."""
        total = torch.tensor([self.rank])
        dist.all_reduce(total)
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS")
        return {"rank": dist.get_rank(), "world": dist.get_world_size(), "backend": dist.get_backend(),
                "rank_sum": int(total), "pid": os.getpid(), **{k: os.environ.get(k) for k in keys}}

    def generate(self, prompts: list) -> list[dict]:
        """Greedy continuations of this rank's share (recorded in ``seen``)."""
        self.seen.append(list(prompts))
        return self.greedy(prompts) if prompts else []

    def seen_prompts(self) -> list:
        return self.seen

    def sync_from(self, model_dir: str, version: int) -> dict:
        """Load a stand-in trainer (an HF model) from ``model_dir`` in this process and push
        its weights into the engine through the colocated cycle; the engine sleeps after."""
        trainer = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.llm.sleep(1)
        with rollout_phase(self.llm, iter_hf_weights(trainer), version=version) as stats:
            pass
        return {"num_tensors": stats["num_tensors"], "weight_version": self.llm.weight_version,
                "asleep": self.llm.is_sleeping}

    def greedy(self, prompts: list) -> list[dict]:
        """Greedy continuations of ``prompts`` (the engine woken for it, asleep again after)."""
        with rollout_phase(self.llm, None):
            return as_plain(greedy(self.llm, prompts))

    def fail_on(self, rank: int) -> int:
        if self.rank == rank:
            raise ValueError(f"planned failure on rank {rank}")
        return self.rank

    def tensor(self) -> torch.Tensor:
        return torch.zeros(2)

    def exit_on(self, rank: int) -> None:
        """``rank`` dies at once; the others block as if stuck in a collective with it."""
        if self.rank == rank:
            os._exit(1)
        time.sleep(600)

    def hang(self, seconds: float) -> None:
        time.sleep(seconds)
