"""Where does the wake of a small model spend its time? Times each part of sleep(1)/wake."""
import json, os, sys, time, tempfile
from pathlib import Path
import torch
from benchmarks.common import write_model_dir
from rollout import LLM, SamplingParams

def ms(fn):
    torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3

out = {}
for model, kvb in (("qwen2.5-1.5b", None), ("qwen2.5-1.5b", 8 << 30)):
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model_dir(model, Path(tmp))
        kw = {} if kvb is None else {"kv_cache_memory_bytes": kvb}
        llm = LLM(path, dtype="bfloat16", load_format="dummy", max_model_len=1024, **kw)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
    mem = llm.memory
    w, kv = mem.arenas["weights"], mem.arenas["kv_cache"]
    r = {"weights_bytes": w.nbytes, "kv_bytes": kv.nbytes}
    for cyc in range(3):
        r[f"sleep1_ms_{cyc}"] = ms(lambda: llm.sleep(1))
        r[f"wake_ms_{cyc}"] = ms(llm.wake_up)
    llm.sleep(1)
    host = mem._host_weights
    r["host_pinned"] = bool(host.is_pinned())
    r["w_restore_ms"] = ms(w.restore)
    r["w_copy_ms"] = ms(lambda: w.tensor.copy_(host, non_blocking=False))
    r["w_copy_nb_ms"] = ms(lambda: w.tensor.copy_(host, non_blocking=True))
    r["kv_restore_ms"] = ms(kv.restore)
    r["kv_zero_ms"] = ms(kv.tensor.zero_)
    plain = torch.empty(w.nbytes, dtype=torch.uint8, device="cuda")
    r["plain_copy_ms"] = ms(lambda: plain.copy_(host, non_blocking=True))
    r["d2h_arena_ms"] = ms(lambda: host.copy_(w.tensor, non_blocking=True))
    r["d2h_plain_ms"] = ms(lambda: host.copy_(plain, non_blocking=True))
    del plain
    mem._host_weights = host
    r["h2d_GBps_arena"] = w.nbytes / r["w_copy_nb_ms"] / 1e6
    r["h2d_GBps_plain"] = w.nbytes / r["plain_copy_ms"] / 1e6
    out[f"{model}-kv{'auto' if kvb is None else kvb >> 30}"] = r
    print(json.dumps(r), flush=True)
    llm.sleep(2); del llm; torch.cuda.empty_cache()
Path(os.environ.get("OUT", "."), "diag_wake.json").write_text(json.dumps(out, indent=1))
