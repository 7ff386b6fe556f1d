"""Code the RL examples share: the task and model (``arith_task``, ``smollm2``), one rank
(``worker.RLWorker``: the trainer, its colocated engine and the rollout cycle), the trainer's
view of the sampled tokens (``trainer_logprobs``), the metrics (``metrics``) and the torchrun
driver (``driver``). Imported as ``examples.common``: run the examples as modules from the
repository root (``python -m examples.grpo.grpo``, ``torchrun ... -m examples.grpo.grpo``)."""
