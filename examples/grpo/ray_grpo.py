"""GRPO on short arithmetic with SmolLM2-135M-Instruct, driven from Ray: the same worker
and the same logs as ``grpo.py`` under torchrun. Run from the repository root:

    python -m examples.grpo.ray_grpo --num-workers 2 --steps 3                    # local Ray, CPU, gloo
    python -m examples.grpo.ray_grpo --address auto --gpu --num-workers 8          # a running cluster, NCCL

The driver is the single controller: it builds a ``WorkerGroup`` of ``--num-workers``
colocated ranks (one placement-group bundle each: a CPU slot, or a GPU with ``--gpu``),
each holding a ``GRPOWorker`` (the trainer and its engine), calls ``step`` on every rank
each step, merges the per-rank metrics and logs them itself (the progress line, the
metrics file, ``--csv``). Only the step number goes out and plain metrics come back;
weights move inside each worker. The workers import this repository, so on a cluster it
must sit at the same path on every node (as for torchrun).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

from examples.common.metrics import MetricsLog, add_output_args, merge_metrics
from examples.common.worker import add_worker_args
from examples.grpo.grpo import GRPOWorker
from trainers_integration.ray import WorkerGroup, WorkerGroupConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository: the workers import examples.* from it


def build_parser() -> argparse.ArgumentParser:
    p = add_output_args(add_worker_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0])))
    p.add_argument("--num-workers", type=int, default=2, help="ranks (data-parallel replicas)")
    p.add_argument("--gpu", action="store_true", help="one GPU per rank and NCCL (default: CPU slots and gloo)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--address", type=str, default=None, help="a running cluster (ray.init(address=...), e.g. auto); default: start a local one")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster this starts (default: Ray's count)")
    p.add_argument("--call-timeout", type=float, default=1800.0, help="seconds one step may take before the run fails")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.device is None:  # the workers use what they were placed on
        args.device = "cuda" if args.gpu else "cpu"
    return args


def main() -> None:
    args = parse_args()
    import ray  # after argparse, so --help works without Ray

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    # The workers import examples.* from this checkout; their thread count follows ours.
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if "OMP_NUM_THREADS" in os.environ:
        env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
    config = WorkerGroupConfig(num_workers=args.num_workers, use_gpu=args.gpu, num_cpus_per_worker=args.cpus_per_worker,
                               env_vars=env, call_timeout_s=args.call_timeout)
    log = MetricsLog(args, "grpo")
    try:
        with WorkerGroup(config, GRPOWorker, args=(args,)) as group:
            for step in range(args.steps):
                t0 = time.perf_counter()
                per_rank = group.call("step", step)
                merged = merge_metrics(group.one_per_replica(per_rank))
                merged["timing/step_s"] = time.perf_counter() - t0
                log.write(merged)
    finally:
        log.close()
        ray.shutdown()


if __name__ == "__main__":
    main()
