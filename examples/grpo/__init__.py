"""GRPO on short arithmetic: ``grpo.py`` (torchrun) and ``ray_grpo.py`` (Ray)."""
