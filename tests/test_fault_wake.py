"""Faults of wake_up (issue #15): the device has no room to give the engine its memory back
(the trainer still holds it). The engine raises WakeOOMError and stays asleep and
consistent; once there is room, a later wake succeeds and generates as before the sleep.

The engine runs on a real platform registered through the platform registry, whose arenas
come out of a fixed-size pool that a "trainer" shares (``tests/helpers/plugins.py``): the
wake fails in the arena's own allocation, nothing in torch or the engine is patched.
"""

from __future__ import annotations

import pytest

import rollout.platforms as platforms
from rollout import SamplingParams
from rollout.errors import EngineSleepingError, WakeOOMError
from rollout.platforms import register_platform
from tests.helpers.engine_state import PROMPTS, greedy, make_llm
from tests.helpers.plugins import DevicePool, pooled_platform

DEVICE = "pooled_cpu"
MiB = 1 << 20
SHORT = SamplingParams(temperature=0.0, max_tokens=4, logprobs=0)


def _greedy(llm) -> list:
    """Greedy tokens and their logprobs (level 1 restores the weights bit for bit)."""
    return greedy(llm, params=SHORT)


@pytest.fixture
def pool():
    """A 64 MiB device, registered as the platform ``pooled_cpu`` for this test only."""
    pool = DevicePool(64 * MiB)
    platforms.reload_plugins()
    register_platform(pooled_platform(pool, DEVICE))
    yield pool
    platforms.reload_plugins()  # auto-detection must not find it in later tests


def _sizes(llm) -> tuple[int, int]:
    return llm.worker.memory.arenas["weights"].nbytes, llm.worker.memory.arenas["kv_cache"].nbytes


def _check_asleep(llm, pool, trainer: int, usage: dict, asleep: list[str]) -> None:
    """Still asleep as it was: the same tags unmapped, the same accounting, and the pool
    holds exactly the trainer's bytes plus the arenas that are awake (none half-mapped)."""
    assert llm.is_sleeping
    assert llm.worker.memory.asleep_tags() == asleep
    assert llm.memory_usage() == usage
    awake = sum(a.nbytes for a in llm.worker.memory.arenas.values() if a.is_mapped)
    assert pool.used == trainer + awake
    with pytest.raises(EngineSleepingError, match="wake_up"):
        llm.generate(PROMPTS, SHORT)


@pytest.mark.parametrize("room_for", ["nothing", "weights"])
def test_wake_without_room_stays_asleep_then_wakes(room_for, pool, a_dir):
    """Level 1: ``wake_up()`` fails at the weights, or at the KV cache after the weights
    were mapped (both-or-neither: the weights go back to sleep, the host copy stays); it
    fails again while the trainer holds on, then succeeds with the same greedy output."""
    llm = make_llm(a_dir, device=DEVICE)
    assert type(llm.platform).__name__ == "PooledPlatform"
    before = _greedy(llm)
    w, kv = _sizes(llm)
    assert pool.used == w + kv

    llm.sleep(1)
    usage = llm.memory_usage()
    assert usage["weights"] == {"device": 0, "host": w} and pool.used == 0
    trainer = pool.free - (w if room_for == "weights" else 0) - 1  # the trainer still holds the rest
    pool.take(trainer)
    for _ in range(2):  # a failed wake leaves nothing behind that would break the next one
        with pytest.raises(WakeOOMError) as info:
            llm.wake_up()
        failed = "kv_cache" if room_for == "weights" else "weights"
        assert f"no room for {failed!r}" in str(info.value)
        assert ("['weights'] put back to sleep" in str(info.value)) == (room_for == "weights")
        _check_asleep(llm, pool, trainer, usage, ["weights", "kv_cache"])

    pool.give(trainer)
    llm.wake_up()
    assert not llm.is_sleeping and pool.used == w + kv
    assert llm.memory_usage() == {"weights": {"device": w, "host": w}, "kv_cache": {"device": kv, "host": 0}}
    assert _greedy(llm) == before


def test_level_2_rl_order_with_kv_that_does_not_fit(pool, a_dir, sd_a):
    """Level 2 in the RL order: the weights wake and are reloaded while the trainer still
    holds memory; the KV cache does not fit yet. The weights stay awake and updated (woken
    by a call that succeeded), generation waits for the KV cache, a later wake finishes."""
    llm = make_llm(a_dir, device=DEVICE)
    before = _greedy(llm)
    w, kv = _sizes(llm)
    llm.sleep(2)
    usage = llm.memory_usage()
    assert usage == {"weights": {"device": 0, "host": 0}, "kv_cache": {"device": 0, "host": 0}}
    trainer = pool.free - w - 1
    pool.take(trainer)

    with pytest.raises(WakeOOMError, match="no room for 'kv_cache'; \\['weights'\\] put back to sleep"):
        llm.wake_up()
    _check_asleep(llm, pool, trainer, usage, ["weights", "kv_cache"])

    llm.wake_up(["weights"])
    llm.update_weights(sd_a)
    with pytest.raises(WakeOOMError, match="no room for 'kv_cache'; still asleep: \\['kv_cache'\\]"):
        llm.wake_up(["kv_cache"])
    _check_asleep(llm, pool, trainer, {**usage, "weights": {"device": w, "host": 0}}, ["kv_cache"])
    assert llm.weight_version == 1

    pool.give(trainer)
    llm.wake_up(["kv_cache"])
    assert not llm.is_sleeping and pool.used == w + kv
    assert _greedy(llm) == before
