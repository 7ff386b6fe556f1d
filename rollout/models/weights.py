"""The one HF-name -> engine-parameter mapping, used by checkpoint loading and weight updates.

Loading is a transaction in two phases: every name and shape is resolved and validated
first (no tensor touched), then each tensor is copied in place through its parameter's
``weight_loader``. A bad name or shape therefore changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

# HF checkpoints of older transformers versions carry these buffers; they are recomputed.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class WeightTarget:
    hf_name: str
    param_name: str
    param: nn.Parameter
    shard_id: str | int | None

    @property
    def expected_shape(self) -> torch.Size:
        return self.param.hf_shape(self.shard_id)


class WeightMap:
    """Resolves HF names of one model (``packed_modules_mapping`` says which HF modules are
    fused into which engine module, and in which shard). Tied parameters answer to both names."""

    def __init__(self, model: nn.Module) -> None:
        self._params = dict(model.named_parameters(remove_duplicate=False))
        self._unfused: dict[str, tuple[str, str | int]] = {}
        for fused, parts in getattr(model, "packed_modules_mapping", {}).items():
            for hf_part, shard_id in parts:
                self._unfused[hf_part] = (fused, shard_id)
        # What a full checkpoint must cover: each distinct parameter, each of its shards.
        self.required: dict[tuple[int, str | int | None], str] = {}
        self._fused: set[str] = set()  # parameters that load only shard by shard
        self._num_names: dict[int, int] = {}  # id(param) -> its number of names (2 when tied)
        for name, param in self._params.items():
            shards = self._shards_of(name)
            if shards != [None]:
                self._fused.add(name)
            self._num_names[id(param)] = self._num_names.get(id(param), 0) + 1
            if self._num_names[id(param)] == 1:
                for shard in shards:
                    self.required[(id(param), shard)] = self._hf_name(name, shard)

    def resolve(self, hf_name: str) -> WeightTarget | None:
        """The target of ``hf_name``, or None when the model has no such weight."""
        parts = hf_name.split(".")
        for i, part in enumerate(parts):
            if part in self._unfused:
                fused, shard_id = self._unfused[part]
                name = ".".join(parts[:i] + [fused] + parts[i + 1 :])
                param = self._params.get(name)
                return None if param is None else WeightTarget(hf_name, name, param, shard_id)
        param = self._params.get(hf_name)
        if param is None or hf_name in self._fused:  # HF checkpoints never hold a fused tensor
            return None
        return WeightTarget(hf_name, hf_name, param, None)

    def is_tied(self, param: nn.Parameter) -> bool:
        return self._num_names.get(id(param), 0) > 1

    @staticmethod
    def is_ignored(hf_name: str) -> bool:
        return hf_name.endswith(_IGNORED_SUFFIXES)

    def _shards_of(self, name: str) -> list[str | int | None]:
        shards = [s for (fused, s) in self._unfused.values() if f".{fused}." in f".{name}."]
        return shards or [None]

    def _hf_name(self, name: str, shard: str | int | None) -> str:
        if shard is None:
            return name
        for hf_part, (fused, s) in self._unfused.items():
            if s == shard and f".{fused}." in f".{name}.":
                return name.replace(f".{fused}.", f".{hf_part}.")
        return name


def plan_load(
    weight_map: WeightMap,
    named_shapes: Iterable[tuple[str, torch.Size, torch.dtype]],
    *,
    require_all: bool,
) -> tuple[list[WeightTarget], list[str]]:
    """Validate names and shapes without touching any tensor.

    Returns (targets in input order, problems). Problems name each unknown, misshaped,
    non-floating, duplicated or (with ``require_all``) missing tensor.
    """
    targets: list[WeightTarget] = []
    problems: list[str] = []
    seen: set[str] = set()
    covered: dict[tuple[int, str | int | None], WeightTarget] = {}
    for hf_name, shape, dtype in named_shapes:
        if hf_name in seen:
            problems.append(f"tensor {hf_name!r} given twice")
            continue
        seen.add(hf_name)
        if WeightMap.is_ignored(hf_name):
            continue
        target = weight_map.resolve(hf_name)
        if target is None:
            problems.append(f"unexpected tensor {hf_name!r} (shape {tuple(shape)}): the model has no such weight")
            continue
        if tuple(shape) != tuple(target.expected_shape):
            problems.append(
                f"tensor {hf_name!r} has shape {tuple(shape)}, expected {tuple(target.expected_shape)}"
            )
            continue
        if not dtype.is_floating_point:
            problems.append(f"tensor {hf_name!r} has dtype {dtype}, expected a floating-point dtype")
            continue
        key = (id(target.param), target.shard_id)
        if key in covered:
            if not weight_map.is_tied(target.param):
                problems.append(f"tensor {hf_name!r} fills the same weight as {covered[key].hf_name!r}")
                continue
            # A tied model may receive both "lm_head.weight" and the embedding: the
            # embedding's own name wins, whatever the order in the checkpoint.
            if hf_name != weight_map.required[key]:
                continue
            targets.remove(covered[key])
        covered[key] = target
        targets.append(target)
    if require_all:
        missing = [name for key, name in weight_map.required.items() if key not in covered]
        problems.extend(f"missing tensor {name!r}" for name in missing)
    return targets, problems


def tensor_problem(hf_name: str, tensor: object) -> str | None:
    """What keeps ``tensor`` from being copied into a weight, or None. Everything the copy
    relies on beyond the name and shape (those are ``plan_load``'s): a dense tensor with
    data, of a floating dtype, not a distributed shard."""
    if not isinstance(tensor, torch.Tensor):
        return f"tensor {hf_name!r} is a {type(tensor).__name__}, expected a torch.Tensor"
    if tensor.is_meta:
        return f"tensor {hf_name!r} is on the meta device (it has no data)"
    if tensor.is_nested or tensor.layout != torch.strided:
        return f"tensor {hf_name!r} has layout {tensor.layout}, expected a dense (strided) tensor"
    if tensor.is_quantized:
        return f"tensor {hf_name!r} is quantized, expected a floating-point tensor"
    if _is_dtensor(tensor):
        return f"tensor {hf_name!r} is a DTensor shard: gather it first (full_tensor())"
    if not tensor.dtype.is_floating_point:
        return f"tensor {hf_name!r} has dtype {tensor.dtype}, expected a floating-point dtype"
    return None


def _is_dtensor(tensor: torch.Tensor) -> bool:
    if type(tensor) in (torch.Tensor, nn.Parameter) or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def nonfinite_names(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity. One min/max pass per tensor (NaN
    propagates through both, so a tensor is finite iff its min and max are); the flags stay
    on their device until one host read per device at the end."""
    flags: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in named_tensors:
        if tensor.numel() == 0:
            continue
        if tensor.dtype.itemsize == 1:  # fp8: no min/max kernels
            finite = torch.isfinite(tensor.float()).all()
        else:
            lo, hi = torch.aminmax(tensor)
            finite = torch.isfinite(lo) & torch.isfinite(hi)
        flags.setdefault(finite.device, []).append((name, finite))
    bad = []
    for entries in flags.values():
        ok = torch.stack([f for _, f in entries]).tolist()
        bad += [name for (name, _), good in zip(entries, ok) if not good]
    return bad


def copy_weights(targets: list[WeightTarget], tensors: Iterable[torch.Tensor]) -> None:
    """Phase two: copy each (already validated) tensor into its parameter, in place."""
    with torch.no_grad():
        for target, tensor in zip(targets, tensors, strict=True):
            target.param.weight_loader(target.param, tensor, target.shard_id)
