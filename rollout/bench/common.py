"""What every workload shares: options, building a random-weight engine, timing, the
environment a result was measured in."""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import rollout
from rollout.bench.configs import write_model_dir
from rollout.bench.dist import world_size

# The repository root when run from a checkout (git_commit reads its .git); in an installed
# package, site-packages, where there is no .git.
ROOT = Path(__file__).resolve().parents[2]
PEER_ENGINES = ("hf", "vllm")


@dataclass(frozen=True)
class Options:
    model: str | None = None  # None: the workload's default model(s)
    scale: float = 1.0  # shrinks counts and lengths of a workload (quick runs, CI)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "bfloat16"
    seed: int = 0
    kv_cache_bytes: int | None = None  # None: the platform sizes the KV cache
    enforce_eager: bool = False
    batch_invariant: bool = False  # exact on-policy mode's kernels
    quantization: str | None = None  # LLM(quantization=...): None or "fp8"
    # decode-step: every request returns its routed experts (MoE routing replay's cost).
    return_routes: bool = False
    peer_workload: str = "nano-bench"  # what `peer` runs through both engines
    peer_engine: str = "hf"  # what `peer` compares rollout with: "hf" (transformers) or "vllm" (vllm_peer.py)
    # --peer-engine vllm may run on rollout's own vllm alias (a test of the code path; the
    # result says vllm_is_rollout_alias: true). Without it the alias is refused.
    allow_vllm_alias: bool = False
    batches: tuple[int, ...] = (1, 64, 256)  # decode-step batch sizes (before scaling)
    # Ranks of one model; > 1 runs under torchrun, in a world of a multiple of it (dist.py).
    tensor_parallel_size: int = 1
    # decode-step: steps profiled per batch after the timed loop (kernel_profile.py); 0: none.
    profile_steps: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.scale <= 1:
            raise ValueError(f"scale must be in (0, 1], got {self.scale}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.profile_steps < 0:
            raise ValueError(f"profile_steps must be >= 0, got {self.profile_steps}")
        if self.peer_engine not in PEER_ENGINES:
            raise ValueError(f"peer_engine must be one of {PEER_ENGINES}, got {self.peer_engine!r}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batches must be sizes >= 1, got {self.batches}")

    def decode_batches(self) -> list[int]:
        """decode-step's batch sizes at ``scale``, ascending. Raises ValueError, naming them,
        when scaling turns two of them into one size: the run would silently measure fewer
        batches than asked for (at --scale 0.01, 1 and 64 both become 1)."""
        runs_as: dict[int, list[int]] = {}  # scaled size -> the sizes asked for that become it
        for b in self.batches:
            runs_as.setdefault(scaled(b, self.scale), []).append(b)
        merged = {size: asked for size, asked in runs_as.items() if len(asked) > 1}
        if merged:
            lost = "; ".join(f"batch {', '.join(map(str, asked[1:]))} would run as {size}, as batch {asked[0]} does"
                             for size, asked in sorted(merged.items()))
            raise ValueError(
                f"--scale {self.scale} turns --batches {','.join(map(str, self.batches))} into "
                f"{','.join(str(scaled(b, self.scale)) for b in self.batches)}, so batches would be dropped "
                f"({lost}). Pass --batches that stay distinct at this scale, or a larger --scale."
            )
        return sorted(runs_as)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def scaled(n: int, scale: float, minimum: int = 1) -> int:
    return max(minimum, round(n * scale))


def build_llm(opts: Options, model: str, **kwargs: Any):
    """An engine of ``model`` with random weights, from a config.json-only directory; with
    ``tensor_parallel_size`` > 1, this rank's shard (every rank of its group must call it)."""
    from rollout import LLM

    kwargs.setdefault("kv_cache_memory_bytes", opts.kv_cache_bytes)
    if opts.tensor_parallel_size > 1:
        kwargs.setdefault("tensor_parallel_size", opts.tensor_parallel_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model_dir(model, Path(tmp))
        return LLM(path, dtype=opts.dtype, device=opts.device, seed=opts.seed, load_format="dummy",
                   enforce_eager=opts.enforce_eager, batch_invariant=opts.batch_invariant,
                   quantization=opts.quantization, **kwargs)


def dispose(llm: Any) -> None:
    """Give an engine's device memory back before the next one is built in this process,
    and its CUDA graphs before the world is destroyed (``LLM.shutdown``)."""
    llm.shutdown()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """Host clock after every queued device op has finished."""
    sync(device)
    return time.perf_counter()


class ForwardTimer:
    """Device time of each model forward (decoder stack through the LM head), from hooks on
    the model (start) and its ``lm_head`` (end): CUDA events on GPU, the host clock on CPU.

    A span is max(GPU time, host launch time) of the forward. Forwards replayed from a CUDA
    graph call no module, so they are not seen: ``spans_ms()`` is then shorter than the
    number of steps and callers report the split as unavailable.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list[list[Any]] = []
        end_module = getattr(model, "lm_head", model)
        self._handles = [
            model.register_forward_pre_hook(lambda *_: self._start()),
            end_module.register_forward_hook(lambda *_: self._end()),
        ]

    def _start(self) -> None:
        if not (self.cuda and torch.cuda.is_current_stream_capturing()):
            self._marks.append([self._mark()])

    def _end(self) -> None:
        if self._marks and not (self.cuda and torch.cuda.is_current_stream_capturing()):
            self._marks[-1].append(self._mark())

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def reset(self) -> None:
        self._marks.clear()

    def spans_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in (m for m in self._marks if len(m) == 2)]
        return [(b - a) * 1e3 for a, b in (m for m in self._marks if len(m) == 2)]

    def close(self) -> None:
        for h in self._handles:
            h.remove()


class GcWatch:
    """Counts Python garbage collections and their pauses while open (``gc.callbacks``):
    a timed loop's slow outliers are either collections or something else."""

    def __init__(self) -> None:
        self.counts = [0, 0, 0]
        self.pauses_ms: list[float] = []
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.counts[info["generation"]] += 1
            self.pauses_ms.append((time.perf_counter() - self._t0) * 1e3)

    def __enter__(self) -> GcWatch:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: Any) -> None:
        gc.callbacks.remove(self._callback)

    def to_json(self) -> dict[str, Any]:
        return {"collections_by_generation": self.counts, "pause_ms_total": sum(self.pauses_ms),
                "pause_ms_max": max(self.pauses_ms, default=0.0)}


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def env_info(device: torch.device) -> dict[str, Any]:
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device": str(device),
        "gpu": gpu,
        "world_size": world_size(),  # torchrun's ranks (1: one process)
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # other work on the machine
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "rollout": version("rollout") or rollout.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }


def git_commit() -> str | None:
    """The checkout's commit, read from .git without running git; None outside a checkout.
    ``ROLLOUT_GIT_COMMIT`` wins: a copied working tree (the GPU machine) may carry a .git
    older than its files."""
    if os.environ.get("ROLLOUT_GIT_COMMIT"):
        return os.environ["ROLLOUT_GIT_COMMIT"]
    git = ROOT / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        for base in (git, git.parent.parent if git.parent.name == "worktrees" else git):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
            packed = base / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
    except OSError:
        pass
    return None
