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

# In a ``packed_modules_mapping`` HF fragment: any expert index of a stacked parameter (one
# whose dim 0 is the expert, ``param.num_experts`` long). The shard id is then
# ``(expert, shard_id)``: "model.layers.3.mlp.experts.5.up_proj.weight" is shard (5, "up")
# of "model.layers.3.mlp.experts.w13".
EXPERT = "{expert}"
# A mapping entry with this shard id names one HF tensor holding every shard of the
# parameter at once (transformers v5 modules hold experts stacked: "experts.gate_up_proj"
# [E, 2I, H]). Checkpoints need not hold it: it covers the parameter's shards instead.
WHOLE = "whole"


@dataclass(frozen=True)
class WeightTarget:
    hf_name: str
    param_name: str
    param: nn.Parameter
    shard_id: str | int | tuple | None

    @property
    def expected_shape(self) -> torch.Size:
        return self.param.hf_shape(self.shard_id)


@dataclass(frozen=True)
class _Rule:
    """One ``packed_modules_mapping`` entry: the engine fragment ``fused`` (dotted) stands
    for the HF fragment ``hf`` (dotted, may hold ``EXPERT``) in shard ``shard_id``."""

    fused: tuple[str, ...]
    hf: tuple[str, ...]
    shard_id: str | int

    def match(self, parts: list[str], i: int) -> int | None:
        """Whether ``parts[i:]`` starts with the HF fragment: None if not, else the expert
        index it names (-1 for a fragment without ``EXPERT``)."""
        if len(parts) - i < len(self.hf):
            return None
        expert = -1
        for want, got in zip(self.hf, parts[i:]):
            if want == EXPERT:
                if not got.isdigit():
                    return None
                expert = int(got)
            elif want != got:
                return None
        return expert

    def in_name(self, name: str) -> bool:
        return f".{'.'.join(self.fused)}." in f".{name}."

    def shards(self, param: nn.Parameter) -> list:
        if self.shard_id == WHOLE:
            return []  # an alternative to the shards, never required
        if EXPERT in self.hf:
            return [(e, self.shard_id) for e in range(param.num_experts)]
        return [self.shard_id]

    def hf_name(self, name: str, shard: str | int | tuple) -> str | None:
        """The HF name of ``shard`` of engine parameter ``name``, if this rule makes it."""
        expert = None
        if EXPERT in self.hf:
            if not (isinstance(shard, tuple) and shard[1] == self.shard_id):
                return None
            expert = str(shard[0])
        elif shard != self.shard_id:
            return None
        hf = ".".join(expert if p == EXPERT else p for p in self.hf)
        return f".{name}.".replace(f".{'.'.join(self.fused)}.", f".{hf}.")[1:-1]


class WeightMap:
    """Resolves HF names of one model (``packed_modules_mapping`` says which HF modules are
    fused into which engine module, and in which shard: a fragment of one or more name
    components, optionally naming an expert of a stacked parameter, see ``EXPERT``). Tied
    parameters answer to both names."""

    def __init__(self, model: nn.Module) -> None:
        self._params = dict(model.named_parameters(remove_duplicate=False))
        self._rules = [
            _Rule(tuple(fused.split(".")), tuple(hf_part.split(".")), shard_id)
            for fused, parts in getattr(model, "packed_modules_mapping", {}).items()
            for hf_part, shard_id in parts
        ]
        # What a full checkpoint must cover: each distinct parameter, each of its shards.
        self.required: dict[tuple[int, str | int | tuple | None], str] = {}
        self._fused: set[str] = set()  # parameters that load only shard by shard
        self._num_names: dict[int, int] = {}  # id(param) -> its number of names (2 when tied)
        self._shards: dict[int, list] = {}  # id(param) -> its shard ids
        for name, param in self._params.items():
            shards = self._shards_of(name, param)
            if shards != [None]:
                self._fused.add(name)
            self._num_names[id(param)] = self._num_names.get(id(param), 0) + 1
            if self._num_names[id(param)] > 1:
                continue
            self._shards[id(param)] = shards
            # fp8 scales (``loaded_with_weight``) answer to their names but are never required:
            # a full-precision weight writes them as it is quantized.
            if not getattr(param, "loaded_with_weight", False):
                for shard in shards:
                    self.required[(id(param), shard)] = self._hf_name(name, shard)

    def resolve(self, hf_name: str) -> WeightTarget | None:
        """The target of ``hf_name``, or None when the model has no such weight."""
        parts = hf_name.split(".")
        for i in range(len(parts)):
            for rule in self._rules:
                expert = rule.match(parts, i)
                if expert is None:
                    continue
                name = ".".join(parts[:i] + list(rule.fused) + parts[i + len(rule.hf) :])
                param = self._params.get(name)
                if param is None:
                    return None
                if expert < 0:
                    return WeightTarget(hf_name, name, param, rule.shard_id)
                if expert >= param.num_experts:
                    return None
                return WeightTarget(hf_name, name, param, (expert, rule.shard_id))
        param = self._params.get(hf_name)
        if param is None or hf_name in self._fused:  # HF checkpoints never hold a fused tensor
            return None
        return WeightTarget(hf_name, hf_name, param, None)

    def covered_keys(self, target: WeightTarget) -> list[tuple[int, str | int | tuple | None]]:
        """The ``required`` keys a tensor for ``target`` fills: its shard, or (``WHOLE``)
        every shard of its parameter."""
        if target.shard_id == WHOLE:
            return [(id(target.param), s) for s in self._shards[id(target.param)]]
        return [(id(target.param), target.shard_id)]

    def is_tied(self, param: nn.Parameter) -> bool:
        return self._num_names.get(id(param), 0) > 1

    @staticmethod
    def is_ignored(hf_name: str) -> bool:
        return hf_name.endswith(_IGNORED_SUFFIXES)

    def _shards_of(self, name: str, param: nn.Parameter) -> list:
        shards = [s for rule in self._rules if rule.in_name(name) for s in rule.shards(param)]
        return shards or [None]

    def _hf_name(self, name: str, shard: str | int | tuple | None) -> str:
        if shard is None:
            return name
        for rule in self._rules:
            if rule.in_name(name):
                hf = rule.hf_name(name, shard)
                if hf is not None:
                    return hf
        return name


def plan_load(
    weight_map: WeightMap,
    named_shapes: Iterable[tuple[str, torch.Size, torch.dtype]],
    *,
    require_all: bool,
) -> tuple[list[WeightTarget], list[str]]:
    """Validate names and shapes without touching any tensor.

    Returns (targets in input order, problems). Problems name each unknown, misshaped,
    non-floating, duplicated or (with ``require_all``) missing tensor, and each fp8 weight
    given without its scales or scales without their fp8 weight (``fp8_pair_problems``).
    """
    targets: list[WeightTarget] = []
    problems: list[str] = []
    seen: set[str] = set()
    covered: dict[tuple, WeightTarget] = {}
    dtypes: dict[str, torch.dtype] = {}
    for hf_name, shape, dtype in named_shapes:
        dtypes.setdefault(hf_name, dtype)
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
        dtype_problem = getattr(target.param, "hf_dtype_problem", None)
        if dtype_problem is not None and (problem := dtype_problem(target.shard_id, dtype)) is not None:
            problems.append(f"tensor {hf_name!r} {problem}")
            continue
        if dtype.itemsize == 1 and getattr(target.param, "loaded_with_weight", False):
            problems.append(f"tensor {hf_name!r} holds block scales but has dtype {dtype}: scales are fp32 or bf16")
            continue
        if dtype.itemsize == 1 and getattr(target.param, "fp8_scales", None) is None:
            # Casting fp8 values into a full-precision weight would drop their block scales.
            problems.append(
                f"tensor {hf_name!r} has dtype {dtype} but this weight is held in {target.param.dtype}: "
                "fp8 tensors load only into an engine built with quantization='fp8'"
            )
            continue
        keys = weight_map.covered_keys(target)
        clash = next((k for k in keys if k in covered), None)
        if clash is not None:
            if not weight_map.is_tied(target.param):
                problems.append(f"tensor {hf_name!r} fills the same weight as {covered[clash].hf_name!r}")
                continue
            # A tied model may receive both "lm_head.weight" and the embedding: the
            # embedding's own name wins, whatever the order in the checkpoint.
            if hf_name != weight_map.required[clash]:
                continue
            targets.remove(covered[clash])
        covered.update((k, target) for k in keys)
        targets.append(target)
    if require_all:
        missing = [name for key, name in weight_map.required.items() if key not in covered]
        problems.extend(f"missing tensor {name!r}" for name in missing)
    problems.extend(fp8_pair_problems(targets, dtypes))
    return targets, problems


_SCALE_SUFFIX = "_scale_inv"


def with_scale_names(names: set[str]) -> set[str]:
    """``names`` and each one's block-scale name (``<name>_scale_inv``): what reading weights
    back from their source needs, since an fp8 weight loads only with its scales
    (``fp8_pair_problems``). A source without such a tensor (full precision) simply lacks it."""
    return set(names) | {name + _SCALE_SUFFIX for name in names}


def fp8_pair_problems(targets: list[WeightTarget], dtypes: dict[str, torch.dtype]) -> list[str]:
    """An fp8 weight means nothing without its block scales: an fp8 tensor for a weight that
    has them (``param.fp8_scales``) needs ``<name>_scale_inv`` in the same load, and a
    ``*_scale_inv`` tensor needs its weight, in fp8. (A full-precision weight comes alone:
    its loader quantizes it and writes the scales.)"""
    problems = []
    names = {t.hf_name for t in targets}
    for t in targets:
        if getattr(t.param, "fp8_scales", None) is not None and dtypes[t.hf_name].itemsize == 1:
            scales = t.hf_name + _SCALE_SUFFIX
            if scales not in names:
                problems.append(f"tensor {t.hf_name!r} is fp8 but its scales {scales!r} are not given with it")
        elif getattr(t.param, "loaded_with_weight", False):
            weight = t.hf_name.removesuffix(_SCALE_SUFFIX)
            if weight not in names or dtypes[weight].itemsize != 1:
                problems.append(
                    f"tensor {t.hf_name!r} holds fp8 scales but its weight {weight!r} is not given in fp8 with it"
                )
    return problems


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


# The bits that make an fp8 value NaN or infinite when all set: e4m3fn has no infinity and
# one NaN per sign (S.1111.111); e5m2's all-ones exponent is an infinity or a NaN.
_FP8_NONFINITE_EXPONENT = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


def nonfinite_names(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity. One min/max pass per tensor (NaN
    propagates through both, so a tensor is finite iff its min and max are); the flags stay
    on their device until one host read per device at the end."""
    flags: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in named_tensors:
        if tensor.numel() == 0:
            continue
        if tensor.dtype in _FP8_NONFINITE_EXPONENT:  # fp8: no min/max kernels; read the bits
            mask = _FP8_NONFINITE_EXPONENT[tensor.dtype]  # (a same-size uint8 temporary, not fp32's 4x)
            finite = ~((tensor.view(torch.uint8) & mask) == mask).any()
        elif tensor.dtype.itemsize == 1:
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
