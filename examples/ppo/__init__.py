"""PPO on short arithmetic: ``ppo.py`` (torchrun) and its maths, ``losses.py``."""
