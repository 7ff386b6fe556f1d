"""The built-in CUDA platform."""

from __future__ import annotations

import logging

import torch

from rollout.platforms.interface import Platform

logger = logging.getLogger(__name__)


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    supports_cuda_graphs = True
    pin_host_memory = True
    profile_before_kv_sizing = True

    @classmethod
    def is_available(cls) -> bool:
        try:
            return torch.cuda.is_available()
        except Exception:  # a broken driver means "not available", not a crash
            return False

    def default_device(self) -> torch.device:
        return torch.device("cuda", 0)

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def attention_backend(self) -> str:
        # One Triton launch per step over prefill chunks and decodes; SDPA without triton.
        return "triton" if _has_triton() else "torch_sdpa"

    def ops_backend(self) -> str:
        if not _has_triton():
            return "torch"
        # The FP8 GEMMs' tl.dot on e4m3 needs Ada/Hopper (sm_89+); older GPUs run the
        # FP8 layers through the torch references and everything else through Triton.
        return "triton" if torch.cuda.get_device_capability() >= (8, 9) else "triton_no_fp8"

    def invariant_backends(self) -> tuple[str, str]:
        # Fixed-tiling Triton kernels (rollout.kernels.triton_invariant); the per-token torch
        # ones without triton.
        return ("triton_invariant", "triton_invariant") if _has_triton() else ("torch_invariant", "torch_invariant")

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)

    def record_step_done(self, device: torch.device) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event

    def mem_get_info(self, device: torch.device) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)

    @property
    def supports_virtual_memory(self) -> bool:  # type: ignore[override]
        from rollout.memory.cuda_vmm import vmm_available

        return vmm_available()

    def create_arena(self, nbytes: int, device: torch.device):
        """CUDA virtual memory when cuda-python is installed: the arena keeps its address
        across sleep/wake, so captured CUDA graphs stay valid."""
        if self.supports_virtual_memory:
            from rollout.memory.cuda_vmm import CudaVMMArena

            return CudaVMMArena(nbytes, device)
        logger.warning("cuda-python is not installed: sleep/wake will move device addresses")
        return super().create_arena(nbytes, device)

    def release_cached_memory(self, device: torch.device) -> None:
        with torch.cuda.device(device):
            torch.cuda.empty_cache()
