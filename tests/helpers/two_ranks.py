"""Run a test script as two real processes of a torch.distributed world on loopback.

A two-rank job: the pytest side calls ``run_job(__file__, job, job_dir)``; the script's
``__main__`` runs each rank's cases inside ``with rank_job(rank, port, job_dir) as (job, res):``
and fills ``res``, which ``run_job`` returns per rank (JSON through ``job_dir``). The world
is gloo unless the job says ``"backend": "nccl"`` (then rank r runs on ``cuda:r``); its
collectives time out after the job's ``"timeout_s"`` (default 60). Fault tests that end a
rank on purpose pass the ``exit_codes`` they expect.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(script: str | Path, *args: str, timeout: float, exit_codes: tuple[int, int] = (0, 0)) -> list[str]:
    """``python script RANK PORT *args`` for ranks 0 and 1; fails with both logs unless both
    exit with ``exit_codes`` within ``timeout`` seconds (a stuck collective fails instead of
    hanging). Returns each rank's output."""
    # The checkout first, then whatever the caller had (packages installed beside it).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    # NVLink multicast off: on shared GPU hosts a program using it can take the GPUs down.
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    if sys.platform == "linux":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    port = free_port()
    procs = [
        subprocess.Popen([sys.executable, str(script), str(rank), str(port), *args], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    deadline = time.monotonic() + timeout
    logs = []
    timed_out = False
    try:
        for p in procs:
            try:
                logs.append(p.communicate(timeout=max(deadline - time.monotonic(), 0.1))[0])
            except subprocess.TimeoutExpired:
                timed_out = True
                p.kill()
                logs.append(p.communicate()[0])  # what it printed before it was stopped
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    what = f"timed out after {timeout:.0f}s" if timed_out else f"exit codes {[p.returncode for p in procs]}"
    assert not timed_out and [p.returncode for p in procs] == list(exit_codes), what + "\n" + "\n".join(
        f"---- rank {r} ----\n{log}" for r, log in enumerate(logs))
    return logs


def run_job(
    script: str | Path, job: dict, job_dir: Path, *, timeout: float, exit_codes: tuple[int, int] = (0, 0),
) -> list[dict | None]:
    """Write ``job`` to ``job_dir/job.json``, run ``script`` as ranks 0 and 1 (see
    ``run_two_ranks``) and return the results each rank wrote, in rank order (None for a
    rank that wrote none: one that ended itself on purpose)."""
    (job_dir / "job.json").write_text(json.dumps(job))
    run_two_ranks(script, str(job_dir), timeout=timeout, exit_codes=exit_codes)
    files = [job_dir / f"rank{r}.json" for r in (0, 1)]
    return [json.loads(f.read_text()) if f.exists() or exit_codes[r] == 0 else None for r, f in enumerate(files)]


@contextlib.contextmanager
def rank_job(rank: int, port: int, job_dir: str) -> Iterator[tuple[dict, dict]]:
    """One rank of a ``run_job`` job: joins the world of two on loopback (gloo, or NCCL with
    this rank on ``cuda:rank`` when the job's ``backend`` says so) and yields (the job, this
    rank's results dict); the results are written for the pytest side (also when the body
    raises, so the other cases' results survive) and the world is torn down."""
    import torch
    import torch.distributed as dist

    job = json.loads((Path(job_dir) / "job.json").read_text())
    backend = job.get("backend", "gloo")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=job.get("timeout_s", 60)))
    res: dict = {}
    try:
        yield job, res
    finally:
        (Path(job_dir) / f"rank{rank}.json").write_text(json.dumps(res))
        dist.destroy_process_group()
