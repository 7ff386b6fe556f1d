"""Registers and spills of the compiled attention kernels, and B=64 Qwen2.5-1.5B decode attention
across warps/stages/block_n at 4 and 8 splits (CUDA-graph timed)."""
import json, sys, os
import torch
from benchmarks import tune_attention as tu
from rollout.kernels import triton_attention as ta

h, kvh, d = tu.MODELS["qwen2.5-1.5b"]
rows = []
for b in (64,):
    c = tu._build([(2048, 1)] * b, h, kvh, d, "cuda")
    ref = ta.paged_attention(c["query"], c["kv"], c["tables"], c["qsl"], c["seq_lens"], d ** -0.5,
                             max_query_len=1, max_seq_len=c["max_seq_len"]).float()
    for splits in (4, 8):
        for bn, st, nw in ((64, 2, 4), (64, 1, 4), (32, 2, 4), (64, 2, 8), (128, 2, 8), (32, 3, 2), (64, 3, 4)):
            r = tu._attempt(c, ref, splits, ta.Tiling(block_n=bn, num_stages=st, num_warps=nw))
            r["batch"] = b
            rows.append(r)
            print(b, splits, bn, st, nw, round(r.get("us", -1), 1), r.get("error", ""), flush=True)
# mixed-step variant too
c = tu._build([(0, 1024)] * 4 + [(1500, 1)] * 8, h, kvh, d, "cuda")
ta.paged_attention(c["query"], c["kv"], c["tables"], c["qsl"], c["seq_lens"], d ** -0.5,
                   max_query_len=c["max_query_len"], max_seq_len=c["max_seq_len"])
torch.cuda.synchronize()
regs = []
try:
    caches = ta._paged_attention_kernel.device_caches
    for dev, entry in caches.items():
        kc = entry[0]
        for key, k in kc.items():
            k._init_handles()
            md = k.metadata
            regs.append(dict(n_regs=k.n_regs, n_spills=k.n_spills, num_warps=md.num_warps, num_stages=md.num_stages,
                             shared=md.shared, key=str(key)[:300]))
            print("regs", k.n_regs, "spills", k.n_spills, "warps", md.num_warps, "stages", md.num_stages, "smem", md.shared, flush=True)
except Exception as e:
    print("introspection failed:", type(e).__name__, e, [a for a in dir(ta._paged_attention_kernel) if 'cache' in a])
json.dump({"rows": rows, "regs": regs}, open(os.path.join(sys.argv[1], "regs_and_tiling.json"), "w"), indent=1)
