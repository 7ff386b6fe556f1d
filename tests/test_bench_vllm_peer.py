"""``rollout-bench peer --peer-engine vllm`` (rollout/bench/vllm_peer.py) on CPU, without
vLLM: its code path end to end through rollout's vllm alias (in a subprocess: the alias
changes sys.path), labelled as the alias and never as vLLM; through a stand-in shaped as
vLLM 0.22's LLM (release through ``llm_engine.engine_core.shutdown()``); the refusals;
decode-step's lead past the prefills. vLLM itself runs on the GPU machine
(benchmarks/vllm_wheels.sh)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import types
from types import SimpleNamespace

import pytest

from rollout.bench import cli, roofline, vllm_peer
from rollout.bench.common import Options
from rollout.config import DEFAULT_MAX_NUM_BATCHED_TOKENS, CacheConfig, SchedulerConfig

TINY = ["--model", "tiny", "--device", "cpu", "--scale", "0.01", "--kv-cache-gb", "0.01"]
HW = roofline.Hardware(copy_bw=1e9, matmul_rate=1e9)


def _main_with_alias(*args: str) -> subprocess.CompletedProcess:
    code = ("from rollout.compat import install_vllm_alias; install_vllm_alias()\n"
            "from rollout.bench.cli import main\n"
            f"raise SystemExit(main({list(args)!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("workload", ["nano-bench", "decode-step"])
def test_through_the_alias_end_to_end_labelled_not_vllm(workload, tmp_path):
    out = tmp_path / "peer.json"
    extra = ["--batches", "1,256"] if workload == "decode-step" else []
    r = _main_with_alias("peer", "--peer-engine", "vllm", "--allow-vllm-alias", "--peer-workload", workload, *TINY,
                         *extra, "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "against vllm 0.22.0+rollout: rollout's own alias, NOT vLLM" in r.stdout
    rec = json.loads(out.read_text())
    assert rec["peer_engine"] == "vllm" and rec["peer_workload"] == workload
    assert rec["vllm_version"] == "0.22.0+rollout" and rec["vllm_is_rollout_alias"] is True
    assert "vllm_alias_root" in rec["vllm_path"]
    assert rec["options"]["peer_engine"] == "vllm" and rec["options"]["allow_vllm_alias"] is True
    vllm = rec["vllm"]
    opts = vllm["options"]
    assert opts["load_format"] == "dummy" and opts["skip_tokenizer_init"] is True
    assert opts["dtype"] == "float32" and opts["seed"] == 0 and opts["enforce_eager"] is False
    assert opts["enable_prefix_caching"] is True and opts["gpu_memory_utilization"] == CacheConfig.gpu_memory_utilization
    assert opts["kv_cache_memory_bytes"] == int(0.01 * 2**30)
    assert opts["max_num_batched_tokens"] == DEFAULT_MAX_NUM_BATCHED_TOKENS
    assert vllm["sampling"] == {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "ignore_eos": True,
                                "max_tokens": 1, "detokenize": False, "seed": None}
    assert vllm["release"]["how"] == "llm.shutdown()"  # the alias has no engine_core
    assert vllm["env"] == {}  # no vllm.envs: not vLLM
    if workload == "nano-bench":
        assert opts["max_num_seqs"] == SchedulerConfig.max_num_seqs
        row = rec["rows"][0]
        assert row["vllm_output_tokens"] == rec["detail"]["expected_output_tokens"] == rec["detail"]["output_tokens"]
        assert row["ratio"] == pytest.approx(row["rollout_tok_s"] / row["vllm_tok_s"])
        assert rec["ratio"] == row["ratio"]
    else:
        assert opts["max_num_seqs"] == 3  # max(batches) at this scale, as ours
        assert [r["batch"] for r in rec["rows"]] == [1, 3] and set(rec["ratio"]) == {"B=1", "B=3"}
        for row in rec["rows"]:
            assert row["rollout_steady"] and row["rollout_step_ms"] > 0
            assert row["vllm_lead_tokens"] == vllm_peer.lead_tokens(row["batch"], rec["context"],
                                                                    DEFAULT_MAX_NUM_BATCHED_TOKENS)
            assert len(row["vllm_short_s_all"]) == len(row["vllm_long_s_all"]) == vllm_peer.ROUNDS
            expected = (min(row["vllm_long_s_all"]) - min(row["vllm_short_s_all"])) / rec["steps"] * 1e3
            assert row["vllm_step_ms"] == pytest.approx(expected)
            if row["ratio"] is not None:
                assert row["ratio"] == pytest.approx(row["vllm_step_ms"] / row["rollout_step_ms"])


def test_the_alias_is_refused_without_the_flag(tmp_path):
    r = _main_with_alias("peer", "--peer-engine", "vllm", *TINY, "--out", str(tmp_path / "x.json"))
    assert r.returncode != 0
    assert "is rollout's own alias, not vLLM" in r.stderr and "--allow-vllm-alias" in r.stderr
    assert not (tmp_path / "x.json").exists()


def test_without_vllm_says_how_to_bring_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(RuntimeError, match="benchmarks/vllm_wheels.sh"):
        vllm_peer.run(Options(model="tiny", device="cpu", peer_engine="vllm"), HW)


def _stand_in(shutdowns: list[str], block_size: int = 16, num_gpu_blocks: int = 10_000) -> types.ModuleType:
    """A module shaped as vLLM 0.22 (LLM, SamplingParams, llm_engine.engine_core.shutdown,
    llm_engine.vllm_config) over rollout's engine: not the alias, so taken as vLLM."""
    import rollout

    class SyncMPClient:
        def __init__(self, llm):
            self._llm = llm

        def shutdown(self, timeout=None):
            shutdowns.append(type(self).__name__)
            self._llm.shutdown()

    class LLM:
        def __init__(self, **kwargs):
            self._llm = rollout.LLM(device="cpu", **kwargs)
            cache = SimpleNamespace(block_size=block_size, num_gpu_blocks=num_gpu_blocks, enable_prefix_caching=True)
            sched = SimpleNamespace(max_num_seqs=kwargs["max_num_seqs"], async_scheduling=True)
            self.llm_engine = SimpleNamespace(engine_core=SyncMPClient(self._llm),
                                              vllm_config=SimpleNamespace(cache_config=cache, scheduler_config=sched))

        def generate(self, prompts, params, use_tqdm=True):
            return self._llm.generate(prompts, params, use_tqdm=use_tqdm)

    mod = types.ModuleType("vllm")
    mod.__version__, mod.__file__ = "0.22.0", "<stand-in>"
    mod.LLM, mod.SamplingParams = LLM, rollout.SamplingParams
    return mod


def test_a_vllm_shaped_engine_is_released_through_its_engine_core(monkeypatch):
    shutdowns: list[str] = []
    monkeypatch.setitem(sys.modules, "vllm", _stand_in(shutdowns))
    opts = Options(model="tiny", device="cpu", dtype="float32", scale=0.01, kv_cache_bytes=1 << 20,
                   peer_engine="vllm", peer_workload="decode-step", batches=(1, 256))
    rec = vllm_peer.run(opts, HW)
    assert shutdowns == ["SyncMPClient"]
    assert rec["vllm_version"] == "0.22.0" and rec["vllm_is_rollout_alias"] is False
    assert rec["vllm"]["release"]["how"] == "llm.llm_engine.engine_core.shutdown() (SyncMPClient)"
    resolved = rec["vllm"]["resolved"]
    assert resolved["engine_core_client"] == "SyncMPClient" and resolved["block_size"] == 16
    assert resolved["async_scheduling"] is True and resolved["num_gpu_blocks"] == 10_000
    assert all(r["vllm_kv_fits"] is True for r in rec["rows"])
    # Too few KV blocks for the batch: said, not hidden.
    monkeypatch.setitem(sys.modules, "vllm", _stand_in(shutdowns, num_gpu_blocks=2))
    rec = vllm_peer.run(opts, HW)
    assert [r["vllm_kv_fits"] for r in rec["rows"]] == [True, False]


def test_memory_vllm_keeps_stops_the_run_before_ours(monkeypatch):
    """On a GPU: free memory after the release is compared with before vLLM started."""
    free = iter([10 << 30, 8 << 30, 8 << 30])
    monkeypatch.setattr(vllm_peer, "_free_device_bytes", lambda device: next(free))
    monkeypatch.setattr(vllm_peer, "RELEASE_WAIT_S", 0.5)
    monkeypatch.setitem(sys.modules, "vllm", _stand_in([]))
    built = []
    monkeypatch.setattr(vllm_peer, "build_llm", lambda *a, **k: built.append(1))
    opts = Options(model="tiny", device="cpu", dtype="float32", scale=0.01, kv_cache_bytes=1 << 20,
                   peer_engine="vllm", peer_workload="nano-bench")
    with pytest.raises(RuntimeError, match=r"vLLM still holds 2.0 GiB of cpu .*\(vllm#21073\)"):
        vllm_peer.run(opts, HW)
    assert not built  # ours never started


def test_cli_peer_engine_options(capsys):
    workload, opts, _ = cli.parse_args(["peer", "--peer-engine", "vllm", "--device", "cpu"])
    assert (workload, opts.peer_workload, opts.peer_engine) == ("peer", "nano-bench", "vllm")
    workload, opts, _ = cli.parse_args(["decode-step", "--peer", "--peer-engine", "vllm", "--device", "cpu",
                                        "--scale", "0.01", "--batches", "1,256"])
    assert (workload, opts.peer_workload) == ("peer", "decode-step")
    assert cli.parse_args(["peer", "--device", "cpu"])[1].peer_engine == "hf"
    refused = {
        ("peer", "--peer-engine", "vllm", "--peer-workload", "same-model"): "runs nano-bench, decode-step",
        ("peer", "--allow-vllm-alias"): "--allow-vllm-alias applies to --peer-engine vllm",
        ("nano-bench", "--peer-engine", "vllm"): "applies to peer",
        ("peer", "--peer-engine", "vllm", "--quantization", "fp8"): "--quantization with --peer-engine vllm",
        ("peer", "--peer-engine", "vllm", "--batch-invariant"): "--batch-invariant with --peer-engine vllm",
    }
    for argv, message in refused.items():
        with pytest.raises(SystemExit):
            cli.parse_args([*argv, "--device", "cpu"])
        assert message in capsys.readouterr().err, argv


def test_engine_options_are_ours():
    from rollout import LLM

    defaults = inspect.signature(LLM).parameters
    assert defaults["max_num_seqs"].default == SchedulerConfig.max_num_seqs
    assert defaults["gpu_memory_utilization"].default == CacheConfig.gpu_memory_utilization
    assert defaults["enable_prefix_caching"].default is True
    o = vllm_peer.engine_options(Options(dtype="bfloat16", seed=3, enforce_eager=True), "/m", max_model_len=99,
                                 max_num_seqs=7)
    assert o == dict(model="/m", load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=3,
                     enforce_eager=True, gpu_memory_utilization=0.9, kv_cache_memory_bytes=None, max_model_len=99,
                     max_num_seqs=7, max_num_batched_tokens=8192, enable_prefix_caching=True)


def _prefill_steps(batch: int, prompt_len: int, budget: int) -> int:
    """Steps until every prompt is prefilled under a chunked-prefill scheduler as vLLM V1's
    (and ours): running requests' decode tokens first, then prompts in order, the last one
    chunked, in what is left of the token budget."""
    remaining, decoding, steps = [prompt_len] * batch, 0, 0
    while remaining:
        steps += 1
        left = budget - decoding
        while remaining and left > 0:
            take = min(left, remaining[0])
            remaining[0] -= take
            left -= take
            if remaining[0] == 0:
                remaining.pop(0)
                decoding += 1
    return steps


@pytest.mark.parametrize("batch,context", [(1, 2048), (64, 2048), (256, 2048), (256, 8192), (3, 20), (1000, 2048)])
def test_lead_tokens_pass_every_prefill(batch, context):
    """decode-step's m exceeds the prefill steps, so T(m + k) - T(m) is k steps of the whole batch."""
    budget = DEFAULT_MAX_NUM_BATCHED_TOKENS
    assert vllm_peer.lead_tokens(batch, context, budget) > _prefill_steps(batch, context - 1, budget)
    with pytest.raises(ValueError, match="batch < max_num_batched_tokens"):
        vllm_peer.lead_tokens(budget, context, budget)
