"""Reward curves of the GRPO and PPO runs in this folder (needs matplotlib)."""
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

here = Path(__file__).resolve().parents[1]
for name in ("grpo", "ppo"):
    rows = list(csv.DictReader(open(here / f"{name}.csv")))
    steps = [int(r["step"]) for r in rows]
    reward = [float(r["reward"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, reward, marker="o", markersize=3)
    ax.set(xlabel="step", ylabel="mean reward (exact sum)", ylim=(0, 1.05),
           title=f"{name.upper()}: SmolLM2-135M-Instruct, a+b (a, b in 0..9), 1x H100")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(here / f"{name}_reward.png", dpi=100)
