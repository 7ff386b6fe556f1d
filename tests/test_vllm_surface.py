"""vLLM's surface as the RL frameworks call it: LLM keywords, ``llm_engine`` weight paths,
``collective_rpc``, ``reload_weights`` after ``sleep(2)``, LoRA and structured-output names,
and the opt-in ``vllm`` alias. Each call pattern is written as the framework's source writes
it; the outputs are compared with a fresh engine on the same weights."""

from __future__ import annotations

import importlib.metadata
import inspect
import math
import subprocess
import sys

import pytest
import torch

from rollout import LLM, SamplingParams
from rollout.compat import alias_path, install_vllm_alias, is_alias_active
from rollout.errors import CheckpointError, InvalidRequestError, UnsupportedFeatureError, WeightUpdateError
from rollout.sampling_params import StructuredOutputsParams
from tests.helpers.engine_state import LOGPROB_TOL, PROMPTS, assert_same_greedy, changed, greedy, make_llm, snapshot

pytestmark = pytest.mark.numerics


# ---- 1. LLM keywords --------------------------------------------------------------------
ACCEPTED = [
    {"enable_sleep_mode": True}, {"enable_sleep_mode": False},
    {"distributed_executor_backend": "external_launcher"}, {"distributed_executor_backend": "uni"},
    {"distributed_executor_backend": None}, {"model_impl": "vllm"}, {"model_impl": "auto"},
    {"quantization": None}, {"trust_remote_code": True}, {"disable_custom_all_reduce": True},
    {"disable_log_stats": False}, {"enable_lora": False}, {"compilation_config": None},
    {"load_format": "safetensors"}, {"enable_chunked_prefill": False},
    {"logprobs_mode": "processed_logprobs"}, {"logprobs_mode": "raw_logprobs"}, {"logprobs_mode": "scaled"},
]


@pytest.mark.parametrize("kwargs", ACCEPTED, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_accepted_keywords_run(kwargs, a_dir, a_out):
    llm = make_llm(a_dir, **kwargs)
    if kwargs.get("logprobs_mode") in ("raw_logprobs", "scaled"):
        # Greedy: every mode reports the untempered distribution without filters.
        assert [ids for ids, _ in greedy(llm)] == [ids for ids, _ in a_out]
    else:
        assert_same_greedy(greedy(llm), a_out)


REFUSED = [
    ("distributed_executor_backend", "ray"), ("distributed_executor_backend", "mp"), ("model_impl", "transformers"),
    ("quantization", "bitsandbytes"), ("enable_lora", True),
    ("compilation_config", {"cudagraph_capture_sizes": [1, 2]}), ("logprobs_mode", "raw_logits"),
    ("logprobs_mode", "processed_logits"),
]


@pytest.mark.parametrize("name,value", REFUSED)
def test_unsupported_values_are_refused_by_name(name, value, a_dir):
    with pytest.raises(UnsupportedFeatureError, match=name):
        make_llm(a_dir, **{name: value})


def test_quantization_fp8_is_accepted(a_dir):
    llm = make_llm(a_dir, quantization="fp8")  # tests/test_fp8.py: what it does
    assert llm.config.vllm.quantization == "fp8" and llm.config.model.quantization == "fp8"


@pytest.mark.parametrize("name,value", [
    ("enable_sleep_mode", "yes"), ("trust_remote_code", 1), ("disable_log_stats", None), ("logprobs_mode", "probs"),
    ("distributed_executor_backend", 3), ("load_format", "pt"),
])
def test_bad_values_are_invalid(name, value, a_dir):
    with pytest.raises((InvalidRequestError, UnsupportedFeatureError)):
        make_llm(a_dir, **{name: value})


def test_unsupported_is_not_implemented():
    # vLLM's callers catch NotImplementedError for a backend that lacks a method.
    assert issubclass(UnsupportedFeatureError, NotImplementedError)


def test_engine_logprobs_mode_maps_vllm_names(a_dir):
    sampled = SamplingParams(temperature=0.7, top_k=5, max_tokens=6, logprobs=0, seed=3)
    prompts = [PROMPTS[0]]

    def run(**kw):
        out = make_llm(a_dir, **kw).generate(prompts, sampled)[0].outputs[0]
        return out.token_ids, out.token_logprobs

    ids_p, lp_p = run(logprobs_mode="processed_logprobs")
    ids_d, lp_d = run()
    ids_r, lp_r = run(logprobs_mode="raw_logprobs")
    assert ids_p == ids_d == ids_r  # the mode changes what is reported, not what is drawn
    assert lp_p == pytest.approx(lp_d, abs=LOGPROB_TOL)
    raw = make_llm(a_dir).score([prompts[0] + ids_r], [len(prompts[0])])[0]
    assert lp_r == pytest.approx(raw, abs=LOGPROB_TOL)
    # Top-5 at temperature 0.7 is a different distribution: the modes must differ somewhere.
    assert max(abs(a - b) for a, b in zip(lp_p, lp_r)) > 1e-3
    # A request's own mode wins over the engine's.
    llm = make_llm(a_dir, logprobs_mode="raw_logprobs")
    own = llm.generate(prompts, SamplingParams(**{**_fields(sampled), "logprobs_mode": "processed"}))[0].outputs[0]
    assert own.token_logprobs == pytest.approx(lp_p, abs=LOGPROB_TOL)


def _fields(p: SamplingParams) -> dict:
    return {k: getattr(p, k) for k in ("temperature", "top_k", "max_tokens", "logprobs", "seed")}


def test_skip_tokenizer_init(a_dir, a_out):
    llm = make_llm(a_dir, skip_tokenizer_init=True)
    assert llm.get_tokenizer() is None
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(temperature=0.0, max_tokens=8,
                                                                                    logprobs=0, detokenize=False))
    assert [o.outputs[0].token_ids for o in outs] == [ids for ids, _ in a_out]
    with pytest.raises(InvalidRequestError):
        llm.generate(["text needs a tokenizer"], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        make_llm(a_dir, skip_tokenizer_init=True, tokenizer=str(a_dir))


def test_kv_cache_sized_by_memory_stops_at_what_the_sequences_can_use(a_dir):
    """TRL passes no block count: a memory budget (2 GiB on CPU) must not become 250k blocks
    of a tiny model, re-allocated at every wake."""
    llm = LLM(str(a_dir), dtype="float32", max_num_seqs=4, max_model_len=64, gpu_memory_utilization=0.3)
    assert llm.stats().num_kv_blocks == 4 * -(-(64 + 1) // 16)


# ---- 2. llm_engine: where frameworks push weights ------------------------------------
def test_llm_engine_paths_load_weights_transactionally(a_dir, sd_a, sd_b, a_out, b_out):
    llm = make_llm(a_dir)
    eng = llm.llm_engine
    assert eng.model_config.max_model_len == llm.max_model_len
    assert eng.vllm_config.model_config is eng.model_config
    assert eng.model_config.model == str(a_dir) and eng.model_config.get_vocab_size() == llm.hf_config.vocab_size
    trl_model = eng.model_executor.driver_worker.model_runner.model  # TRL
    verl_model = eng.model_executor.driver_worker.worker.model_runner.model  # verl
    assert next(verl_model.parameters()).device == llm.device
    # A bad tensor anywhere: nothing changes.
    bad = dict(sd_b)
    bad["model.norm.weight"] = torch.full_like(sd_b["model.norm.weight"], float("nan"))
    before = snapshot(llm)
    with pytest.raises(WeightUpdateError):
        trl_model.load_weights(bad.items())
    assert not changed(before, snapshot(llm)) and llm.weight_version == 0
    # One tensor per call, as TRL's _push_param_to_vllm does.
    for name, t in sd_b.items():
        assert trl_model.load_weights([(name, t)]) == {name}
    assert_same_greedy(greedy(llm), b_out)
    # A generator, as verl's update_weights passes it.
    assert verl_model.load_weights((n, t) for n, t in sd_a.items()) == set(sd_a)
    assert_same_greedy(greedy(llm), a_out)
    assert eng.list_loras() == set()
    with pytest.raises(UnsupportedFeatureError):
        eng.add_lora(object())
    assert eng.reset_prefix_cache() is True and eng.get_tokenizer() is llm.get_tokenizer()


# ---- 3. collective_rpc and reload_weights -------------------------------------------
def test_collective_rpc_methods(a_dir, a_out):
    llm = make_llm(a_dir)
    assert llm.collective_rpc("sleep", args=(1,)) == [None]
    assert llm.is_sleeping
    assert llm.collective_rpc("wake_up", kwargs={"tags": ["weights", "kv_cache"]}) == [None]
    assert llm.collective_rpc("reload_weights", timeout=30) == [0]  # nothing was discarded
    assert llm.collective_rpc("reset_prefix_cache") == [True]
    assert_same_greedy(greedy(llm), a_out)
    for method in ("init_worker", "load_model", "get_model", "execute_model"):
        with pytest.raises(NotImplementedError):
            llm.collective_rpc(method)
    with pytest.raises(NotImplementedError):
        llm.collective_rpc(lambda worker: worker)
    with pytest.raises(InvalidRequestError):
        llm.collective_rpc("sleep", timeout=-1)
    with pytest.raises(InvalidRequestError):
        llm.collective_rpc("sleep", args=1)


def test_reload_after_sleep2_keeps_what_was_synced(a_dir, sd_a, sd_b, a_out, b_out):
    """After sleep(2), reload_weights restores only the weights no update loaded since: a
    trainer's sync made after the sleep survives (vLLM re-reads every weight from disk)."""
    llm = make_llm(a_dir)
    llm.sleep(level=2)
    llm.wake_up(tags=["weights"])
    synced = {n: t for i, (n, t) in enumerate(sorted(sd_b.items())) if i % 2 == 0}
    llm.update_weights(synced)
    version = llm.weight_version
    n = llm.collective_rpc("reload_weights")[0]
    assert n == len(sd_a) - len(synced)
    assert llm.weight_version == version  # the engine's own weights, not a new version
    llm.wake_up(tags=["kv_cache"])
    mixed = {**sd_a, **synced}
    ref = LLM(str(a_dir), dtype="float32", num_kv_blocks=64)
    ref.update_weights(mixed)
    assert_same_greedy(greedy(llm), greedy(ref))
    assert llm.reload_weights() == 0  # nothing left to restore
    # After a full sync nothing is read back, and the synced weights stay.
    llm.sleep(level=2)
    llm.wake_up()
    llm.update_weights(sd_b)
    assert llm.reload_weights() == 0
    assert_same_greedy(greedy(llm), b_out)


def test_reload_after_sleep2_without_sync_restores_the_checkpoint(a_dir, a_out):
    llm = make_llm(a_dir)
    llm.sleep(level=2)
    llm.wake_up()
    assert llm.reload_weights() > 0
    assert_same_greedy(greedy(llm), a_out)


def test_reload_from_a_module_and_without_a_source(a_dir, hf_oracles, a_out):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(a_dir, dtype=torch.float32)
    llm = LLM(hf, tokenizer=str(a_dir), num_kv_blocks=64)
    llm.sleep(level=2)
    llm.wake_up()
    assert llm.reload_weights() > 0
    assert_same_greedy(greedy(llm), a_out)
    dummy = make_llm(a_dir, load_format="dummy")
    dummy.sleep(level=2)
    dummy.wake_up()
    with pytest.raises(CheckpointError, match="nothing to read"):
        dummy.reload_weights()


def test_reload_does_not_restore_weights_left_stale_by_a_failed_stream(a_dir, sd_b):
    llm = make_llm(a_dir)
    llm.mark_partial_update({"model.norm.weight"})
    assert llm.reload_weights() == 0  # stale is not discarded: the trainer must resend them


# ---- 4. LoRA and structured outputs ---------------------------------------------------
def test_lora_and_structured_outputs_are_typed_refusals(a_dir, a_out):
    llm = make_llm(a_dir)
    assert llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8, logprobs=0), lora_request=None)
    from rollout.compat.lora import LoRARequest

    with pytest.raises(UnsupportedFeatureError, match="LoRA"):
        llm.generate(PROMPTS, SamplingParams(max_tokens=2), lora_request=LoRARequest("a", 1, "/x"))
    so = StructuredOutputsParams(regex=r"\d+")
    with pytest.raises(UnsupportedFeatureError, match="structured"):
        SamplingParams(structured_outputs=so)
    sp = SamplingParams(max_tokens=2)
    sp.structured_outputs = so  # set after construction: refused at submission
    with pytest.raises(UnsupportedFeatureError):
        llm.generate(PROMPTS, sp)
    assert_same_greedy(greedy(llm), a_out)


# ---- 5. the vllm alias ------------------------------------------------------------------
ALIAS_PATHS = (
    "from vllm import LLM, SamplingParams, RequestOutput, CompletionOutput, TokensPrompt\n"
    "from vllm.sampling_params import StructuredOutputsParams, GuidedDecodingParams, RequestOutputKind\n"
    "from vllm.inputs import TokensPrompt, TextPrompt\n"
    "from vllm.lora.request import LoRARequest\n"
    "from vllm.config import CompilationConfig, CompilationMode, CompilationLevel, LoRAConfig\n"
    "from vllm.outputs import RequestOutput, CompletionOutput\n"
    "from vllm.logprobs import Logprob\n"
    "from vllm.sequence import Logprob\n"
    "from vllm.model_executor.model_loader.utils import process_weights_after_loading\n"
    "from vllm import AsyncLLMEngine, AsyncEngineArgs\n"
    "from vllm.v1.engine.async_llm import AsyncLLM\n"
    "from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs\n"
    "from vllm.utils.network_utils import get_ip\n"
    "from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerSendWeightsArgs, NCCLWeightTransferEngine\n"
)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_alias_is_opt_in_and_resolves_to_rollout():
    plain = _python("import importlib.util; print(importlib.util.find_spec('vllm'))")
    assert plain.stdout.strip() == "None", "the alias must never be on by default"
    code = (
        "from rollout.compat import install_vllm_alias; install_vllm_alias()\n" + ALIAS_PATHS +
        "import vllm, rollout, importlib.metadata as md\n"
        "assert LLM is rollout.LLM and SamplingParams is rollout.SamplingParams\n"
        "print(md.version('vllm'), vllm.__version__)\n"
    )
    r = _python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0.22.0+rollout", "0.22.0+rollout"]
    # The launcher form: PYTHONPATH from `python -m rollout.compat --path`.
    path = subprocess.run([sys.executable, "-m", "rollout.compat", "--path"], capture_output=True, text=True,
                          timeout=120).stdout.strip()
    assert path == alias_path()
    r = _python(ALIAS_PATHS + "import vllm; print(vllm.IS_ROLLOUT_ALIAS)", PYTHONPATH=path)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr


def test_alias_refuses_to_shadow_a_real_vllm_silently(tmp_path):
    fake = tmp_path / "vllm"
    fake.mkdir()
    (fake / "__init__.py").write_text("REAL = True\n")
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from rollout.compat import install_vllm_alias, VllmAliasError\n"
        "try:\n    install_vllm_alias()\nexcept VllmAliasError as e:\n    print('refused')\n"
        "install_vllm_alias(override=True)\n"
        "import vllm; print(getattr(vllm, 'IS_ROLLOUT_ALIAS', False))\n"
    ) % str(tmp_path)
    r = _python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["refused", "True"]
    assert "shadows the installed vLLM" in r.stderr
    imported = _python(
        "import sys; sys.path.insert(0, %r); import vllm\n"
        "from rollout.compat import install_vllm_alias, VllmAliasError\n"
        "try:\n    install_vllm_alias(override=True)\nexcept VllmAliasError:\n    print('refused')\n" % str(tmp_path)
    )
    assert imported.stdout.strip() == "refused", imported.stderr


def test_server_mode_names_import_and_refuse():
    from rollout.compat.server_mode import NCCLWeightTransferEngine, get_ip

    assert isinstance(get_ip(), str)
    with pytest.raises(NotImplementedError, match="server mode"):
        NCCLWeightTransferEngine()


def test_alias_not_active_in_this_session():
    assert not is_alias_active()
    assert "vllm" not in sys.modules


# ---- 6. whole call sequences, as the frameworks write them ----------------------------
def _extract_logprobs(all_outputs):
    """TRL's extract_logprobs (trl/generation/vllm_generation.py @ f2cd577): per sequence,
    per token, the logprobs sorted by rank."""
    all_logprobs = []
    for outputs in all_outputs:
        for output in outputs.outputs:
            if output.logprobs is None:
                return None
            seq = []
            for lp in output.logprobs:
                items = sorted(lp.items(), key=lambda x: x[1].rank)
                seq.append([None if math.isnan(v.logprob) else v.logprob for _, v in items])
            all_logprobs.append(seq)
    return all_logprobs


@pytest.mark.parametrize("sleep_mode", [True, False])
def test_trl_colocate_grpo_steps(sleep_mode, a_dir, b_dir, sd_a, sd_b):
    """TRL's colocate mode, trl/generation/vllm_generation.py at commit f2cd577 (2026-07-24):
    _init_vllm builds LLM with these keywords and sleeps at level 2; each step
    sync_weights wakes the weights, pushes every parameter through
    llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, param)])
    and resets the prefix cache; generate wakes the weights, calls
    collective_rpc("reload_weights"), wakes the KV cache, generates with use_tqdm=False and
    sleeps at level 2 again. Two steps: the trainer's weights go A -> B -> A."""
    llm = LLM(
        model=str(a_dir), tensor_parallel_size=1, gpu_memory_utilization=0.3, max_model_len=128, max_num_seqs=8,
        enable_sleep_mode=sleep_mode, model_impl="vllm", distributed_executor_backend="external_launcher", seed=0,
        max_num_batched_tokens=4096, logprobs_mode="processed_logprobs", quantization=None, trust_remote_code=False,
        dtype="float32", num_kv_blocks=64,
    )
    if sleep_mode:
        llm.sleep(level=2)
    generation_kwargs = {
        "n": 1, "repetition_penalty": 1.0, "temperature": 0.9, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
        "max_tokens": 6, "logprobs": 0, "seed": 7,
    }
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    for trainer_state in (sd_b, sd_a):
        # sync_weights
        if sleep_mode:
            llm.wake_up(tags=["weights"])
        for name, param in trainer_state.items():
            llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, param)])
        llm.reset_prefix_cache()
        # _generate
        if sleep_mode:
            llm.wake_up(tags=["weights"])
            try:
                llm.collective_rpc("reload_weights")
            except NotImplementedError:
                pass
        sampling_params = SamplingParams(**generation_kwargs)
        if sleep_mode:
            llm.wake_up(tags=["kv_cache"])
        vllm_prompts = [{"prompt_token_ids": ids} for ids in prompts]
        all_outputs = llm.generate(vllm_prompts, sampling_params=sampling_params, use_tqdm=False)
        completion_ids = [o.token_ids for outs in all_outputs for o in outs.outputs]
        logprobs = _extract_logprobs(all_outputs)
        if sleep_mode:
            llm.sleep(level=2)
        # A fresh engine on the trainer's weights samples the same tokens with the same seeds.
        ref = make_llm(a_dir)
        ref.update_weights(trainer_state)
        want = ref.generate(prompts, SamplingParams(**generation_kwargs))
        assert completion_ids == [o.outputs[0].token_ids for o in want]
        for got, w in zip(logprobs, want):
            assert [row[0] for row in got] == pytest.approx(w.outputs[0].token_logprobs, abs=LOGPROB_TOL)


class _Sampling:
    """verl's rollout config keys (vllm_rollout_spmd.py @ ab07052): those SamplingParams has
    are copied in by hasattr."""

    keys = {"temperature": 1.0, "top_k": -1, "top_p": 1.0, "response_length": 6, "prompt_length": 64,
            "calculate_log_probs": True, "free_cache_engine": True, "n": 4, "ignore_eos": False}


def test_verl_spmd_rollout_mode_switch(a_dir, sd_a, sd_b):
    """verl's in-rank SPMD rollout, verl/workers/rollout/vllm_rollout/vllm_rollout_spmd.py at
    commit ab07052 (the last before verl retired it) with fsdp_workers.rollout_mode: LLM with
    these keywords (load_format dummy: the weights come from the trainer), SamplingParams
    from config keys by hasattr and changed in place per call (update_sampling_params), and
    per step: resume(weights) -> update_weights through
    llm_engine...driver_worker.worker.model_runner.model.load_weights + vllm's
    process_weights_after_loading -> resume(kv_cache) -> generate(prompts=..., lora_request=None)
    -> release: reset_prefix_cache + sleep(level=VLLM_SLEEP_LEVEL)."""
    from rollout.compat.model_loader import process_weights_after_loading

    engine = LLM(
        model=str(a_dir), enable_sleep_mode=True, tensor_parallel_size=1, distributed_executor_backend="external_launcher",
        dtype="float32", enforce_eager=True, gpu_memory_utilization=0.5, disable_custom_all_reduce=True,
        skip_tokenizer_init=False, max_model_len=128, max_num_seqs=16, load_format="dummy", disable_log_stats=True,
        max_num_batched_tokens=256, enable_chunked_prefill=True, enable_prefix_caching=True, trust_remote_code=False,
        seed=0, num_kv_blocks=64,
    )
    kwargs = dict(n=1, logprobs=0, max_tokens=6, repetition_penalty=1.0)
    kwargs["detokenize"] = False
    for k, v in _Sampling.keys.items():
        if hasattr(SamplingParams(), str(k)) and k != "seed":
            kwargs[k] = v
    kwargs["n"] = 1
    sampling_params = SamplingParams(**kwargs)
    sleep_level = 1
    engine.sleep(level=sleep_level)  # verl starts in trainer mode
    for step, trainer_state in enumerate((sd_b, sd_a)):
        # rollout_mode
        if "tags" in inspect.signature(engine.wake_up).parameters:
            engine.wake_up(tags=["weights"])
        model = engine.llm_engine.model_executor.driver_worker.worker.model_runner.model
        model.load_weights((n, t) for n, t in trainer_state.items())
        process_weights_after_loading(model, engine.llm_engine.vllm_config.model_config, next(model.parameters()).device)
        engine.wake_up(tags=["kv_cache"])
        # generate_sequences, greedy for validation (do_sample=False) as verl sets it
        vllm_inputs = [{"prompt_token_ids": p} for p in PROMPTS]
        old = {}
        for key, value in {"best_of": 1, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "temperature": 0, "n": 1}.items():
            if hasattr(sampling_params, key):
                old[key] = getattr(sampling_params, key)
                setattr(sampling_params, key, value)
        outputs = engine.generate(prompts=vllm_inputs, sampling_params=sampling_params, lora_request=None, use_tqdm=False)
        for key, value in old.items():
            setattr(sampling_params, key, value)
        response, rollout_log_probs = [], []
        for output in outputs:
            for sample_id in range(len(output.outputs)):
                response_ids = output.outputs[sample_id].token_ids
                response.append(response_ids)
                rollout_log_probs.append(
                    [lp[response_ids[i]].logprob for i, lp in enumerate(output.outputs[sample_id].logprobs)]
                )
        # release (trainer_mode)
        engine.reset_prefix_cache()
        engine.sleep(level=sleep_level)
        ref = make_llm(a_dir)
        ref.update_weights(trainer_state)
        want = greedy(ref, PROMPTS, SamplingParams(temperature=0.0, max_tokens=6, logprobs=0))
        assert_same_greedy(list(zip(response, rollout_log_probs)), want)
        assert sampling_params.temperature == 1.0  # restored after the call
