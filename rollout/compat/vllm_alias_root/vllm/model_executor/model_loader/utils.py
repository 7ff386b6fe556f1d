from rollout.compat.model_loader import process_weights_after_loading  # noqa: F401
