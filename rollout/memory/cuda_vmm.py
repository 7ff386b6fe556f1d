"""CudaVMMArena: an arena on CUDA virtual memory, so its device address survives sleep.

The virtual range is reserved once; physical memory is created and mapped into it on
restore and unmapped and released on release. Every view and every captured CUDA graph
keeps pointing at the same addresses. Uses the driver API through ``cuda-python``.
"""

from __future__ import annotations

import torch

from rollout.errors import PlatformError, WakeOOMError
from rollout.memory.arena import Arena


def _driver():
    try:
        from cuda.bindings import driver  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cuda as driver  # older cuda-python
        except ImportError as e:
            raise PlatformError("CUDA virtual memory needs the cuda-python package (pip install cuda-python)") from e
    return driver


def vmm_available() -> bool:
    try:
        _driver()
    except PlatformError:
        return False
    return True


def _check(result, what: str):
    drv = _driver()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != drv.CUresult.CUDA_SUCCESS:
        oom = err == drv.CUresult.CUDA_ERROR_OUT_OF_MEMORY
        cls = WakeOOMError if oom else PlatformError
        raise cls(f"{what} failed: {err.name if hasattr(err, 'name') else err}")
    return rest[0] if len(rest) == 1 else rest


class _CudaBuffer:
    """Exposes a raw device range to torch without copying or owning it."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3, "strides": None,
        }


class CudaVMMArena(Arena):
    keeps_address = True

    def synchronize(self) -> None:
        """Every kernel and copy queued on the device is done: only then may physical
        memory be unmapped under the views (an unmap under a running kernel is an
        'unspecified launch failure')."""
        torch.cuda.synchronize(self.device)

    def __init__(self, nbytes: int, device: torch.device) -> None:
        drv = _driver()
        self.device = device
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.init()
        with torch.cuda.device(index):
            torch.cuda.current_stream().synchronize()  # makes the primary context current
        prop = drv.CUmemAllocationProp()
        prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = index
        self._prop = prop
        gran = _check(
            drv.cuMemGetAllocationGranularity(prop, drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
            "cuMemGetAllocationGranularity",
        )
        self.nbytes = -(-nbytes // gran) * gran
        self._ptr = int(_check(drv.cuMemAddressReserve(self.nbytes, 0, 0, 0), "cuMemAddressReserve"))
        self._handle = None
        self._map()
        self.tensor = torch.as_tensor(_CudaBuffer(self._ptr, self.nbytes), device=device)
        self.tensor.zero_()

    @property
    def is_mapped(self) -> bool:
        return self._handle is not None

    @property
    def address(self) -> int:
        return self._ptr

    def _map(self) -> None:
        drv = _driver()
        handle = _check(drv.cuMemCreate(self.nbytes, self._prop, 0), f"cuMemCreate({self.nbytes} bytes)")
        try:
            _check(drv.cuMemMap(self._ptr, self.nbytes, 0, handle, 0), "cuMemMap")
            access = drv.CUmemAccessDesc()
            access.location = self._prop.location
            access.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            try:
                _check(drv.cuMemSetAccess(self._ptr, self.nbytes, [access], 1), "cuMemSetAccess")
            except Exception:
                drv.cuMemUnmap(self._ptr, self.nbytes)
                raise
        except Exception:
            drv.cuMemRelease(handle)
            raise
        self._handle = handle

    def release(self, *, synchronized: bool = False) -> None:
        if self._handle is None:
            return
        drv = _driver()
        if not synchronized:
            self.synchronize()  # no kernel or copy may still be using the memory
        _check(drv.cuMemUnmap(self._ptr, self.nbytes), "cuMemUnmap")
        _check(drv.cuMemRelease(self._handle), "cuMemRelease")
        self._handle = None

    def restore(self) -> None:
        if self._ptr is None:
            raise RuntimeError("restore() of a closed arena")
        if self._handle is None:
            self._map()  # WakeOOMError leaves nothing created or mapped

    def close(self) -> None:
        """Release the memory and give the address range back (views become invalid)."""
        if self._ptr is None:
            return
        self.release()
        _check(_driver().cuMemAddressFree(self._ptr, self.nbytes), "cuMemAddressFree")
        self._ptr = None
