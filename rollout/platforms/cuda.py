"""The built-in CUDA platform."""

from __future__ import annotations

import torch

from rollout.platforms.interface import Platform


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    supports_cuda_graphs = True
    # False until the sleep/wake work lands; that issue sets it once virtual memory works.
    supports_virtual_memory = False

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
        # SDPA until the Triton paged-attention backend lands; then "triton".
        return "torch_sdpa"

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)

    def mem_get_info(self, device: torch.device) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
