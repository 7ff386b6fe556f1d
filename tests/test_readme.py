"""The README runs as written: its Python example in a fresh interpreter, and its shell
commands after the install line (the venv activated right after it; the examples run as
modules from the repository root, with options their parsers accept)."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_commands() -> list[str]:
    """Every command of the README's bash blocks, in order, comments stripped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            command = line.split("  #")[0].split(" # ")[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def test_readme_activates_the_venv_right_after_install():
    commands = bash_commands()
    install = next(i for i, c in enumerate(commands) if c.startswith("python3 -m venv .venv"))
    assert commands[install + 1] == "source .venv/bin/activate", commands[install : install + 2]


def test_readme_example_commands_parse():
    """Each ``-m examples.<module> ARGS`` names a module whose parser takes ARGS as written;
    no command runs an example by its file path (they import each other as a package)."""
    seen = 0
    for command in bash_commands():
        assert not re.search(r"examples/\S+\.py", command), command
        match = re.search(r"-m (examples(?:\.\w+)+)(.*)", command)
        if match is None:
            continue
        name, args = match.group(1), shlex.split(match.group(2))
        assert importlib.util.find_spec(name) is not None, command
        if args:
            importlib.import_module(name).build_parser().parse_args(args)  # SystemExit on a bad option
        seen += 1
    assert seen >= 5  # GRPO and PPO on CPU and GPU, GRPO on Ray


@pytest.mark.slow
def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python example"
    proc = subprocess.run(
        [sys.executable, "-c", blocks[0]], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The example prints the first sample's text and its first logprobs.
    last = proc.stdout.strip().splitlines()[-1]
    assert "[" in last and "]" in last, proc.stdout
