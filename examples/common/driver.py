"""The torchrun driver of the RL examples: every rank builds the algorithm's worker and runs
its ``step`` in lockstep; the ranks are data-parallel replicas (gloo on CPU, NCCL on GPU).
Rank 0 gathers every replica's metrics and logs one merged step (``metrics.MetricsLog``).
Also runs as one plain process (no torchrun): a world of one."""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from examples.common.metrics import MetricsLog, merge_metrics
from examples.common.worker import RLWorker, pick_device
from rollout.distributed import gather_from_dp


def run_torchrun(worker_cls: type[RLWorker], args: argparse.Namespace, algorithm: str) -> None:
    """``args.steps`` steps of ``worker_cls(args)`` on every rank of the torchrun world."""
    distributed = "WORLD_SIZE" in os.environ
    on_cuda = pick_device(args.device).type == "cuda"
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if distributed:
        dist.init_process_group("nccl" if on_cuda else "gloo")
    worker = worker_cls(args)
    log = MetricsLog(args, algorithm) if worker.rank == 0 else None
    try:
        for step in range(args.steps):
            t0 = time.perf_counter()
            m = worker.step(step)
            per_rank = gather_from_dp([m], worker.llm.parallel, device=worker.device)  # collective
            if log:
                merged = merge_metrics(per_rank)
                merged["timing/step_s"] = time.perf_counter() - t0
                log.write(merged)
    finally:
        if log:
            log.close()
        worker.close()  # before the world goes: graphs holding NCCL work block its destroy
    if distributed:
        dist.destroy_process_group()
