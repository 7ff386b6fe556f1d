"""Qwen2.5-1.5B, ~68 GB KV arena: where do sleep(1)/wake_up() spend their time, and does the
overlapped wake (weights H2D in flight while the KV arena maps; no KV zeroing) help?"""
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_model_dir
from rollout import LLM, SamplingParams
from rollout.memory import cuda_vmm


def ms(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - t0) * 1e3, 2)


out = {}
with tempfile.TemporaryDirectory() as tmp:
    path = write_model_dir("qwen2.5-1.5b", Path(tmp))
    llm = LLM(path, dtype="bfloat16", load_format="dummy", max_model_len=1024)
llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
mem = llm.memory
w, kv = mem.arenas["weights"], mem.arenas["kv_cache"]
out["weights_bytes"], out["kv_bytes"] = w.nbytes, kv.nbytes
for cyc in range(4):
    out[f"new_sleep1_{cyc}"] = ms(lambda: llm.sleep(1))
    out[f"new_wake_{cyc}"] = ms(llm.wake_up)
print(json.dumps(out), flush=True)

# Scrub theory: a pause between sleep and wake.
for pause in (0.25, 1.0):
    llm.sleep(1)
    time.sleep(pause)
    out[f"wake_after_{pause}s"] = ms(llm.wake_up)

# The old wake, step by step (weights map, KV map, blocking copy, KV zero).
host = mem._host_weights
for cyc in range(2):
    llm.sleep(1)
    out[f"old_w_restore_{cyc}"] = ms(w.restore)
    out[f"old_kv_restore_{cyc}"] = ms(kv.restore)
    out[f"old_copy_{cyc}"] = ms(lambda: w.tensor.copy_(host, non_blocking=False))
    out[f"old_zero_{cyc}"] = ms(kv.tensor.zero_)
# The new order by parts: weights map, async copy, KV map (host time while the copy runs).
for cyc in range(2):
    llm.sleep(1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    w.restore()
    t1 = time.perf_counter()
    w.tensor.copy_(host, non_blocking=True)
    t2 = time.perf_counter()
    kv.restore()
    t3 = time.perf_counter()
    torch.cuda.synchronize()
    t4 = time.perf_counter()
    out[f"parts_{cyc}"] = {"w_map": (t1 - t0) * 1e3, "copy_issue": (t2 - t1) * 1e3, "kv_map": (t3 - t2) * 1e3,
                           "sync_wait": (t4 - t3) * 1e3, "total": (t4 - t0) * 1e3}
# Sleep by parts.
for cyc in range(2):
    torch.cuda.synchronize()
    out[f"sleep_d2h_{cyc}"] = ms(lambda: host.copy_(w.tensor, non_blocking=True))
    out[f"sleep_kv_release_{cyc}"] = ms(lambda: kv.release(synchronized=True))
    out[f"sleep_w_release_{cyc}"] = ms(lambda: w.release(synchronized=True))
    out[f"sleep_empty_cache_{cyc}"] = ms(torch.cuda.empty_cache)
    out[f"kv_map_after_release_{cyc}"] = ms(kv.restore)
    out[f"kv_release_again_{cyc}"] = ms(lambda: kv.release(synchronized=True))
    time.sleep(1.0)
    out[f"kv_map_after_1s_{cyc}"] = ms(kv.restore)
    out[f"w_map_{cyc}"] = ms(w.restore)
    w.tensor.copy_(host)  # the weights again (untimed)
# Driver calls of the KV map alone, on a fresh arena-sized allocation.
kv.release(synchronized=True)
drv = cuda_vmm._driver()
t = {}
t0 = time.perf_counter()
handle = cuda_vmm._check(drv.cuMemCreate(kv.nbytes, kv._prop, 0), "create")
t["create"] = (time.perf_counter() - t0) * 1e3
t0 = time.perf_counter()
cuda_vmm._check(drv.cuMemMap(kv._ptr, kv.nbytes, 0, handle, 0), "map")
t["map"] = (time.perf_counter() - t0) * 1e3
acc = drv.CUmemAccessDesc()
acc.location = kv._prop.location
acc.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
t0 = time.perf_counter()
cuda_vmm._check(drv.cuMemSetAccess(kv._ptr, kv.nbytes, [acc], 1), "access")
t["set_access"] = (time.perf_counter() - t0) * 1e3
t0 = time.perf_counter()
cuda_vmm._check(drv.cuMemUnmap(kv._ptr, kv.nbytes), "unmap")
t["unmap"] = (time.perf_counter() - t0) * 1e3
t0 = time.perf_counter()
cuda_vmm._check(drv.cuMemRelease(handle), "release")
t["release"] = (time.perf_counter() - t0) * 1e3
out["driver_ms"] = t
kv.restore()
llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
print(json.dumps(out), flush=True)
Path(os.environ.get("OUT", "."), "diag_wake3.json").write_text(json.dumps(out, indent=1))
