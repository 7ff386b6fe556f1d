"""Arena: one flat byte buffer whose device memory can be released and restored in place.

Tensors that are views of ``arena.tensor`` (parameters, per-layer KV caches) stay valid
objects across a release; their contents are undefined until the next restore. Subclasses
differ in whether the device *address* survives too (CUDA virtual memory keeps it, so
captured CUDA graphs stay valid; plain storage resizing does not).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

ALIGN = 256  # bytes: every view starts on a boundary any kernel is happy with


def align_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


class Arena(ABC):
    """Contract: ``tensor`` is a flat uint8 tensor of ``nbytes`` on ``device``.
    ``release()`` returns the memory (idempotent); ``restore()`` takes it back (idempotent),
    raising ``WakeOOMError`` with nothing half-done if the device is out of memory."""

    nbytes: int
    device: torch.device
    tensor: torch.Tensor
    keeps_address: bool = False

    @property
    @abstractmethod
    def is_mapped(self) -> bool: ...

    @abstractmethod
    def release(self, *, synchronized: bool = False) -> None:
        """``synchronized=True``: the caller made sure no queued work still uses the memory
        (``synchronize()``), so the arena need not wait for the device itself."""

    @abstractmethod
    def synchronize(self) -> None:
        """Wait until the device's queued work is done: release and the host copy of a
        sleep rely on it."""

    @abstractmethod
    def restore(self) -> None: ...

    def close(self) -> None:
        """Release for good: the arena is not restored again (idempotent)."""
        self.release()

    def view(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A typed view of ``prod(shape) * itemsize`` bytes at ``offset``."""
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        assert offset % ALIGN == 0 and offset + nbytes <= self.nbytes, (offset, nbytes, self.nbytes)
        return self.tensor[offset : offset + nbytes].view(dtype).view(shape)


class StorageArena(Arena):
    """Backed by a torch allocation; release shrinks its storage to zero bytes, restore
    regrows it (a new address: fine on CPU, where nothing captures addresses)."""

    def __init__(self, nbytes: int, device: torch.device, synchronize: Callable[[], None] | None = None) -> None:
        self.nbytes = nbytes
        self.device = device
        # The platform's wait for the device's queued work (none off an accelerator).
        self._synchronize = synchronize or (lambda: None)
        self.tensor = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self._mapped = True

    @property
    def is_mapped(self) -> bool:
        return self._mapped

    def synchronize(self) -> None:
        self._synchronize()

    def release(self, *, synchronized: bool = False) -> None:
        # The caching allocator orders the storage's reuse after the work queued on it.
        if self._mapped:
            self.tensor.untyped_storage().resize_(0)
            self._mapped = False

    def restore(self) -> None:
        if self._mapped:
            return
        from rollout.errors import WakeOOMError

        try:
            self.tensor.untyped_storage().resize_(self.nbytes)
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            self.tensor.untyped_storage().resize_(0)
            raise WakeOOMError(f"could not take back {self.nbytes} bytes on {self.device}: {e}") from e
        self._mapped = True
