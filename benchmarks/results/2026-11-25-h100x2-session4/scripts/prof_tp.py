"""Per-kernel device time of one decode step, Qwen3-8B ctx 2048, TP=WORLD_SIZE (torchrun): where does TP=2 lose against half of TP=1?"""
import json, os, random, re, tempfile, time
from pathlib import Path
import torch, torch.distributed as dist
from torch.profiler import ProfilerActivity, profile
from benchmarks.common import write_model_dir
from rollout import LLM, SamplingParams

ws = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
torch.cuda.set_device(dev)
if ws > 1:
    dist.init_process_group("nccl")
with tempfile.TemporaryDirectory() as tmp:
    llm = LLM(write_model_dir("qwen3-8b", Path(tmp)), dtype="bfloat16", load_format="dummy", device=dev,
              max_model_len=2400, max_num_seqs=64, kv_cache_memory_bytes=26 << 30, tensor_parallel_size=ws)

def cat(name):
    n = name.lower()
    for k, pat in (("allreduce", "nccl|all_reduce|allreduce|one_shot"), ("gemm", "gemm|nvjet|cutlass|sm90|xmma|gemv"),
                   ("attention", "paged|attn|attention"), ("combine", "combine"), ("norm", "norm"), ("rotary", "rot"),
                   ("kv_write", "kv|cache|reshape"), ("act", "silu|act"), ("sample", "sampl|philox|argmax|topk|exp")):
        if re.search(pat, n):
            return k
    return "other"

res = {}
for batch in (1, 64):
    rng = random.Random(batch)
    sp = SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=300, detokenize=False, output_kind="final_only")
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for rid in ids:
        llm.add_request([rng.randrange(150000) for _ in range(2047)], sp, request_id=rid)
    reqs = [llm.engine.scheduler.requests[r] for r in ids]
    while any(r.num_output_tokens == 0 for r in reqs):
        llm.step()
    for _ in range(10):
        llm.step()
    torch.cuda.synchronize()
    steps = 20
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            llm.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps * 1e3
    kern, cats, count = {}, {}, 0
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            dt = (getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)) / 1e3 / steps
            kern[e.key] = (round(dt, 4), e.count / steps)
            c = cat(e.key)
            cats[c] = [round(cats.get(c, [0, 0])[0] + dt, 4), cats.get(c, [0, 0])[1] + e.count / steps]
            count += e.count / steps
    top = sorted(kern.items(), key=lambda kv: -kv[1][0])[:14]
    res[batch] = {"wall_ms": round(wall, 3), "busy_ms": round(sum(v[0] for v in cats.values()), 3), "kernels_per_step": count,
                  "by_category_ms_count": dict(sorted(cats.items(), key=lambda kv: -kv[1][0])),
                  "top": {k[:70]: v for k, v in top}}
    llm.abort(ids)
llm.shutdown()
if rank == 0:
    Path(os.environ["OUT"], f"prof_tp{ws}.json").write_text(json.dumps(res, indent=1))
    for b, r in res.items():
        print(f"TP={ws} B={b}: wall {r['wall_ms']} ms busy {r['busy_ms']} ms kernels/step {r['kernels_per_step']:.0f}")
        print("   ", " ".join(f"{k}={v[0]:.3f}/{v[1]:.0f}" for k, v in r["by_category_ms_count"].items()))
if ws > 1:
    dist.destroy_process_group()
