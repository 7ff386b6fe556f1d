"""The built-in CPU platform."""

from __future__ import annotations

import torch

from rollout.platforms.interface import Platform


def _host_mem_info() -> tuple[int, int]:
    """(available, total) host memory in bytes; psutil when installed, else /proc/meminfo."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    fields: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024  # values are in kB
    total = fields["MemTotal"]
    return fields.get("MemAvailable", fields.get("MemFree", 0)), total


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    supports_cuda_graphs = False
    supports_virtual_memory = False

    @classmethod
    def is_available(cls) -> bool:
        return True

    def default_device(self) -> torch.device:
        return torch.device("cpu")

    def device_count(self) -> int:
        return 1

    def attention_backend(self) -> str:
        return "torch_sdpa"

    def synchronize(self, device: torch.device) -> None:
        pass  # CPU ops run eagerly

    def mem_get_info(self, device: torch.device) -> tuple[int, int]:
        return _host_mem_info()

    def kv_cache_budget(self, device: torch.device, memory_utilization: float) -> int:
        # Host memory is shared with everything else in the process (the trainer, too), so
        # the CPU cache stays modest: a quarter of what is available, at most 2 GiB.
        available, _ = _host_mem_info()
        return min(2 << 30, available // 4)
