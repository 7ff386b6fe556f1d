"""Out-of-tree plugins written on disk: a package plus a dist-info with entry points, so
``importlib.metadata`` discovers them exactly as it would an installed distribution. And a
platform whose memory is a fixed pool shared with other tenants, to make ``wake_up`` run
out of memory for real (``pooled_platform``)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch

from rollout.errors import WakeOOMError
from rollout.memory.arena import StorageArena
from rollout.platforms.cpu import CpuPlatform
from rollout.platforms.interface import Platform


def make_plugin(root: Path, pkg: str, code: str, entry_points: str, group: str) -> Path:
    """Write an installed-looking distribution (package + dist-info) under ``root``."""
    (root / pkg).mkdir(parents=True)
    (root / pkg / "__init__.py").write_text(textwrap.dedent(code))
    info = root / f"{pkg}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {pkg}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n" + textwrap.dedent(entry_points))
    return root


class DevicePool:
    """A device of ``capacity`` bytes shared by tenants: the arenas of a ``pooled_platform``
    and anyone else (a trainer still holding its memory). Taking more than is free raises
    ``torch.OutOfMemoryError``, as a device allocator does."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def take(self, nbytes: int) -> None:
        if nbytes > self.free:
            raise torch.OutOfMemoryError(f"tried to take {nbytes} bytes, {self.free} of {self.capacity} free")
        self.used += nbytes

    def give(self, nbytes: int) -> None:
        assert 0 <= nbytes <= self.used, (nbytes, self.used)
        self.used -= nbytes


class PooledArena(StorageArena):
    """A CPU arena whose bytes count against a ``DevicePool`` while mapped. Keeps the Arena
    contract the way a device plugin's arena must: a restore the pool has no room for
    raises ``WakeOOMError`` and leaves nothing taken."""

    def __init__(self, pool: DevicePool, nbytes: int, device: torch.device) -> None:
        pool.take(nbytes)
        super().__init__(nbytes, device)
        self.pool = pool

    def release(self, *, synchronized: bool = False) -> None:
        if self.is_mapped:
            super().release(synchronized=synchronized)
            self.pool.give(self.nbytes)

    def restore(self) -> None:
        if self.is_mapped:
            return
        try:
            self.pool.take(self.nbytes)
        except torch.OutOfMemoryError as e:
            raise WakeOOMError(f"could not take back {self.nbytes} bytes: {e}") from e
        try:
            super().restore()
        except BaseException:
            self.pool.give(self.nbytes)
            raise


def pooled_platform(pool: DevicePool, platform_name: str = "pooled_cpu") -> type[Platform]:
    """A platform (register it with ``register_platform``; select it with ``device=platform_name``)
    whose tensors live on cpu and whose arenas come out of ``pool``: a device with a fixed
    amount of memory that other tenants share. The class is stateless; the pool is the
    device."""

    class PooledPlatform(CpuPlatform):
        name = device_type = platform_name

        def parse_device(self, device: str | torch.device | None) -> torch.device:
            return torch.device("cpu")

        def mem_get_info(self, device: torch.device) -> tuple[int, int]:
            return pool.free, pool.capacity

        def create_arena(self, nbytes: int, device: torch.device) -> PooledArena:
            return PooledArena(pool, nbytes, device)

    return PooledPlatform
