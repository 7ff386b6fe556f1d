"""Where a step's device time goes: ``llm.step()`` under the torch profiler, each kernel's
time per step, grouped into categories (GEMM, attention, norms, all-reduce, ...).

On CUDA the kernels are the device's (CUDA-graph replays included); on CPU the operators'
self CPU time stands in, so the same code runs in CI. Used by ``decode-step --profile-steps``
after its timed loop: the profiler's own cost stays out of the reported step times.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

# First match wins: collectives before GEMM (a fused GEMM + reduce is the reduce's cost).
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("all_gather", r"all_?gather"),
    ("all_reduce", r"nccl|all_?reduce|one_shot"),
    ("gemm", r"gemm|nvjet|cutlass|sm90_|xmma|gemv|splitkreduce|aten::(mm|addmm|bmm|matmul|linear)$"),
    ("attention", r"paged_attention|attn|attention|sdpa"),
    ("attention_combine", r"combine_splits"),
    ("norm", r"norm"),
    ("rotary", r"rotary|rope"),
    ("kv_write", r"write_kv|reshape_and_cache"),
    ("activation", r"silu|gelu|act_and_mul"),
    ("sampling", r"sampl|rank_tokens|philox|argmax|topk|softmax"),
    ("copy_elementwise", r"memcpy|memset|copy|elementwise_kernel|aten::(copy_|to|contiguous|clone|add|mul)$"),
)


def category(name: str) -> str:
    n = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, n):
            return cat
    return "other"


def profile_steps(step: Callable[[], Any], steps: int, device: torch.device, top: int = 12) -> dict[str, Any]:
    """Run ``step()`` ``steps`` times under the profiler. Returns per step: wall ms (with
    the profiler's overhead), busy ms (kernel time), kernel launches, ms and launches per
    category, and the ``top`` kernels by time."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    kernels: dict[str, list[float]] = {}  # name -> [ms per step, launches per step]
    for e in prof.key_averages():
        if cuda:
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        else:
            if not e.key.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
        kernels[e.key] = [us / 1e3 / steps, e.count / steps]
    by_cat: dict[str, list[float]] = {}
    for name, (ms, n) in kernels.items():
        acc = by_cat.setdefault(category(name), [0.0, 0.0])
        acc[0] += ms
        acc[1] += n
    ordered = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    return {
        "steps": steps,
        "source": "cuda kernels" if cuda else "cpu operators (self time)",
        "wall_ms": wall_ms,
        "busy_ms": sum(ms for ms, _ in kernels.values()),
        "launches": sum(n for _, n in kernels.values()),
        "by_category": {c: {"ms": round(v[0], 4), "launches": v[1]}
                        for c, v in sorted(by_cat.items(), key=lambda kv: -kv[1][0])},
        "top": [{"name": name[:120], "ms": round(ms, 4), "launches": n} for name, (ms, n) in ordered[:top]],
    }


def summary_line(p: dict[str, Any]) -> str:
    """One line: busy ms, launches, then category=ms/launches, largest first."""
    cats = " ".join(f"{c}={v['ms']:.3f}/{v['launches']:.0f}" for c, v in p["by_category"].items())
    return f"busy {p['busy_ms']:.3f} ms/step, {p['launches']:.0f} launches: {cats}"
