"""Device busy time vs wall time per decode step (Qwen2.5-1.5B, ctx 2048): is a step host- or device-bound?"""
import json, os, random, tempfile, time
from pathlib import Path
import torch
from torch.profiler import ProfilerActivity, profile
from benchmarks.common import write_model_dir
from rollout import LLM, SamplingParams

with tempfile.TemporaryDirectory() as tmp:
    llm = LLM(write_model_dir("qwen2.5-1.5b", Path(tmp)), dtype="bfloat16", load_format="dummy",
              max_model_len=2400, max_num_seqs=256, kv_cache_memory_bytes=24 << 30)
res = {}
for batch in (1, 64, 256):
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
    kern = {}
    total = 0.0
    for e in prof.key_averages():
        dt = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total += dt
            kern[e.key] = dt
    top = sorted(kern.items(), key=lambda kv: -kv[1])[:12]
    res[batch] = {"wall_ms_per_step": wall, "device_busy_ms_per_step": total / 1e3 / steps,
                  "top_kernels_ms_per_step": {k[:90]: round(v / 1e3 / steps, 4) for k, v in top}}
    print(batch, json.dumps(res[batch]), flush=True)
    llm.abort(ids)
Path(os.environ.get("OUT", "."), "prof_step.json").write_text(json.dumps(res, indent=1))
