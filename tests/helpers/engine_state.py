"""Observing an engine's state in tests: greedy outputs, parameter snapshots, model
directories with edited weights, process memory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rollout import LLM, SamplingParams

# Two prompts: one spans several 16-token KV blocks (prefix cache, preemption), one is short.
PROMPTS = [list(range(5, 45)), [100, 200, 300]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0)

# What the engine promises across computations of the same tokens that differ in batch
# layout, prefix-cache hits, chunking or thread count (another request, another process):
# token ids exact, fp32 logprobs within this. The fp32 GEMMs of the tiny test models give
# a row results that move with the rows per call and per thread (MKL picks another kernel
# for 2-3 rows than for 4+); measured drift 2-4e-6 across layouts and thread counts.
# 1e-5 leaves room over that and is still far below what a changed weight or a wrong
# position moves (1e-2 and more).
LOGPROB_TOL = 1e-5


def assert_same_greedy(got, want, tol: float = LOGPROB_TOL) -> None:
    """``greedy`` results of two computations: tokens exact, logprobs within ``tol``."""
    assert len(got) == len(want)
    for (got_ids, got_lp), (want_ids, want_lp) in zip(got, want):
        assert list(got_ids) == list(want_ids)
        assert list(got_lp) == pytest.approx(list(want_lp), abs=tol)


def make_llm(model_dir: Path, **kwargs) -> LLM:
    kwargs.setdefault("num_kv_blocks", 64)  # the CPU default would allocate up to 2 GiB
    return LLM(str(model_dir), dtype="float32", **kwargs)


def greedy(llm: LLM, prompts=PROMPTS, params: SamplingParams = GREEDY) -> list[tuple[list[int], list[float]]]:
    """(token ids, token logprobs) of each prompt's greedy continuation."""
    return [(o.outputs[0].token_ids, o.outputs[0].token_logprobs) for o in llm.generate(prompts, params)]


def params_of(llm: LLM) -> dict[str, torch.nn.Parameter]:
    """Engine parameter name -> the live parameter (tied parameters under both names)."""
    return dict(llm.model.named_parameters(remove_duplicate=False))


def snapshot(llm: LLM) -> dict[str, torch.Tensor]:
    """Engine parameter name -> a copy of its contents."""
    return {n: p.detach().clone() for n, p in params_of(llm).items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """Names whose contents are not bitwise equal (NaN-safe: compares the bytes)."""
    assert before.keys() == after.keys()
    return {n for n in before if not torch.equal(before[n].view(torch.uint8), after[n].view(torch.uint8))}


def model_dir_with(src: Path, tensors: dict[str, torch.Tensor], dst: Path) -> Path:
    """A copy of model directory ``src`` (config, tokenizer) whose only weights are ``tensors``."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    save_file({n: t.contiguous() for n, t in tensors.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def rss_bytes() -> int:
    """Resident set size of this process (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")
