"""Code the RL examples share (the arithmetic task, the trainer's view of the sampled
tokens). Example scripts put the repository root on ``sys.path`` to import it."""
