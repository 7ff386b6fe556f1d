from rollout.compat.lora import LoRARequest  # noqa: F401
