"""rollout-bench: rollout's benchmarks on random-weight models built from real configs.

One module per workload (decode_step, nano_bench, rollout_long, peer, rl_cycle), all
measured against the roofline of roofline.py; cli.py is the ``rollout-bench`` script.
"""
