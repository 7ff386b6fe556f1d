"""Platform registry: built-in ``cpu`` and ``cuda`` plus plugins from entry points.

Out-of-tree platforms are installed packages that declare an entry point in the group
``rollout.platforms``. The entry point names either a ``Platform`` subclass or a zero-arg
function returning one, or ``None`` when the plugin cannot run here. Plugins are loaded
once, lazily, on the first lookup; one that fails to load is logged and skipped.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

import torch

from rollout.errors import PlatformError
from rollout.platforms.cpu import CpuPlatform
from rollout.platforms.cuda import CudaPlatform
from rollout.platforms.interface import Platform

__all__ = ["Platform", "available_platforms", "get_platform", "register_platform"]

logger = logging.getLogger(__name__)

PLUGIN_GROUP = "rollout.platforms"
_BUILTINS: tuple[type[Platform], ...] = (CudaPlatform, CpuPlatform)  # auto-detect order

# The registry (one of the two allowed module-level mutable registries): name -> class.
_platforms: dict[str, type[Platform]] = {cls.name: cls for cls in _BUILTINS}
_plugins_loaded = False


def register_platform(platform_cls: type[Platform]) -> None:
    """Add ``platform_cls`` under its ``name``; re-registering the same class is a no-op."""
    if not (isinstance(platform_cls, type) and issubclass(platform_cls, Platform)):
        raise PlatformError(f"{platform_cls!r} is not a Platform subclass")
    name = getattr(platform_cls, "name", None)
    if not isinstance(name, str) or not name:
        raise PlatformError(f"{platform_cls.__qualname__} has no 'name'")
    existing = _platforms.get(name)
    if existing is not None and existing is not platform_cls:
        raise PlatformError(
            f"platform name {name!r} is taken by {existing.__module__}.{existing.__qualname__}; "
            f"cannot register {platform_cls.__module__}.{platform_cls.__qualname__}"
        )
    _platforms[name] = platform_cls


def _load_plugin(ep) -> None:
    obj = ep.load()
    if not (isinstance(obj, type) and issubclass(obj, Platform)):
        if not callable(obj):
            raise PlatformError(f"{obj!r} is neither a Platform subclass nor a function")
        obj = obj()
        if obj is None:
            logger.info("platform plugin %r (%s) is not usable here; skipped", ep.name, ep.value)
            return
    register_platform(obj)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True  # set first: a plugin may look up platforms while importing
    seen: set[tuple[str, str]] = set()
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda ep: (ep.name, ep.value)):
        if (ep.name, ep.value) in seen:  # the same distribution found twice on sys.path
            continue
        seen.add((ep.name, ep.value))
        try:
            _load_plugin(ep)
        except Exception as e:
            logger.warning("skipping platform plugin %r (%s): %s: %s",
                           ep.name, ep.value, type(e).__name__, e)


def available_platforms() -> dict[str, type[Platform]]:
    """Every known platform (built-ins and plugins) by name, available here or not."""
    _load_plugins()
    return dict(_platforms)


def _is_available(cls: type[Platform]) -> bool:
    try:
        return bool(cls.is_available())
    except Exception as e:
        logger.warning("platform %r: is_available() raised %s: %s", cls.name, type(e).__name__, e)
        return False


def get_platform(device: str | torch.device | None = None) -> Platform:
    """The platform for ``device`` (``"cuda:1"`` -> cuda), or auto-detect when ``None``.

    Auto-detection picks the first available out-of-tree platform by name, else cuda if
    available, else cpu.
    """
    platforms = available_platforms()
    builtins = [cls for cls in _BUILTINS if platforms.get(cls.name) is cls]
    plugins = [platforms[n] for n in sorted(platforms) if platforms[n] not in _BUILTINS]
    if device is None:
        for cls in plugins + builtins:
            if _is_available(cls):
                return cls()
        raise PlatformError(f"no platform is available; known: {sorted(platforms)}")
    if isinstance(device, torch.device):
        device_type = device.type
    elif isinstance(device, str):
        device_type = device.split(":", 1)[0].strip()
    else:
        raise PlatformError(f"device must be a str, torch.device or None, got {device!r}")
    matches = [c for c in plugins + builtins if device_type in (c.device_type, c.name)]
    if not matches:
        known = sorted({c.device_type for c in platforms.values()})
        raise PlatformError(f"unknown device type {device_type!r} in device={device!r}; "
                            f"known device types: {', '.join(known)}")
    for cls in matches:
        if _is_available(cls):
            platform = cls()
            platform.parse_device(device)  # validates the index where the platform can
            return platform
    names = ", ".join(repr(c.name) for c in matches)
    raise PlatformError(f"device {device!r}: platform {names} is known but not available "
                        "in this process (its is_available() returned False)")


def reload_plugins() -> None:
    """Forget plugins and runtime registrations: the next lookup rescans the entry points
    (after a plugin was installed or removed in a running process)."""
    global _plugins_loaded
    _platforms.clear()
    _platforms.update({cls.name: cls for cls in _BUILTINS})
    _plugins_loaded = False
