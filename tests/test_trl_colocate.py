"""TRL's real GRPOTrainer, ``use_vllm=True, vllm_mode="colocate"``, two steps on CPU with
rollout standing in for vLLM through the opt-in alias (``rollout.compat``).

The trainer runs in a subprocess (tests/helpers/trl_colocate_run.py) whose PYTHONPATH
starts with ``python -m rollout.compat --path``, so ``import vllm`` is rollout
there and nowhere else in the test session. Skipped without TRL (``pip install trl``).

Written against TRL 1.16.0 (transformers 5.25, accelerate 1.16). What its colocate path
touches on vLLM:

Import time (``trl.generation.vllm_client`` and ``vllm_generation``, both imported by
``trl.GRPOTrainer`` whenever ``is_vllm_available()``):
  - ``importlib.metadata.version("vllm")`` via ``packages_distributions()["vllm"]``:
    a dist-info whose top_level names ``vllm``; outside 0.22.0..0.31.0 only a warning.
  - ``from vllm import LLM, RequestOutput, SamplingParams``;
    ``from vllm.sampling_params import StructuredOutputsParams``.
  - ``from vllm.utils.network_utils import get_ip`` (server mode only, imported always).
  - version >= 0.28.0: ``vllm.distributed.weight_transfer.nccl_common.trainer_init`` and
    ``vllm.distributed.weight_transfer.packed_tensor.packed_nccl_broadcast_producer``;
    below 0.28.0: ``vllm.distributed.weight_transfer.nccl_engine.NCCLTrainerSendWeightsArgs``
    and ``NCCLWeightTransferEngine`` (server mode only, imported always).

Run time (``VLLMGeneration`` in colocate mode):
  - sets ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` and ``MASTER_ADDR``/``MASTER_PORT`` (a free
    port) in ``os.environ``; does not call ``torch.distributed.init_process_group`` itself.
  - ``LLM(model=model.name_or_path, tensor_parallel_size, gpu_memory_utilization (0.3),
    max_model_len (None unless vllm_max_model_length), max_num_seqs (batch * tp *
    steps_per_generation), enable_sleep_mode, model_impl ("vllm"),
    distributed_executor_backend="external_launcher", seed=process_index // tp,
    max_num_batched_tokens=4096, logprobs_mode="processed_logprobs", quantization=None,
    trust_remote_code)``: no ``dtype`` (vLLM's "auto": the checkpoint's), no device.
  - ``llm.sleep(level=2)`` right after construction and after every generate (sleep mode).
  - weight sync before the first generate and after every optimizer step:
    ``empty_cache()`` (``torch.cuda.empty_cache()`` on CPU: a no-op) and
    ``llm.wake_up(tags=["weights"])`` (sleep mode), then for each HF parameter of
    ``model.named_parameters()`` (tied weights once), one call
    ``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, tensor)])``
    (q/k/v and gate/up arrive separately; after a level-2 sleep the weights are whole only
    after the last call), then ``llm.reset_prefix_cache()``.
  - ``SamplingParams(n=1, repetition_penalty, temperature, top_p, top_k=0, min_p=0.0,
    max_tokens, logprobs=0, **generation_kwargs)``; ``llm.wake_up(tags=["kv_cache"])``
    (sleep mode); ``llm.generate([{"prompt_token_ids": ids}, ...], sampling_params=...,
    use_tqdm=False)``; reads ``output.prompt_token_ids``, ``output.outputs[i].token_ids``
    and ``output.outputs[i].logprobs``: one dict per token whose values have ``.rank``
    and ``.logprob`` (NaN allowed), the first by rank being the sampled token.
  - ``llm.llm_engine.model_config.max_model_len`` (only in tool-calling loops).
  - never touched in colocate mode: ``collective_rpc``, ``LoRARequest``, ``TokensPrompt``,
    structured outputs (unless ``vllm_structured_outputs_regex``), ``vllm.config``.
  - on CPU nothing else assumes CUDA: accelerate's state comes from ``use_cpu=True``,
    ``bf16=False`` keeps the trainer in fp32, the importance-sampling correction (on by
    default) compares rollout's logprobs with the trainer's.

What the test checks: two optimizer steps ran; every completion came from rollout (TRL's
``LLM`` is a ``rollout.LLM``), non-empty, rewarded; rollout's sampling logprobs equal the
trainer's at both steps (TRL's own ``sampling/sampling_logp_difference/max``: at step 2 it
measures the weights TRL pushed after step 1); rollout's greedy continuations equal HF
transformers' at the weights after step 1 and after a final push. Once more with
``vllm_enable_sleep_mode=True`` (level-2 sleep, wake, re-push every step) on a Qwen2 model
(tied embeddings, q/k/v biases).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[1]

# rollout and TRL's trainer are both fp32 on CPU: a token's logprob from the engine and from
# HF differ by reduction order only (measured up to ~3e-6). A missed weight sync moves them
# by far more: with the runner's learning rate of 1e-2, skipping the push after step 1 gives
# a step-2 difference of ~1.6 (measured by making the sync a no-op).
LOGP_TOL = 1e-4


@pytest.fixture(scope="module")
def alias_dir() -> Path:
    """The directory the alias's documented command prints, for a child's PYTHONPATH."""
    out = subprocess.run(
        [sys.executable, "-m", "rollout.compat", "--path"],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=60,
    )
    return Path(out.stdout.strip())


def run_trainer(alias_dir: Path, model_dir: Path, out_dir: Path, *flags: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(alias_dir), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.trl_colocate_run", str(model_dir), str(out_dir), *flags],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"trainer failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads((out_dir / "result.json").read_text())


def check_two_steps(result: dict, alias_dir: Path) -> None:
    assert result["llm_is_rollout"], result["llm_class"]
    assert Path(result["vllm_file"]).resolve().is_relative_to(alias_dir.resolve())
    assert result["global_step"] == 2
    steps = [h for h in result["log_history"] if "reward" in h]
    assert [h["step"] for h in steps] == [1, 2]
    for h in steps:
        assert h["completions/mean_length"] > 0
        assert h["sampling/sampling_logp_difference/max"] < LOGP_TOL, h
        assert h["sampling/importance_sampling_ratio/min"] == pytest.approx(1.0, abs=LOGP_TOL)
    # 4 prompts per step (1 prompt x num_generations=4), all scored by the reward function.
    assert len(result["completions"]) == 8
    assert all(isinstance(c, str) and c for c in result["completions"])
    # Training moved the weights at both steps (else the sync checks would prove nothing).
    assert result["moved_by_step1"] > 1e-3 and result["moved_by_step2"] > 1e-3


@pytest.mark.slow
def test_grpo_colocate_two_steps(alias_dir, llama_dir, tmp_path):
    result = run_trainer(alias_dir, llama_dir, tmp_path)
    check_two_steps(result, alias_dir)
    # What TRL pushed before step 2's rollouts is the trainer's model after step 1.
    assert result["step1_rollout"] == result["step1_hf"]
    assert result["final_rollout"] == result["final_hf"]
    assert result["final_hf"] != result["step1_hf"]  # the comparison tells the weights apart


@pytest.mark.slow
def test_grpo_colocate_sleep_mode(alias_dir, model_dirs, tmp_path):
    # Qwen2 here: tied embeddings (TRL pushes embed_tokens only) and q/k/v biases.
    result = run_trainer(alias_dir, model_dirs["qwen2"], tmp_path, "--sleep-mode")
    check_two_steps(result, alias_dir)
    assert result["final_rollout"] == result["final_hf"]
