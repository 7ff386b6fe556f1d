"""Platform registry: built-ins, entry-point plugins, and the Platform contract on cpu."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rollout.platforms as platforms
from rollout.errors import PlatformError
from rollout.platforms import PLUGIN_GROUP, available_platforms, get_platform, register_platform
from rollout.platforms.cpu import CpuPlatform
from tests.helpers.plugins import make_plugin as write_plugin

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="expects a machine without CUDA")

DUMMY_NPU = """
import torch
from rollout.platforms.cpu import CpuPlatform

class DummyNPUPlatform(CpuPlatform):
    # An out-of-tree device whose tensors live on cpu: only name/device_type identify it.
    name = "dummy_npu"
    device_type = "dummy_npu"

    def parse_device(self, device):
        return torch.device("cpu")
"""


def make_plugin(root: Path, pkg: str, code: str, entry_points: str) -> Path:
    return write_plugin(root, pkg, code, entry_points, PLUGIN_GROUP)


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    platforms.reload_plugins()
    modules_before = set(sys.modules)
    yield
    platforms.reload_plugins()  # before monkeypatch restores sys.path; next lookup rescans
    for name in set(sys.modules) - modules_before:
        if name.startswith("rollout_"):  # plugin packages written by make_plugin
            del sys.modules[name]


@no_gpu
def test_cpu_is_picked_without_gpu():
    for device in (None, "cpu", "cpu:0", torch.device("cpu")):
        assert type(get_platform(device)) is CpuPlatform
    assert {"cpu", "cuda"} <= set(available_platforms())


@no_gpu
def test_cuda_known_but_not_available():
    with pytest.raises(PlatformError, match=r"'cuda'.*not available"):
        get_platform("cuda")
    with pytest.raises(PlatformError, match="not available"):
        get_platform(torch.device("cuda", 1))


@pytest.mark.parametrize("device", ["tpu", "bogus:3"])
def test_unknown_device_type_names_known_ones(device):
    with pytest.raises(PlatformError, match="known device types: cpu, cuda"):
        get_platform(device)


def test_cpu_platform_contract(monkeypatch):
    cpu = get_platform("cpu")
    assert cpu.attention_backend() == "torch_sdpa" and not cpu.supports_cuda_graphs
    assert cpu.parse_device(None) == torch.device("cpu")
    with pytest.raises(PlatformError, match="out of range"):
        cpu.parse_device("cpu:1")
    with pytest.raises(PlatformError, match="not a 'cpu' device"):
        cpu.parse_device("meta")
    cpu.synchronize(torch.device("cpu"))
    free, total = cpu.mem_get_info(torch.device("cpu"))
    assert 0 < free <= total
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError
    free2, total2 = cpu.mem_get_info(torch.device("cpu"))
    assert 0 < free2 <= total2 and abs(total2 - total) < 2**20


def test_seeded_generator_leaves_global_rng_alone():
    cpu = get_platform("cpu")
    state = torch.get_rng_state()
    a = torch.rand(4, generator=cpu.manual_seed_generator(7, torch.device("cpu")))
    b = torch.rand(4, generator=cpu.manual_seed_generator(7, torch.device("cpu")))
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state())


def test_register_collision():
    class OtherCpu(CpuPlatform):
        pass  # same name "cpu", different class

    register_platform(CpuPlatform)  # same class again: no-op
    with pytest.raises(PlatformError, match="'cpu' is taken"):
        register_platform(OtherCpu)


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch):
    make_plugin(tmp_path, "rollout_dummy_npu", DUMMY_NPU,
                "dummy_npu = rollout_dummy_npu:DummyNPUPlatform\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_platform().name == "dummy_npu"  # plugins win auto-detection
    npu = get_platform("dummy_npu:0")
    assert npu.name == "dummy_npu" and npu.parse_device("dummy_npu") == torch.device("cpu")
    assert type(get_platform("cpu")) is CpuPlatform
    assert available_platforms()["dummy_npu"].__module__ == "rollout_dummy_npu"


def test_broken_and_unusable_plugins_are_skipped(tmp_path, monkeypatch, caplog):
    make_plugin(tmp_path, "rollout_broken", "raise ImportError('no driver')\n",
                "broken_npu = rollout_broken:Platform\n")
    make_plugin(tmp_path, "rollout_absent", "def factory():\n    return None\n",
                "absent_npu = rollout_absent:factory\n")
    make_plugin(tmp_path, "rollout_dummy_npu", DUMMY_NPU + "\ndef factory():\n"
                "    return DummyNPUPlatform\n", "dummy_npu = rollout_dummy_npu:factory\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="rollout.platforms"):
        names = set(available_platforms())
    assert names == {"cpu", "cuda", "dummy_npu"}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "broken_npu" in warnings[0].getMessage()
    assert "no driver" in warnings[0].getMessage()
    assert get_platform().name == "dummy_npu"


def test_plugin_discovered_in_fresh_interpreter(tmp_path):
    make_plugin(tmp_path, "rollout_dummy_npu", DUMMY_NPU,
                "dummy_npu = rollout_dummy_npu:DummyNPUPlatform\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    code = "from rollout.platforms import get_platform; print(get_platform().name)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == "dummy_npu"
