"""Model registry: HF architecture name -> implementation class.

Built-ins are listed by import path (imported on first use). Out-of-tree models arrive as
installed packages with an entry point in the group ``rollout.models`` whose name is the
HF architecture and whose object is the class (``MyArch = my_pkg.model:MyArchForCausalLM``).
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

from torch import nn

from rollout.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

PLUGIN_GROUP = "rollout.models"

_BUILTIN = {
    "LlamaForCausalLM": "rollout.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "rollout.models.qwen2:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "rollout.models.qwen3:Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM": "rollout.models.qwen3_moe:Qwen3MoeForCausalLM",
}
# The registry (one of the two allowed module-level mutable states).
_registry: dict[str, str | type[nn.Module]] = dict(_BUILTIN)
_plugins_loaded = False


def register_model(architecture: str, model_cls: str | type[nn.Module]) -> None:
    """Register ``model_cls`` (a class, or "module:Class") for an HF architecture name."""
    _registry[architecture] = model_cls


def supported_architectures() -> list[str]:
    _load_plugins()
    return sorted(_registry)


def resolve_model_class(architectures: list[str] | None) -> type[nn.Module]:
    """The class for the first of ``architectures`` (from config.json) that is registered."""
    _load_plugins()
    for arch in architectures or []:
        entry = _registry.get(arch)
        if entry is None:
            continue
        if isinstance(entry, str):
            module, _, name = entry.partition(":")
            entry = getattr(importlib.import_module(module), name)
            _registry[arch] = entry
        return entry
    raise UnsupportedModelError(
        f"model architecture(s) {architectures} not supported; supported: {supported_architectures()}"
        f" (more can be added through the entry-point group {PLUGIN_GROUP!r})"
    )


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not take the built-ins down
            logger.warning("skipping model plugin %r (%s): %s: %s", ep.name, ep.value, type(e).__name__, e)
            continue
        if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
            logger.warning("skipping model plugin %r (%s): %r is not an nn.Module subclass", ep.name, ep.value, obj)
            continue
        _registry[ep.name] = obj


def reload_plugins() -> None:
    """Forget plugins and runtime registrations: the next lookup rescans the entry points
    (after a plugin was installed or removed in a running process)."""
    global _plugins_loaded
    _registry.clear()
    _registry.update(_BUILTIN)
    _plugins_loaded = False
