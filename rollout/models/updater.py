"""WeightUpdater: HF-named tensors into a live model as one transaction.

The same mechanism serves the initial checkpoint load, ``load_weights`` and
``update_weights``: validate every name, shape and dtype (no tensor touched), then copy
each tensor in place through its parameter's ``weight_loader``. It also remembers which
weights are undefined after their memory was discarded (``sleep(level=2)``) until
updates have written every one of them again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from rollout.models.weights import WeightMap, copy_weights, nonfinite_names, plan_load

_MAX_LISTED = 10


class WeightUpdater:
    def __init__(self, model: nn.Module) -> None:
        self.weight_map = WeightMap(model)
        self._missing: set = set()
        # The part of _missing whose memory was discarded (not merely left stale by a
        # stream that failed): what reloading the original checkpoint may restore.
        self._discarded: set = set()

    @property
    def missing_names(self) -> list[str]:
        """HF names of weights whose contents are undefined (empty when all are loaded)."""
        return [self.weight_map.required[k] for k in self.weight_map.required if k in self._missing]

    @property
    def discarded_names(self) -> list[str]:
        """HF names of weights discarded by ``discard`` and not loaded since."""
        return [self.weight_map.required[k] for k in self.weight_map.required if k in self._discarded]

    def discard(self) -> None:
        """Every weight's contents are gone (their memory was released without a copy)."""
        self._missing = set(self.weight_map.required)
        self._discarded = set(self.weight_map.required)

    def mark_stale_except(self, loaded: set[str]) -> int:
        """A streamed update stopped part-way: weights it did not reach (HF names not in
        ``loaded``) hold an older version than the ones it did, so they count as missing
        until loaded again. Returns how many are now missing."""
        reached = {key for name in loaded if (t := self.weight_map.resolve(name)) for key in self.weight_map.covered_keys(t)}
        self._missing.update(k for k in self.weight_map.required if k not in reached)
        return len(self._missing)

    def apply(
        self,
        shapes: list[tuple[str, torch.Size, torch.dtype]],
        open_tensors: Callable[[], Iterable[torch.Tensor]],
        *,
        require_all: bool,
        error_cls: type[Exception],
        check_finite: bool = False,
    ) -> int:
        """Validate ``shapes`` (name, shape, dtype per tensor), then copy the tensors that
        ``open_tensors()`` yields (same order) into the model. Every check happens before
        the first copy, so an error leaves every weight as it was: names, shapes and dtypes
        from ``shapes``; then, with ``check_finite``, a pass over the tensors (a second
        ``open_tensors()``, which must yield the same tensors) for NaN and infinity. Raises
        ``error_cls`` listing the problems. Returns the number of tensors copied."""
        targets, problems = plan_load(self.weight_map, shapes, require_all=require_all)
        if problems:
            raise error_cls(listed_problems(problems))
        wanted = {t.hf_name for t in targets}

        def selected() -> Iterable[tuple[str, torch.Tensor]]:
            return ((name, t) for (name, _, _), t in zip(shapes, open_tensors()) if name in wanted)

        if check_finite:
            bad = nonfinite_names(selected())
            if bad:
                raise error_cls(listed_problems([f"tensor {n!r} holds NaN or inf" for n in bad]) +
                                " (nothing was copied; check_finite=False skips this check)")
        copy_weights(targets, (t for _, t in selected()))
        loaded = [key for t in targets for key in self.weight_map.covered_keys(t)]
        self._missing.difference_update(loaded)
        self._discarded.difference_update(loaded)
        return len(targets)


def listed_problems(problems: list[str]) -> str:
    """The first problems joined for an error message, and how many more there were."""
    more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
    return "; ".join(problems[:_MAX_LISTED]) + more
