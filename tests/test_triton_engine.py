"""The whole engine on the GPU's kernels, interpreted on CPU: the Triton attention backend
and op set (fused q/k norm + rotary, RMSNorm, SiLU-and-mul, the one-pass sampler) give the
same greedy tokens as the torch path and fp32 logprobs within 1e-4, over chunked prefill,
a prefix-cache hit and decode steps of llama, qwen3 and qwen2 tiny models. Each path runs
in a child process (TRITON_INTERPRET must be set before triton is imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Compares numbers across computations: run again with another thread count (.ci/run).
pytestmark = pytest.mark.numerics

ROOT = Path(__file__).resolve().parents[1]


def _run(work: Path, mode: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.triton_engine_case", str(work), mode],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_triton_kernels_in_the_engine_match_the_torch_path(tmp_path):
    pytest.importorskip("triton")
    ref, got = _run(tmp_path, "torch"), _run(tmp_path, "triton")
    assert ref.keys() == got.keys() == {"llama", "qwen3", "qwen2"}
    for name in ref:
        for r, g in zip(ref[name], got[name], strict=True):
            assert g["ids"] == r["ids"], name
            assert max(abs(a - b) for a, b in zip(g["lps"], r["lps"], strict=True)) < 1e-4, name
        assert got[name][1]["cached"] > 0, name  # the repeated prompt hit the prefix cache
