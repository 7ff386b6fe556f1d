"""One step's metrics over the data-parallel replicas, and where a driver puts them: one
short progress line on stdout, every number as a JSON line in the metrics file, optionally
a CSV row."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, TextIO

MAX_KEYS = ("training/rollout_probs_diff_max", "rollout_corr/rollout_is_max", "check/engine_vs_trainer_max_abs")  # worst rank
MIN_KEYS = ("rollout_corr/rollout_is_min",)  # worst rank the other way
SAME_KEYS = ("step", "dp_size", "probe")  # equal on every rank
CSV_FIRST = ("step", "reward", "loss")  # then every other number, in the first step's order
RUNS_DIR = Path("runs")  # default output: runs/<algorithm>-<time>/, relative to where the run starts


def merge_metrics(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Whole-run view of one step, one dict per data-parallel replica: every key averaged,
    but the worst rank for the max- and min-type ones and the shared labels (step, dp_size,
    probe) as they are."""
    merged = {k: sum(r[k] for r in per_rank) / len(per_rank) for k in per_rank[0] if k not in SAME_KEYS}
    for k in MAX_KEYS:
        merged[k] = max(r[k] for r in per_rank)
    for k in MIN_KEYS:
        merged[k] = min(r[k] for r in per_rank)
    merged.update({k: per_rank[0][k] for k in SAME_KEYS})
    return merged


def add_output_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Where a driver writes: the options of ``MetricsLog``."""
    p.add_argument("--output-dir", type=str, default=None,
                   help=f"the run's files (default: {RUNS_DIR}/<algorithm>-<date>-<time>)")
    p.add_argument("--metrics-file", type=str, default=None,
                   help="every step's metrics as one JSON line (default: OUTPUT_DIR/metrics.jsonl; 'none': no file)")
    p.add_argument("--csv", type=str, default=None, help="also write every step's numbers here as CSV (step,reward,loss,...)")
    p.add_argument("--verbose", action="store_true", help="show transformers' model-loading warnings and progress bars")
    return p


def progress_line(m: dict[str, Any], num_steps: int) -> str:
    """The one line printed per step: reward, the rollout-vs-trainer KL on the sampled
    tokens, rollout tokens/s and the step's wall time."""
    return (f"step {m['step'] + 1:>3}/{num_steps}  reward {m['reward']:.3f}  kl {m['training/rollout_k3_kl']:.1e}  "
            f"{m['rollout/tokens_per_s']:.0f} tok/s  {m['timing/step_s']:.1f} s")


class MetricsLog:
    """The driver's log (rank 0 only): ``write`` prints the progress line, appends the JSON
    line and, with ``--csv``, the CSV row. ``algorithm`` names the default output folder."""

    def __init__(self, args: argparse.Namespace, algorithm: str) -> None:
        self.num_steps = args.steps
        self.jsonl: TextIO | None = None
        self.csv: TextIO | None = None
        self.columns: list[str] | None = None
        path = args.metrics_file
        if path is None:
            out = Path(args.output_dir) if args.output_dir else RUNS_DIR / f"{algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"
            path = out / "metrics.jsonl"
        if str(path).lower() != "none":
            path = Path(path)
            if path.parent.resolve().parent == RUNS_DIR.resolve():
                _ignore_in_git(RUNS_DIR)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(path, "w")  # noqa: SIM115 - held for the run, closed in close()
            print(f"metrics: {path}", flush=True)
        if args.csv:
            self.csv = open(args.csv, "w")  # noqa: SIM115 - held for the run, closed in close()

    def write(self, merged: dict[str, Any]) -> None:
        print(progress_line(merged, self.num_steps), flush=True)
        if self.jsonl:
            self.jsonl.write(json.dumps(merged) + "\n")
            self.jsonl.flush()
        if self.csv:
            if self.columns is None:
                numbers = [k for k, v in merged.items() if isinstance(v, (int, float)) and k not in CSV_FIRST]
                self.columns = [*CSV_FIRST, *numbers]
                self.csv.write(",".join(self.columns) + "\n")
            self.csv.write(",".join(str(merged[k]) for k in self.columns) + "\n")
            self.csv.flush()

    def close(self) -> None:
        for f in (self.jsonl, self.csv):
            if f:
                f.close()
        self.jsonl = self.csv = None


def _ignore_in_git(folder: Path) -> None:
    """The default output folder keeps itself out of ``git status`` (as .pytest_cache does)."""
    folder.mkdir(parents=True, exist_ok=True)
    ignore = folder / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# written by the RL examples: runs stay out of git\n*\n")
