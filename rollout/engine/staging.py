"""Staging: a step's host-built inputs reach the device in one copy from pinned memory.

A copy from pageable host memory makes CUDA wait for the stream to drain first, which would
serialise the host's preparation of step N+1 with the device's run of step N. So every
tensor a step sends (token ids, positions, slots, block tables, sampling parameters) is
packed into one pinned host buffer, copied with one asynchronous copy, and used through
views of one device buffer. Two host buffers take turns: the engine never has more than
one step in flight, and a step's copy has finished once that step has been read back, so
the buffer of step N-1 is free when step N+1 is packed.

Where the platform's device memory is the host's (``pin_host_memory`` False), the packed
host buffer is used directly and nothing is copied.
"""

from __future__ import annotations

import torch

_ALIGN = 16  # bytes: every view starts aligned for any dtype it may hold


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class Staging:
    def __init__(self, nbytes: int, device: torch.device, pin: bool) -> None:
        self.nbytes = _aligned(nbytes)
        self.host = [torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2 if pin else 1)]
        self.dev = torch.empty(self.nbytes, dtype=torch.uint8, device=device) if pin else None
        self._turn = 0

    def send(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Device tensors equal to the given host ``tensors`` (same names, shapes, dtypes),
        views of the staging buffer valid until the step after next is sent."""
        host = self.host[self._turn]
        self._turn = (self._turn + 1) % len(self.host)
        need = sum(_aligned(t.numel() * t.element_size()) for t in tensors.values())
        if need > self.nbytes:  # bounds are sized at start-up; a miss is an engine bug
            raise RuntimeError(f"step inputs need {need} bytes, the staging buffer has {self.nbytes}")
        offset, layout = 0, {}
        for name, t in tensors.items():
            n = t.numel() * t.element_size()
            host[offset : offset + n].view(t.dtype).view(t.shape).copy_(t)
            layout[name] = (offset, n, t.dtype, t.shape)
            offset += _aligned(n)
        if self.dev is None:
            buf = host
        else:
            self.dev[:offset].copy_(host[:offset], non_blocking=True)
            buf = self.dev
        return {name: buf[o : o + n].view(dtype).view(shape) for name, (o, n, dtype, shape) in layout.items()}
