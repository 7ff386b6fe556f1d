"""vLLM compatibility: the engine paths frameworks reach into (``engine_view``), vLLM's
stand-in classes (``lora``, ``vllm_config``, ``model_loader``) and the opt-in ``vllm`` alias
(``install_vllm_alias``)."""

from rollout.compat.vllm_alias import VllmAliasError, alias_path, install_vllm_alias, is_alias_active

__all__ = ["install_vllm_alias", "alias_path", "is_alias_active", "VllmAliasError"]
