"""``python -m rollout.compat --path``: the directory that makes ``import vllm`` resolve to
rollout when put on ``PYTHONPATH`` (for a launcher's child processes)."""

from rollout.compat.vllm_alias import main

main()
