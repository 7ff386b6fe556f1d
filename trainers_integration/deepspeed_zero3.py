"""Full weights of a DeepSpeed ZeRO-3 model, gathered one layer at a time.

Uses ``deepspeed.zero.GatheredParameters(params, modifier_rank=None)``: inside the block
the partitioned parameters hold their full data on every rank; on exit they are
partitioned again. Gathering is collective: every rank must run the iterator to the end.
DeepSpeed is imported only when a ZeRO-3 parameter (one with ``ds_id``) is met.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from trainers_integration.hf_module import hf_name

_LAYER = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.3.mlp.up_proj.weight" -> "model.layers.3"


def layer_key(name: str) -> str:
    """The group a parameter is gathered with: its numbered layer ("model.layers.3"), or
    else its owning module ("model.embed_tokens")."""
    m = _LAYER.match(name)
    return m.group(1) if m else name.rpartition(".")[0]


def _deepspeed_gather(params: list[torch.nn.Parameter]):
    import deepspeed  # lazily: only ZeRO-3 users have it

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@torch.no_grad()
def iter_gathered_weights(
    module: torch.nn.Module, prefix_map: Mapping[str, str] | None = None,
    gather: Callable[[list[torch.nn.Parameter]], Any] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, full tensor)`` for every parameter of a ZeRO-3 model (the model or its
    DeepSpeed engine), one layer (``layer_key``) gathered at a time. The tensors are copies
    taken inside the gather, so they stay valid after it and the partitioned memory is
    released at once; at most one layer of copies is held here. ``gather`` (default
    ``deepspeed.zero.GatheredParameters``) is a context-manager factory, for tests."""
    group: list[tuple[str, torch.nn.Parameter]] = []
    for name, param in module.named_parameters():
        if group and layer_key(name) != layer_key(group[-1][0]):
            yield from _gather_group(group, prefix_map, gather)
            group = []
        group.append((name, param))
    if group:
        yield from _gather_group(group, prefix_map, gather)


def _gather_group(group, prefix_map, gather) -> list[tuple[str, torch.Tensor]]:
    params = [p for _, p in group]
    if not any(hasattr(p, "ds_id") for p in params):  # nothing partitioned: no gather
        return [(hf_name(n, prefix_map), p.detach()) for n, p in group]
    with (gather or _deepspeed_gather)(params):
        return [(hf_name(n, prefix_map), p.detach().clone()) for n, p in group]
