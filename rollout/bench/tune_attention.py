"""Sweep the paged-attention kernel's split count and launch shape (``Tiling``) on a GPU at
the attention shapes of the benchmark models, next to the default policy's choice.

    python -m rollout.bench.tune_attention --out tune_attention.json

Decode cases report the KV read bandwidth (bytes of K and V attended / kernel time) as a
fraction of the device copy bandwidth measured in the same run; prefill cases report
TFLOP/s next to torch SDPA (flash) on the same causal shapes. Every configuration's output
is checked against the default one (a launch shape that computes something else is an
error, not a speed-up). Times: the median of CUDA-graph replays of ``REPEATS`` calls each
(decode steps run in graphs; timing single eager calls would time the Python launch).
Each case's rows are printed and the JSON rewritten as they come, so a time limit keeps
what was measured. At the end, ``compiled``: registers and spills of every attention kernel
variant the sweep compiled (a spill is a launch shape asking for more than the SM holds).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

# (name, query heads, KV heads, head dim) of the benchmark models.
MODELS = {"qwen2.5-1.5b": (12, 2, 128), "qwen3-0.6b": (16, 8, 128), "qwen3-8b": (32, 8, 128)}
BLOCK_SIZE = 16
DECODE_CASES = [  # (model, batch, context)
    ("qwen2.5-1.5b", 1, 2048), ("qwen2.5-1.5b", 64, 2048), ("qwen2.5-1.5b", 256, 2048),
    ("qwen3-0.6b", 16, 1800), ("qwen3-0.6b", 64, 1500), ("qwen3-0.6b", 128, 1300), ("qwen3-0.6b", 256, 1100),
    ("qwen3-8b", 64, 2048),
]
PREFILL_CASES = [  # (model, [(context, query tokens), ...], label)
    ("qwen3-0.6b", [(0, 1024)] * 8, "8 prompts x 1024"),
    ("qwen3-0.6b", [(1024, 1024)] + [(1500, 1)] * 64, "chunk 1024 on 1024 + 64 decodes"),
    ("qwen2.5-1.5b", [(0, 2048)] * 4, "4 prompts x 2048"),
]
SPLITS = (1, 2, 3, 4, 5, 6, 8, 12, 16)


def _build(specs: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, dev: str) -> dict[str, Any]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    blocks = [-(-(c + q) // BLOCK_SIZE) for c, q in specs]
    num_blocks = sum(blocks) + 1
    kv = torch.randn(2, num_blocks, BLOCK_SIZE, kv_heads, head_dim, generator=gen).to(dev, torch.bfloat16)
    perm = torch.randperm(num_blocks, generator=gen).int()
    tables = torch.zeros(len(specs), max(blocks), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = perm[used : used + n]
        used += n
    q_lens = torch.tensor([q for _, q in specs])
    qsl = torch.cat([torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0)]).int()
    return {
        "query": torch.randn(int(q_lens.sum()), heads, head_dim, generator=gen).to(dev, torch.bfloat16),
        "kv": kv, "tables": tables.to(dev), "qsl": qsl.to(dev),
        "seq_lens": torch.tensor([c + q for c, q in specs], dtype=torch.int32, device=dev),
        "max_query_len": int(q_lens.max()), "max_seq_len": max(c + q for c, q in specs),
        "kv_bytes": sum(c + q for c, q in specs) * kv_heads * head_dim * 2 * 2,
        "flops": sum(4 * q * (c + (q + 1) / 2) * heads * head_dim for c, q in specs),
    }


REPEATS = 10


def _time(fn) -> float:
    """Seconds per call: median over replays of a graph holding ``REPEATS`` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # allocations and compilation outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPEATS):
            fn()
    graph.replay()
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / REPEATS)
    return sorted(times)[len(times) // 2]


def _attempt(case: dict[str, Any], ref: torch.Tensor, splits: int | None, tiling) -> dict[str, Any]:
    from rollout.kernels import triton_attention as ta

    def run():
        return ta.paged_attention(
            case["query"], case["kv"], case["tables"], case["qsl"], case["seq_lens"], case["query"].shape[-1] ** -0.5,
            max_query_len=case["max_query_len"], max_seq_len=case["max_seq_len"], num_splits=splits, tiling=tiling,
        )

    q, kv = case["query"], case["kv"]
    plan = ta.plan_launch(q.shape[0], q.shape[1], kv.shape[3], q.shape[2], case["seq_lens"].shape[0],
                          max_query_len=case["max_query_len"], max_seq_len=case["max_seq_len"], device=q.device,
                          num_splits=splits, tiling=tiling)
    row = {"splits": splits, "tiling": asdict(tiling) if tiling else None, "plan": asdict(plan)}
    try:
        out = run().float()
        err = ((out - ref).norm() / ref.norm()).item()
        if not err < 2e-2:
            return {**row, "error": f"relative error {err:.2e} vs the default launch"}
        seconds = _time(run)
    except Exception as e:  # a shape that does not compile (shared memory) is a data point
        return {**row, "error": f"{type(e).__name__}: {str(e)[:160]}"}
    return {**row, "us": seconds * 1e6, "kv_GBps": case["kv_bytes"] / seconds / 1e9,
            "TFLOPs": case["flops"] / seconds / 1e12}


def _sweep_case(case: dict[str, Any], decode: bool, num_sms: int) -> dict[str, Any]:
    from rollout.kernels import triton_attention as ta

    ref = ta.paged_attention(
        case["query"], case["kv"], case["tables"], case["qsl"], case["seq_lens"], case["query"].shape[-1] ** -0.5,
        max_query_len=case["max_query_len"], max_seq_len=case["max_seq_len"],
    ).float()
    rows = [_attempt(case, ref, None, None)]
    if decode:
        rows += [_attempt(case, ref, s, None) for s in SPLITS]
        ok = [r for r in rows if "us" in r]
        best_split = min(ok, key=lambda r: r["us"])["splits"] if ok else None
        for split in dict.fromkeys([None, best_split]):
            for bn, st, nw in ((32, 2, 4), (64, 3, 4), (128, 2, 4), (128, 3, 4), (128, 2, 8), (64, 2, 2)):
                rows.append(_attempt(case, ref, split, ta.Tiling(block_n=bn, num_stages=st, num_warps=nw)))
    else:
        for bm, bn, nw, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)):
            rows.append(_attempt(case, ref, 1, ta.Tiling(block_m=bm, block_n=bn, num_warps=nw, num_stages=st)))
    return {"rows": rows}


def _sdpa_seconds(specs, heads: int, kv_heads: int, head_dim: int, dev: str) -> float | None:
    """Dense causal SDPA over the same fresh prompts (equal lengths only): a peer number."""
    if any(c for c, _ in specs) or len({q for _, q in specs}) != 1:
        return None
    n, q_len = len(specs), specs[0][1]
    q = torch.randn(n, heads, q_len, head_dim, device=dev, dtype=torch.bfloat16)
    k = torch.randn(n, kv_heads, q_len, head_dim, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    return _time(fn)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tune_attention.json"))
    parser.add_argument("--only", choices=("decode", "prefill"), default=None)
    args = parser.parse_args(argv)
    from rollout.bench import roofline
    from rollout.bench.common import env_info
    from rollout.kernels import triton_attention as ta

    dev = "cuda"
    t0 = time.perf_counter()
    hw = roofline.measure_hardware(torch.device(dev), torch.bfloat16)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    result: dict[str, Any] = {"env": env_info(torch.device(dev)), "hardware": hw.to_json(), "num_sms": num_sms,
                              "defaults": {"decode": asdict(ta.default_tiling(True, 128)),
                                           "mixed": asdict(ta.default_tiling(False, 128))},
                              "decode": [], "prefill": []}
    table = []
    for model, batch, ctx in DECODE_CASES if args.only != "prefill" else ():
        heads, kv_heads, head_dim = MODELS[model]
        case = _build([(ctx - 1, 1)] * batch, heads, kv_heads, head_dim, dev)
        res = {"model": model, "batch": batch, "context": ctx, **_sweep_case(case, True, num_sms)}
        result["decode"].append(res)
        table.append(_summary(f"decode {model} B={batch} ctx={ctx}", res["rows"], "kv_GBps", hw.copy_bw / 1e9))
        _report(res, table[-1], args.out, result)
    for model, specs, label in PREFILL_CASES if args.only != "decode" else ():
        heads, kv_heads, head_dim = MODELS[model]
        case = _build(specs, heads, kv_heads, head_dim, dev)
        res = {"model": model, "case": label, **_sweep_case(case, False, num_sms)}
        sdpa = _sdpa_seconds(specs, heads, kv_heads, head_dim, dev)
        res["sdpa_us"] = sdpa * 1e6 if sdpa else None
        res["sdpa_TFLOPs"] = case["flops"] / sdpa / 1e12 if sdpa else None
        result["prefill"].append(res)
        table.append(_summary(f"prefill {model} {label}", res["rows"], "TFLOPs", None)
                     + (f" | sdpa {res['sdpa_us']:.0f} us" if sdpa else ""))
        _report(res, table[-1], args.out, result)
    result["compiled"] = _compiled_kernels()
    result["seconds"] = time.perf_counter() - t0
    args.out.write_text(json.dumps(result, indent=1))
    print("\n".join(["", "case | default (policy) | best", *table]))
    if isinstance(result["compiled"], list) and result["compiled"]:
        regs = [k["n_regs"] for k in result["compiled"]]
        print(f"{len(regs)} compiled attention kernels: {min(regs)}-{max(regs)} registers, "
              f"{sum(k['n_spills'] for k in result['compiled'])} spills")
    else:
        print(f"compiled attention kernels: {result['compiled']}")


def _compiled_kernels() -> list[dict[str, Any]] | str:
    """Registers, spills, warps, stages and shared memory of every variant of the attention
    kernel compiled in this process, from Triton's kernel cache. That cache is Triton's
    internal API: where it differs, the reason is returned instead of raised."""
    from rollout.kernels import triton_attention as ta

    try:
        rows = []
        for cache in ta._paged_attention_kernel.device_caches.values():
            for key, kernel in cache[0].items():
                kernel._init_handles()
                md = kernel.metadata
                rows.append({"n_regs": kernel.n_regs, "n_spills": kernel.n_spills, "num_warps": md.num_warps,
                             "num_stages": md.num_stages, "shared_bytes": md.shared, "key": str(key)[:300]})
        return rows
    except Exception as e:  # noqa: BLE001 - a report, not a failure of the sweep
        return f"unavailable ({type(e).__name__}: {str(e)[:160]})"


def _report(res: dict[str, Any], summary: str, out: Path, result: dict[str, Any]) -> None:
    for r in res["rows"]:
        timing = r.get("error") or f"{r['us']:8.1f} us {r['kv_GBps']:6.0f} GB/s {r['TFLOPs']:6.1f} TFLOP/s"
        print(f"  splits={r['splits']}->{r['plan']['num_splits']} tiling={r['tiling']}: {timing}")
    print(summary, flush=True)
    out.write_text(json.dumps(result, indent=1))


def _summary(name: str, rows: list[dict[str, Any]], metric: str, ceiling: float | None) -> str:
    ok = [r for r in rows if "us" in r]
    default, best = rows[0], min(ok, key=lambda r: r["us"])
    frac = lambda r: f" ({r[metric] / ceiling:.2f})" if ceiling else ""  # noqa: E731

    def fmt(r):
        if "us" not in r:
            return r["error"]
        return f"{r['us']:.0f} us {r[metric]:.0f}{frac(r)} splits={r['splits']} tiling={r['tiling']}"

    return f"{name} | {fmt(default)} | {fmt(best)}"


if __name__ == "__main__":
    main()
