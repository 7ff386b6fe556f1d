"""GRPO on short arithmetic with SmolLM2-135M-Instruct: the HF model trains, a colocated
rollout ``LLM`` in the same process samples. The torchrun driver.

    torchrun --nproc-per-node 2 examples/grpo/grpo.py --steps 20      # CPU, gloo, DP=2
    python examples/grpo/grpo.py --steps 2                             # one process

Every rank builds a ``GRPOWorker`` (``grpo_worker.py``: the trainer, its engine, the
step) and runs ``step`` in lockstep; the ranks are data-parallel replicas (gloo on CPU,
NCCL on GPU). Rank 0 prints one ``METRICS {json}`` line per step, every replica's numbers
merged, with verl's names for the rollout-vs-trainer mismatch on the sampled tokens.
``ray_grpo.py`` runs the same loop from a Ray driver.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repository root: examples.*

from examples.common.metrics import merge_metrics
from examples.grpo.grpo_worker import GRPOWorker, MetricsLog, add_grpo_args
from rollout.distributed import gather_from_dp


def main() -> None:
    args = add_grpo_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0])).parse_args()
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    worker = GRPOWorker(args)
    log = MetricsLog(args.csv) if worker.rank == 0 else None
    try:
        for step in range(args.steps):
            m = worker.step(step)
            per_rank = gather_from_dp([m], worker.llm.parallel, device=worker.device)  # collective
            if log:
                log.write(merge_metrics(per_rank))
    finally:
        if log:
            log.close()
        worker.close()  # before the world goes: graphs holding NCCL work block its destroy
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
