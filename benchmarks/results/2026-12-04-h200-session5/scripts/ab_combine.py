"""A/B in one process: split-KV attention with the merge in the same launch (split_counters)
vs the separate combine launch, at the decode shapes that split. CUDA-graph timed."""
import json, os, sys
import torch
from benchmarks import tune_attention as tu
from rollout.kernels import triton_attention as ta

CASES = [("qwen2.5-1.5b", 1, 2048), ("qwen2.5-1.5b", 64, 2048), ("qwen3-0.6b", 16, 1800), ("qwen3-8b", 1, 2048),
         ("qwen3-8b", 16, 2048)]
rows = []
for model, b, ctx in CASES:
    h, kvh, d = tu.MODELS[model]
    c = tu._build([(ctx, 1)] * b, h, kvh, d, "cuda")
    plan = ta.plan_launch(b, h, kvh, d, b, max_query_len=1, max_seq_len=c["max_seq_len"], device=c["query"].device)
    counters = torch.zeros(plan.num_q_tiles * kvh, dtype=torch.int32, device="cuda")

    def run(cnt):
        return ta.paged_attention(c["query"], c["kv"], c["tables"], c["qsl"], c["seq_lens"], d ** -0.5,
                                  max_query_len=1, max_seq_len=c["max_seq_len"], split_counters=cnt)
    sep = run(None)
    fused = [run(counters) for _ in range(20)]
    equal = all(torch.equal(f, sep) for f in fused)
    zero = int(counters.abs().sum())
    t_sep = tu._time(lambda: run(None))
    t_fused = tu._time(lambda: run(counters))
    zero_after = int(counters.abs().sum())
    row = dict(model=model, batch=b, ctx=ctx, splits=plan.num_splits, sep_us=t_sep * 1e6, fused_us=t_fused * 1e6,
               bitwise_equal=equal, counters_nonzero=zero + zero_after)
    rows.append(row)
    print(f"{model:13s} B={b:3d} splits={plan.num_splits:2d}  separate {t_sep*1e6:6.1f} us  fused {t_fused*1e6:6.1f} us  "
          f"equal={equal} counters_left={zero + zero_after}", flush=True)
json.dump(rows, open(os.path.join(sys.argv[1], "ab_combine.json"), "w"), indent=1)
