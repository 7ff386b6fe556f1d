"""The Platform contract: what the engine may ask of a kind of hardware."""

from __future__ import annotations

from abc import ABC, abstractmethod

from typing import TYPE_CHECKING, Any

import torch

from rollout.errors import PlatformError

if TYPE_CHECKING:
    from rollout.memory.arena import Arena


class Platform(ABC):
    """One kind of hardware (cpu, cuda, an out-of-tree NPU ...).

    Contract:
    - ``name`` identifies the platform; ``device_type`` is the string a user passes as
      ``device=`` (``"cuda:1"`` selects the platform whose ``device_type`` is ``"cuda"``).
    - ``is_available()`` is cheap, never raises, and creates no device context it can avoid.
    - Instances hold no mutable state; every method takes an explicit device and never
      touches process-wide state (no global RNG seeding, no default device, no allocator).
    - ``parse_device`` returns the ``torch.device`` tensors should live on; it may differ
      from ``device_type`` for plugins that piggy-back on another torch backend.
    - Only code under ``rollout/platforms/`` branches on device type; everything else asks
      the platform.
    """

    name: str
    device_type: str
    supports_cuda_graphs: bool = False
    supports_virtual_memory: bool = False
    # Host copies of device memory (weights during sleep(level=1)) use pinned memory.
    pin_host_memory: bool = False
    # KV sizing by memory utilisation first runs the largest step once, so its activation
    # memory is counted (devices whose memory the engine shares with nothing else).
    profile_before_kv_sizing: bool = False

    @classmethod
    @abstractmethod
    def is_available(cls) -> bool:
        """True when this platform can run in this process."""

    @abstractmethod
    def default_device(self) -> torch.device:
        """The device used when the caller gives none (index 0 for indexed devices)."""

    @abstractmethod
    def device_count(self) -> int:
        """How many devices of this type exist; used to validate indices."""

    def parse_device(self, device: str | torch.device | None) -> torch.device:
        """Validate ``device`` for this platform; ``None`` means ``default_device()``."""
        if device is None:
            return self.default_device()
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise PlatformError(f"invalid device {device!r} for platform {self.name!r}: {e}") from e
        if dev.type != self.device_type:
            raise PlatformError(
                f"device {device!r} is not a {self.device_type!r} device (platform {self.name!r})"
            )
        num_devices = self.device_count()
        if dev.index is not None and not 0 <= dev.index < num_devices:
            raise PlatformError(
                f"device {device!r}: index {dev.index} out of range, "
                f"platform {self.name!r} has {num_devices} device(s)"
            )
        return dev

    def attention_backend(self) -> str:
        """Name of the attention implementation the engine should use on this platform."""
        return "torch"

    def ops_backend(self) -> str:
        """Name of the op set (RMSNorm, rotary, SiLU-and-mul) for this platform."""
        return "torch"

    def invariant_backends(self) -> tuple[str, str]:
        """(attention backend, op set) of the batch-invariant mode (``LLM(batch_invariant=True)``):
        kernels whose result for a token never depends on the rest of the batch. The torch
        ones work on any device (one call per token: slow); a platform with faster
        invariant kernels names them."""
        return "torch_invariant", "torch_invariant"

    @abstractmethod
    def synchronize(self, device: torch.device) -> None:
        """Block until all work queued on ``device`` has finished."""

    def record_step_done(self, device: torch.device) -> Any:
        """A marker of the work queued on ``device`` so far; its ``synchronize()`` waits for
        it (the engine reads a step's sampled tokens while the next step runs). Platforms
        whose ops run eagerly return one that does not wait."""
        return _DONE

    @abstractmethod
    def mem_get_info(self, device: torch.device) -> tuple[int, int]:
        """(free, total) bytes of the memory that ``device`` allocates from."""

    def kv_cache_budget(self, device: torch.device, memory_utilization: float) -> int:
        """Bytes the KV cache may take when the user sized it neither by blocks nor bytes,
        called after the weights are loaded: what is left of ``memory_utilization`` of the
        device's memory."""
        free, total = self.mem_get_info(device)
        return max(0, int(total * memory_utilization) - (total - free))

    def create_arena(self, nbytes: int, device: torch.device) -> Arena:
        """A flat buffer the engine can release and restore (weights, KV cache). The base
        arena re-allocates on restore; platforms with virtual memory keep the address."""
        from rollout.memory.arena import StorageArena

        return StorageArena(nbytes, device, lambda: self.synchronize(device))

    def allocate_host(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 host tensor of ``nbytes`` that device memory is copied to (a chunk of
        the weights' copy kept by ``sleep(level=1)``): pinned where ``pin_host_memory``. May
        be called from a background thread; raises on failure (host out of memory)."""
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_host_memory)

    def release_cached_memory(self, device: torch.device) -> None:
        """Return memory the framework's allocator holds but no tensor uses (after sleep)."""

    def manual_seed_generator(self, seed: int, device: torch.device) -> torch.Generator:
        """A new generator on ``device`` seeded with ``seed``; the global RNG is untouched."""
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        return gen


class _Done:
    """The marker of work that has already finished."""

    def synchronize(self) -> None:
        pass


_DONE = _Done()
