"""Weights of a plain or HF ``nn.Module`` under their HF names."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

# Path components that wrappers insert: torch.compile, activation checkpointing, FSDP1.
_WRAPPER_PARTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})
# DDP / DeepSpeed engines hold the model as ``.module``; stripped only at the front, since a
# model may well have a submodule of that name further down.
_LEADING_WRAPPERS = frozenset({"module"})


def hf_name(name: str, prefix_map: Mapping[str, str] | None = None) -> str:
    """``name`` without wrapper components, then its longest matching prefix in
    ``prefix_map`` (old prefix -> new prefix) replaced, e.g. ``{"policy.": ""}``."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    while len(parts) > 1 and parts[0] in _LEADING_WRAPPERS:
        parts.pop(0)
    name = ".".join(parts)
    if prefix_map:
        for old in sorted(prefix_map, key=len, reverse=True):
            if name.startswith(old):
                return prefix_map[old] + name[len(old):]
    return name


def iter_hf_weights(
    module: torch.nn.Module, prefix_map: Mapping[str, str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` for each parameter of ``module`` (tied ones once), detached:
    the tensors share storage with the live parameters and are read, never modified."""
    for name, param in module.named_parameters():
        yield hf_name(name, prefix_map), param.detach()
