"""GPU cases of the engine, each run in a fresh process by test_engine_gpu.py:
``python -m tests.gpu.engine_cases CASE WORKDIR`` prints one JSON line of results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from rollout import LLM, SamplingParams
from rollout.errors import WakeOOMError
from tests.helpers.models import VARIANTS, build_model_dir
from tests.helpers.tokenizer import build_tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
PROMPTS = [[5, 6, 7], list(range(10, 60)), [9], list(range(100, 117))]


def _dirs(work: Path) -> dict[str, Path]:
    tok = work / "tok"
    if not tok.exists():
        build_tokenizer(tok)
    out = {}
    for name in VARIANTS:
        d = work / name
        if not (d / "config.json").exists():
            build_model_dir(name, d, tok)
        out[name] = d
    out["llama_b"] = work / "llama_b"
    if not (out["llama_b"] / "config.json").exists():
        build_model_dir("llama", out["llama_b"], tok, seed=1)
    return out


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def case_matches_cpu(work: Path) -> dict:
    """fp32 greedy on the GPU (graphs and eager) equals the CPU path, every architecture."""
    res = {}
    for name, d in _dirs(work).items():
        cpu = _tokens(LLM(str(d), dtype="float32", device="cpu", num_kv_blocks=128))
        graphs = LLM(str(d), dtype="float32", device="cuda", num_kv_blocks=128)
        eager = LLM(str(d), dtype="float32", device="cuda", num_kv_blocks=128, enforce_eager=True)
        res[name] = {"graphs": _tokens(graphs) == cpu, "eager": _tokens(eager) == cpu,
                     "captured": graphs.worker.runner.graphs is not None}
    return res


def _warm_libraries() -> None:
    """Load cuBLAS and the attention kernels first: their code and handles are the process's,
    not the engine's footprint."""
    a = torch.randn(64, 64, device="cuda")
    (a @ a).sum().item()
    q = torch.randn(1, 4, 3, 16, device="cuda")
    torch.nn.functional.scaled_dot_product_attention(q, q[:, :2], q[:, :2], enable_gqa=True).sum().item()
    del a, q
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _measured_engine(d: Path) -> tuple[LLM, list[list[int]], dict]:
    """A 4 GiB-KV fp32 engine of ``d`` with its greedy tokens, and what it took: ``free0`` /
    ``free1`` (free device memory before it was built / after its first generate),
    ``arenas`` and ``footprint``: the arenas plus what torch's allocator reserved for it
    (activations, graph pools). The rest of free0 - free1 is CUDA's own: kernel code the
    process loaded on first use, graph objects; it stays with the process."""
    _warm_libraries()
    free0, _ = torch.cuda.mem_get_info()
    reserved0 = torch.cuda.memory_reserved()
    llm = LLM(str(d), dtype="float32", device="cuda", kv_cache_memory_bytes=4 << 30)
    ref = _tokens(llm)
    torch.cuda.synchronize()
    free1, _ = torch.cuda.mem_get_info()
    arenas = sum(v["device"] for v in llm.memory_usage().values())
    mem = {"free0": free0, "free1": free1, "arenas": arenas,
           "footprint": arenas + torch.cuda.memory_reserved() - reserved0}
    return llm, ref, mem


def case_sleep_frees_memory(work: Path) -> dict:
    d = _dirs(work)["llama"]
    llm, ref, mem = _measured_engine(d)
    free0, free1, arenas, footprint = mem["free0"], mem["free1"], mem["arenas"], mem["footprint"]
    ptrs = {n: p.data_ptr() for n, p in llm.model.named_parameters()}
    kv_ptr = llm.worker.runner.kv_caches[0].data_ptr()
    out = {"footprint": footprint, "arenas": arenas, "process_delta": free0 - free1}
    for level in (1, 2):
        llm.sleep(level)
        torch.cuda.synchronize()
        free2, _ = torch.cuda.mem_get_info()
        out[f"returned_fraction_level{level}"] = (free2 - free1) / footprint
        out[f"returned_of_process_delta_level{level}"] = (free2 - free1) / (free0 - free1)
        llm.wake_up(["weights"])
        if level == 2:
            llm.load_weights(str(d))
        llm.wake_up(["kv_cache"])
        out[f"same_output_level{level}"] = _tokens(llm) == ref
    sd = {n: p.detach().clone() for n, p in llm.model.named_parameters()}
    from safetensors.torch import load_file

    llm.update_weights(load_file(str(_dirs(work)["llama_b"] / "model.safetensors")).items())
    out["params_ptrs_unchanged"] = all(p.data_ptr() == ptrs[n] for n, p in llm.model.named_parameters())
    out["kv_ptr_unchanged"] = llm.worker.runner.kv_caches[0].data_ptr() == kv_ptr
    out["update_changed_weights"] = any(not torch.equal(p, sd[n]) for n, p in llm.model.named_parameters())
    out["vmm"] = llm.worker.memory.arenas["weights"].keeps_address
    return out


def case_shutdown_frees_everything(work: Path) -> dict:
    """shutdown() drops the graphs, unmaps the arenas and frees their address ranges; a new
    engine in the same process works."""
    d = _dirs(work)["llama"]
    llm, ref, mem = _measured_engine(d)
    llm.shutdown()
    free2, _ = torch.cuda.mem_get_info()
    out = {"returned_fraction": (free2 - mem["free1"]) / mem["footprint"], "graphs_dropped": llm.worker.runner.graphs is None,
           "addresses_freed": all(a.address is None for a in llm.worker.memory.arenas.values()),
           "process_delta_left": mem["free0"] - free2}
    with LLM(str(d), dtype="float32", device="cuda", kv_cache_memory_bytes=4 << 30) as again:
        out["new_engine_same_output"] = _tokens(again) == ref
    return out


def case_graph_replay_after_wake(work: Path) -> dict:
    """After sleep/wake (both levels) the captured graphs replay to the eager result."""
    d = _dirs(work)["qwen3"]
    eager = _tokens(LLM(str(d), dtype="float32", device="cuda", num_kv_blocks=128, enforce_eager=True))
    llm = LLM(str(d), dtype="float32", device="cuda", num_kv_blocks=128)
    out = {"before": _tokens(llm) == eager}
    n_graphs = len(llm.worker.runner.graphs.graphs)
    for level in (1, 2):
        llm.sleep(level)
        llm.wake_up(["weights"])
        if level == 2:
            llm.load_weights(str(d))
        llm.wake_up(["kv_cache"])
        out[f"after_level{level}"] = _tokens(llm) == eager
    out["no_recapture"] = len(llm.worker.runner.graphs.graphs) == n_graphs
    return out


def case_wake_oom_rollback(work: Path) -> dict:
    d = _dirs(work)["llama"]
    llm = LLM(str(d), dtype="float32", device="cuda", kv_cache_memory_bytes=8 << 30)
    ref = _tokens(llm)
    llm.sleep(1)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    # Leave room for the weights but not for the KV cache: the wake must undo the weights.
    hog = torch.empty(free - (1 << 30), dtype=torch.uint8, device="cuda")
    out = {}
    try:
        llm.wake_up()
        out["raised"] = False
    except WakeOOMError as e:
        out["raised"] = True
        out["message"] = str(e)[:200]
    out["nothing_mapped"] = all(v["device"] == 0 for v in llm.memory_usage().values())
    del hog
    torch.cuda.empty_cache()
    llm.wake_up()
    out["later_wake_ok"] = _tokens(llm) == ref
    return out


def case_bf16_triton_vs_torch(work: Path) -> dict:
    """bf16: logprobs of the Triton path (kernels, graphs, fused sampler) against the torch
    path (SDPA attention, torch ops) on the same sequences, teacher-forced through score()."""
    from rollout.platforms.cuda import CudaPlatform

    res = {}
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=0)
    for name, d in _dirs(work).items():
        triton_llm = LLM(str(d), dtype="bfloat16", device="cuda", num_kv_blocks=256)
        assert triton_llm.stats().attention_backend == "triton"
        outs = triton_llm.generate(PROMPTS, params)
        seqs = [p + o.outputs[0].token_ids for p, o in zip(PROMPTS, outs)]
        got = [lp for o in outs for lp in o.outputs[0].token_logprobs]
        orig = (CudaPlatform.attention_backend, CudaPlatform.ops_backend)
        CudaPlatform.attention_backend = lambda self: "torch_sdpa"
        CudaPlatform.ops_backend = lambda self: "torch"
        try:
            torch_llm = LLM(str(d), dtype="bfloat16", device="cuda", num_kv_blocks=256, enforce_eager=True)
            assert torch_llm.stats().attention_backend == "torch_sdpa"
            ref = [lp for s, p in zip(torch_llm.score(seqs, prompt_lens=[len(p) for p in PROMPTS]), PROMPTS) for lp in s]
        finally:
            CudaPlatform.attention_backend, CudaPlatform.ops_backend = orig
        diffs = [abs(a - b) for a, b in zip(got, ref)]
        res[name] = {"mean_abs": sum(diffs) / len(diffs), "max_abs": max(diffs), "n": len(diffs), "n_ref": len(ref)}
        del triton_llm, torch_llm
        torch.cuda.empty_cache()
    return res


def case_default_kv_sizing(work: Path) -> dict:
    """KV sized by gpu_memory_utilization after a profile run: the process ends up using
    about that fraction of the device, and generation works."""
    d = _dirs(work)["qwen3"]
    llm = LLM(str(d), dtype="bfloat16", device="cuda", gpu_memory_utilization=0.3, max_num_batched_tokens=4096)
    ok = len(_tokens(llm)[0]) == GREEDY.max_tokens
    free, total = torch.cuda.mem_get_info()
    return {"generated": ok, "used_fraction": (total - free) / total, "num_blocks": llm.stats().num_kv_blocks}


def case_moe_routes_in_graphs(work: Path) -> dict:
    """fp32 Qwen3-MoE: decode steps replayed from CUDA graphs record each token's routed
    experts, so tokens, logprobs and routes equal the eager engine's; graphs were used."""
    from tests.test_qwen3_moe import build_moe_dir

    d = work / "moe_norm"
    if not (d / "config.json").exists():
        tok = work / "tok"
        if not tok.exists():
            build_tokenizer(tok)
        build_moe_dir("norm", d, tok)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0, return_routed_experts=True)

    def run(**kw) -> tuple[list, list, list, list]:
        llm = LLM(str(d), dtype="float32", device="cuda", num_kv_blocks=128, **kw)
        outs = llm.generate(PROMPTS, params)
        replays = 0 if llm.worker.runner.graphs is None else len(llm.worker.runner.graphs.graphs)
        llm.shutdown()
        return ([o.outputs[0].token_ids for o in outs], [o.outputs[0].routed_experts for o in outs],
                [o.prompt_routed_experts for o in outs], [replays])

    eager, graphs = run(enforce_eager=True), run()
    return {"tokens": graphs[0] == eager[0], "routes": graphs[1] == eager[1], "prompt_routes": graphs[2] == eager[2],
            "routes_complete": all(len(r) == 24 for r in graphs[1]), "captured": graphs[3][0] > 0}


def case_host_copy_in_background(work: Path) -> dict:
    """enable_sleep_mode=True with Qwen3-8B-sized random weights (16 GB, several seconds of
    pinning): the pinned host copy is allocated by a background thread while a second
    engine, built right away, captures its CUDA graphs (``ready_after_capture`` False: they
    overlapped; torch's pinned allocator queries CUDA events, which a capture in another
    thread forbids) and while the engine generates; then sleep(1)/wake keep the output and
    the first sleep(1) costs what later ones do."""
    import time

    from rollout.bench.configs import write_model_dir

    d = _dirs(work)["llama"]  # built before the big engine starts its thread
    big = LLM(str(write_model_dir("qwen3-8b", work)), dtype="bfloat16", device="cuda", load_format="dummy",
              kv_cache_memory_bytes=2 << 30, max_model_len=1024, enable_sleep_mode=True)
    out: dict = {"ready_at_build": big.worker.memory.wait_host_copy(0)}
    small = LLM(str(d), dtype="float32", device="cuda", num_kv_blocks=128)  # captures its graphs now
    out["ready_after_capture"] = big.worker.memory.wait_host_copy(0)
    ref = _tokens(big)
    out["small_captured"] = small.worker.runner.graphs is not None
    out["small_matches_cpu"] = _tokens(small) == _tokens(LLM(str(d), dtype="float32", device="cpu", num_kv_blocks=128))
    t0 = time.perf_counter()
    out["ready"] = big.worker.memory.wait_host_copy()
    out["wait_s"] = time.perf_counter() - t0
    out["host_bytes_ok"] = big.memory_usage()["weights"]["host"] == big.worker.memory.arenas["weights"].nbytes
    out["sleep1_s"] = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        big.sleep(1)
        torch.cuda.synchronize()
        out["sleep1_s"].append(time.perf_counter() - t0)
        big.wake_up()
    out["same_output"] = _tokens(big) == ref
    big.shutdown()
    small.shutdown()
    return out


def case_fp8_update_equals_load(work: Path) -> dict:
    """quantization="fp8": an engine loaded from a checkpoint (tensors read on the host) and
    one updated from the same weights as CUDA tensors hold the same fp8 bytes and scales
    (both quantize on the weight's device)."""
    from safetensors.torch import load_file

    d = _dirs(work)
    loaded = LLM(str(d["llama"]), dtype="float32", device="cuda", num_kv_blocks=64, quantization="fp8")
    updated = LLM(str(d["llama_b"]), dtype="float32", device="cuda", num_kv_blocks=64, quantization="fp8")
    sd = {k: v.cuda() for f in sorted(d["llama"].glob("*.safetensors")) for k, v in load_file(f).items()}
    updated.update_weights(sd)
    a, b = dict(loaded.model.named_parameters()), dict(updated.model.named_parameters())
    same = {n: bool(torch.equal(a[n].view(torch.uint8) if a[n].element_size() == 1 else a[n],
                                b[n].view(torch.uint8) if b[n].element_size() == 1 else b[n])) for n in a}
    out = {"all_equal": all(same.values()), "differ": [n for n, ok in same.items() if not ok][:5],
           "fp8_params": sum(p.element_size() == 1 for p in a.values()), "tokens": _tokens(loaded) == _tokens(updated)}
    loaded.shutdown()
    updated.shutdown()
    return out


CASES = {f.__name__[5:]: f for f in (case_matches_cpu, case_sleep_frees_memory, case_shutdown_frees_everything, case_graph_replay_after_wake, case_wake_oom_rollback, case_bf16_triton_vs_torch, case_default_kv_sizing, case_moe_routes_in_graphs, case_host_copy_in_background, case_fp8_update_equals_load)}

if __name__ == "__main__":
    name, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    print("RESULT " + json.dumps(CASES[name](work)))
