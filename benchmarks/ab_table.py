"""The table of an A/B run (benchmarks/run_ab.sh): decode-step ms per batch and nano-bench
tok/s, base vs head, per round, and head/base of the medians. Usage: python benchmarks/ab_table.py DIR"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(folder: str) -> None:
    d = Path(folder)
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    for f in sorted(d.glob("*.json")):
        side, rest = f.stem.split("-", 1)
        workload = rest.rsplit("-", 1)[0]
        data = json.loads(f.read_text())
        if workload == "decode-step":
            for r in data["rows"]:
                rows.setdefault((workload, f"batch {r['batch']} step_ms"), {}).setdefault(side, []).append(r["step_ms"])
        elif workload == "nano-bench":
            tok_s = data["rows"][0].get("tok_s") if data.get("rows") else None
            rows.setdefault((workload, "tok_s"), {}).setdefault(side, []).append(tok_s)
            rows.setdefault((workload, "roofline_fraction"), {}).setdefault(side, []).append(data["roofline_fraction"])
    print(f"{'workload':<12} {'metric':<22} {'base':>28} {'head':>28} {'head/base':>9}")
    for (workload, metric), sides in rows.items():
        base, head = sides.get("base", []), sides.get("head", [])
        ratio = statistics.median(head) / statistics.median(base) if base and head and None not in base + head else float("nan")
        fmt = lambda xs: ", ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in xs)  # noqa: E731
        print(f"{workload:<12} {metric:<22} {fmt(base):>28} {fmt(head):>28} {ratio:>9.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
