"""Everything under tests/gpu needs a CUDA GPU: skip it all (visibly) on machines without one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if Path(item.fspath).is_relative_to(_HERE):
            item.add_marker(skip)
