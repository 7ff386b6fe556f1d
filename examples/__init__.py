"""Runnable examples of ``rollout``. Run them as modules from the repository root, so they
import each other's shared code (``examples.common``) as a package:

    python -m examples.agentic.run
    torchrun --standalone --nproc-per-node 2 -m examples.grpo.grpo --steps 3
"""
