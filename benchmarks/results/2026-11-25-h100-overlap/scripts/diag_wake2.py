"""Qwen2.5-1.5B with a ~68 GB KV arena: why is the host->device weight copy at half speed?"""
import json, os, time, tempfile
from pathlib import Path
import torch
from benchmarks.common import write_model_dir
from rollout import LLM, SamplingParams

def ms(fn):
    torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize()
    return round((time.perf_counter() - t0) * 1e3, 2)

with tempfile.TemporaryDirectory() as tmp:
    llm = LLM(write_model_dir("qwen2.5-1.5b", Path(tmp)), dtype="bfloat16", load_format="dummy", max_model_len=1024)
llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
mem = llm.memory
w, kv = mem.arenas["weights"], mem.arenas["kv_cache"]
llm.sleep(1); llm.wake_up(); llm.sleep(1)
host = mem._host_weights
r = {}
def variant(name, fn, order=("w", "kv")):
    for a in order:
        (w if a == "w" else kv).restore()
    r[name] = ms(fn)
    w.release(); kv.release()
variant("base_w_only", lambda: w.tensor.copy_(host, non_blocking=True), order=("w",))
variant("kv_first", lambda: w.tensor.copy_(host, non_blocking=True), order=("kv", "w"))
def chunked(step):
    def f():
        for o in range(0, w.nbytes, step):
            w.tensor[o:o + step].copy_(host[o:o + step], non_blocking=True)
    return f
variant("chunk_64MB", chunked(64 << 20), order=("w",))
variant("chunk_512MB", chunked(512 << 20), order=("w",))
bounce = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
def bounced():
    n = bounce.numel()
    for o in range(0, w.nbytes, n):
        m = min(n, w.nbytes - o)
        bounce[:m].copy_(host[o:o + m], non_blocking=True)
        w.tensor[o:o + m].copy_(bounce[:m], non_blocking=True)
variant("bounce_256MB", bounced, order=("w",))
del bounce
# Touch the arena with a kernel first (page-table warm-up), then copy.
def touched():
    w.tensor.zero_(); torch.cuda.synchronize()
variant("zero_then_copy", lambda: (w.tensor.zero_(), w.tensor.copy_(host, non_blocking=True)), order=("w",))
w.restore(); r["zero_alone"] = ms(w.tensor.zero_); r["copy_after_zero"] = ms(lambda: w.tensor.copy_(host, non_blocking=True)); w.release()
r["d2h_from_arena"] = None
w.restore(); kv.restore()
r["d2h_arena"] = ms(lambda: host.copy_(w.tensor, non_blocking=True))
r["h2d_arena_both_mapped"] = ms(lambda: w.tensor.copy_(host, non_blocking=True))
r["h2d_arena_again"] = ms(lambda: w.tensor.copy_(host, non_blocking=True))
print(json.dumps(r), flush=True)
Path(os.environ.get("OUT", "."), "diag_wake2.json").write_text(json.dumps(r, indent=1))
