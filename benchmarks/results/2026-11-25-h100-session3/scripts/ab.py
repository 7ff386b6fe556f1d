"""A/B of the split-KV policy: python .gl/ab.py PROGRAMS_PER_SM <rollout-bench args...>"""
import sys

from rollout.kernels import triton_attention as ta

ta._PROGRAMS_PER_SM = int(sys.argv[1])
from benchmarks.cli import main  # noqa: E402

main(sys.argv[2:])
