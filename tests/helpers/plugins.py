"""Out-of-tree plugins written on disk: a package plus a dist-info with entry points, so
``importlib.metadata`` discovers them exactly as it would an installed distribution."""

from __future__ import annotations

import textwrap
from pathlib import Path


def make_plugin(root: Path, pkg: str, code: str, entry_points: str, group: str) -> Path:
    """Write an installed-looking distribution (package + dist-info) under ``root``."""
    (root / pkg).mkdir(parents=True)
    (root / pkg / "__init__.py").write_text(textwrap.dedent(code))
    info = root / f"{pkg}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {pkg}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n" + textwrap.dedent(entry_points))
    return root
