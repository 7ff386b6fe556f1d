"""The host copy of the weights (issue #19): allocated in chunks, ahead of time in a
background thread (``enable_sleep_mode=True``) or by the first sleep(1), copied chunk by
chunk. On CPU, through a real engine on a platform registered through the platform registry
whose ``allocate_host`` is the test's: it records the chunks, can hold one allocation until
the test releases it, and can fail. Nothing in torch or the engine is patched.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable

import pytest
import torch

import rollout.platforms as platforms
from rollout import SamplingParams
from rollout.errors import HostMemoryError
from rollout.memory.host_buffer import MAX_CHUNK_BYTES, MIN_CHUNKS, HostBuffer, chunk_spans
from rollout.platforms import register_platform
from rollout.platforms.cpu import CpuPlatform
from tests.helpers.engine_state import GREEDY, PROMPTS, assert_same_greedy, changed, greedy, make_llm, snapshot

# Compares greedy outputs across engines: run again with another thread count (.ci/run).
pytestmark = pytest.mark.numerics

DEVICE = "host_test_cpu"
TIMEOUT = 30.0
FILL = 0xAB  # a fresh chunk's bytes, so a chunk nothing was copied into is recognisable
HOLD = 3  # the chunk whose allocation a HostPool holds
THREAD_PREFIX = "rollout-host-copy"


class HostPool:
    """The test platform's host allocator. Call ``i`` (retries count) is held until
    ``release`` when ``i == hold_at``, and raises MemoryError when ``fail(i)``."""

    def __init__(self, hold_at: int | None = None, fail: Callable[[int], bool] = lambda i: False) -> None:
        self.hold_at, self.fail = hold_at, fail
        self.holding, self.release = threading.Event(), threading.Event()
        self.sizes: list[int] = []  # every call's size
        self.threads: list[str] = []  # every call's thread
        self.chunks: list[weakref.ref] = []  # every chunk handed out, in order
        self._lock = threading.Lock()

    def __call__(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            i = len(self.sizes)
            self.sizes.append(nbytes)
            self.threads.append(threading.current_thread().name)
        if i == self.hold_at:
            self.holding.set()
            assert self.release.wait(TIMEOUT), "the test never released the held allocation"
        if self.fail(i):
            raise MemoryError(f"test host has no room for {nbytes} bytes (call {i})")
        t = torch.full((nbytes,), FILL, dtype=torch.uint8)
        self.chunks.append(weakref.ref(t))
        return t

    def chunk(self, i: int) -> torch.Tensor:
        t = self.chunks[i]()
        assert t is not None, f"chunk {i} was freed"
        return t


@pytest.fixture
def host_device():
    """Registers a platform ``host_test_cpu`` whose host allocator is the given HostPool, for
    this test only; releases every pool's held allocation at the end (no thread left waiting)."""
    pools: list[HostPool] = []

    def register(pool: HostPool) -> str:
        class HostTestPlatform(CpuPlatform):
            name = device_type = DEVICE

            def parse_device(self, device: str | torch.device | None) -> torch.device:
                return torch.device("cpu")

            def allocate_host(self, nbytes: int) -> torch.Tensor:
                return pool(nbytes)

        pools.append(pool)
        register_platform(HostTestPlatform)
        return DEVICE

    platforms.reload_plugins()
    yield register
    for pool in pools:
        pool.release.set()
    platforms.reload_plugins()  # auto-detection must not find it in later tests


def _weights(llm) -> torch.Tensor:
    return llm.worker.memory.arenas["weights"].tensor


def _host_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)}


def _until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _hog(llm) -> list[torch.Tensor]:
    """Fill what sleep freed with garbage, so a wake that does not restore the contents fails."""
    return [torch.full((a.nbytes,), 0xFF, dtype=torch.uint8) for a in llm.worker.memory.arenas.values()]


def _sleep_wake_keeps_weights(llm, expect_out) -> None:
    before = snapshot(llm)
    llm.sleep(1)
    hog = _hog(llm)
    llm.wake_up()
    del hog
    assert changed(before, snapshot(llm)) == set()
    assert greedy(llm) == expect_out


# ---- chunks ------------------------------------------------------------------------------
@pytest.mark.parametrize("nbytes", [1, 255, 256, 4096, 492_800, 2**30, 2**30 + 2**21 + 256, 3_089_104_896, 16_381_837_312])
def test_chunk_spans_cover_exactly_in_powers_of_two(nbytes):
    spans = chunk_spans(nbytes)
    offsets = [o for o, _ in spans]
    sizes = [s for _, s in spans]
    assert offsets[0] == 0 and all(o + s == n for (o, s), n in zip(spans, offsets[1:]))
    assert offsets[-1] + sizes[-1] == nbytes
    # Torch's pinned allocator rounds an allocation up to a power of two: none is wasted.
    assert all(s & (s - 1) == 0 and s <= MAX_CHUNK_BYTES for s in sizes)
    chunk = sizes[0]
    body = [s for s in sizes if s == chunk]
    tail = sizes[len(body):]
    assert sizes[: len(body)] == body and tail == sorted(set(tail), reverse=True) and all(s < chunk for s in tail)
    if nbytes >= MIN_CHUNKS:
        assert len(body) >= MIN_CHUNKS  # something to allocate while a chunk is copied


def test_a_bad_allocation_is_a_host_memory_error():
    src = torch.arange(1000, dtype=torch.int32).to(torch.uint8)
    for bad in (lambda n: torch.empty(n + 1, dtype=torch.uint8), lambda n: torch.empty(n, dtype=torch.float32),
                lambda n: torch.empty(n, 2, dtype=torch.uint8)[:, 0], lambda n: None):
        buf = HostBuffer(1000, bad)
        with pytest.raises(HostMemoryError, match="chunk 0 of .*not a flat contiguous uint8 CPU tensor") as info:
            buf.copy_from(src, non_blocking=False)
        assert isinstance(info.value.__cause__, TypeError)
    buf = HostBuffer(1000, lambda n: torch.empty(n, dtype=torch.uint8))
    buf.copy_from(src, non_blocking=False)
    dst = torch.zeros_like(src)
    buf.copy_to(dst, non_blocking=False)
    assert torch.equal(dst, src) and buf.allocated_bytes == 1000


# ---- sleep / wake through an engine ------------------------------------------------------
@pytest.mark.parametrize("ahead", [True, False], ids=["background", "on-first-sleep"])
def test_round_trip_is_bitwise(ahead, host_device, a_dir, a_out):
    pool = HostPool()
    llm = make_llm(a_dir, device=host_device(pool), enable_sleep_mode=ahead)
    nbytes = llm.worker.memory.arenas["weights"].nbytes
    if ahead:
        assert llm.worker.memory.wait_host_copy(TIMEOUT)
        assert pool.threads and all(t.startswith(THREAD_PREFIX) for t in pool.threads)
        assert llm.memory_usage()["weights"]["host"] == nbytes
    else:
        assert not llm.worker.memory.wait_host_copy(0)
    assert greedy(llm) == a_out
    assert pool.sizes == ([s for _, s in chunk_spans(nbytes)] if ahead else [])  # nothing allocated on demand yet

    arena_bytes = _weights(llm).clone()
    for _ in range(3):
        _sleep_wake_keeps_weights(llm, a_out)
    # Each chunk allocated once, in order: the buffer is kept across sleeps.
    assert pool.sizes == [s for _, s in chunk_spans(nbytes)] and len(pool.sizes) >= MIN_CHUNKS
    if not ahead:
        assert set(pool.threads) == {threading.current_thread().name}  # by the sleep itself
    assert torch.equal(torch.cat([pool.chunk(i) for i in range(len(pool.sizes))]), arena_bytes)
    assert llm.memory_usage()["weights"]["host"] == nbytes
    phases = llm.worker.memory.last_wake_ms  # the wake's diagnostic (rl-cycle reports it)
    assert set(phases) == {"map_weights_ms", "queue_copy_ms", "map_kv_cache_ms", "wait_copy_ms"}
    assert all(v >= 0 for v in phases.values())
    llm.sleep(1)
    llm.wake_up(["kv_cache"])
    assert set(llm.worker.memory.last_wake_ms) == {"map_kv_cache_ms"}
    llm.wake_up()
    llm.shutdown()
    assert llm.memory_usage()["weights"]["host"] == 0


def test_sleep_during_the_background_allocation_waits_only_for_the_chunks_it_needs(host_device, a_dir, a_out):
    """The allocation of chunk HOLD is held: a sleep copies chunks 0..HOLD-1 meanwhile,
    releases nothing, and finishes once chunk HOLD (and the rest) exist."""
    pool = HostPool(hold_at=HOLD)
    llm = make_llm(a_dir, device=host_device(pool), enable_sleep_mode=True)
    assert greedy(llm) == a_out  # generation does not wait for the host copy
    assert pool.holding.wait(TIMEOUT)
    before, arena_bytes = snapshot(llm), _weights(llm).clone()
    spans = chunk_spans(arena_bytes.numel())
    errors: list[BaseException] = []

    def sleep() -> None:
        try:
            llm.sleep(1)
        except BaseException as e:  # noqa: BLE001 - checked by the test
            errors.append(e)

    sleeper = threading.Thread(target=sleep)
    sleeper.start()
    _until(lambda: all(torch.equal(pool.chunk(i), arena_bytes[o : o + s]) for i, (o, s) in enumerate(spans[:HOLD])),
           f"the sleep to copy chunks 0..{HOLD - 1}")
    assert sleeper.is_alive() and len(pool.chunks) == HOLD  # waiting for the held chunk
    assert all(a.is_mapped for a in llm.worker.memory.arenas.values())  # nothing released yet
    pool.release.set()
    sleeper.join(TIMEOUT)
    assert not sleeper.is_alive() and not errors
    assert llm.is_sleeping and llm.memory_usage()["weights"] == {"device": 0, "host": arena_bytes.numel()}
    hog = _hog(llm)
    llm.wake_up()
    del hog
    assert changed(before, snapshot(llm)) == set()
    assert greedy(llm) == a_out


@pytest.mark.parametrize("fails", ["once", "always"])
def test_a_failed_background_allocation_surfaces_on_sleep(fails, host_device, a_dir, a_out):
    """The allocator fails at chunk HOLD in the background: the next sleep(1) raises
    HostMemoryError and changes nothing (requests in flight keep their KV, the prefix cache
    stays); the sleep after it allocates the rest itself, or raises again."""
    pool = HostPool(fail=(lambda i: i == HOLD) if fails == "once" else (lambda i: i >= HOLD))
    llm = make_llm(a_dir, device=host_device(pool), enable_sleep_mode=True)
    assert not llm.worker.memory.wait_host_copy(TIMEOUT)  # failed
    usage = llm.memory_usage()
    assert usage["weights"]["host"] == sum(pool.sizes[:HOLD])

    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in make_llm(a_dir).generate(PROMPTS, params)]
    llm.generate([PROMPTS[0]], GREEDY)  # a cached prefix
    for i, p in enumerate(PROMPTS):
        llm.add_request(p, params, request_id=f"r{i}")
    done = {}
    for _ in range(3):
        done.update((o.request_id, o) for o in llm.step() if o.finished)
    preemptions = llm.worker.stats().num_preemptions

    with pytest.raises(HostMemoryError, match=f"chunk {HOLD} of ") as info:
        llm.sleep(1)
    assert isinstance(info.value.__cause__, MemoryError) and "test host has no room" in str(info.value.__cause__)
    assert not llm.is_sleeping and llm.memory_usage() == usage
    while llm.has_unfinished_requests():
        done.update((o.request_id, o) for o in llm.step() if o.finished)
    assert llm.worker.stats().num_preemptions == preemptions  # in-flight requests kept their KV
    assert [done[f"r{i}"].outputs[0].token_ids for i in range(len(PROMPTS))] == ref
    assert llm.generate([PROMPTS[0]], GREEDY)[0].num_cached_tokens > 0  # the prefix cache stayed
    llm.worker.check_invariants()

    if fails == "once":  # the next sleep allocates the rest in its own thread
        _sleep_wake_keeps_weights(llm, a_out)
        assert pool.threads[HOLD + 1 :] == [threading.current_thread().name] * (len(pool.threads) - HOLD - 1)
        assert llm.memory_usage()["weights"]["host"] == llm.worker.memory.arenas["weights"].nbytes
    else:
        with pytest.raises(HostMemoryError, match=f"chunk {HOLD} of "):
            llm.sleep(1)
        assert not llm.is_sleeping and llm.memory_usage() == usage
        assert_same_greedy(greedy(llm), a_out)  # over cached prefixes: logprobs within tolerance


def test_shutdown_while_allocating_stops_and_frees(host_device, a_dir):
    pool = HostPool(hold_at=HOLD)
    threads_before = _host_threads()
    llm = make_llm(a_dir, device=host_device(pool), enable_sleep_mode=True)
    assert pool.holding.wait(TIMEOUT)
    closer = threading.Thread(target=llm.shutdown)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # waits for the chunk being allocated, not longer
    pool.release.set()
    closer.join(TIMEOUT)
    assert not closer.is_alive()
    assert _host_threads() <= threads_before  # joined
    assert len(pool.sizes) == HOLD + 1  # no chunk after the one in progress
    gc.collect()
    assert all(ref() is None for ref in pool.chunks)  # every chunk freed, the last one included
    assert llm.memory_usage() == {"weights": {"device": 0, "host": 0}, "kv_cache": {"device": 0, "host": 0}}


def test_an_engine_dropped_while_allocating_stops_its_thread(host_device, a_dir):
    """No shutdown: the engine is collected (the thread holds only the buffer) and the thread
    stops after the chunk in progress instead of allocating the rest for nobody."""
    pool = HostPool(hold_at=HOLD)
    threads_before = _host_threads()
    llm = make_llm(a_dir, device=host_device(pool), enable_sleep_mode=True)
    assert len(chunk_spans(llm.worker.memory.arenas["weights"].nbytes)) > HOLD + 1
    assert pool.holding.wait(TIMEOUT)
    engine = weakref.ref(llm)
    del llm
    gc.collect()
    assert engine() is None
    pool.release.set()
    _until(lambda: _host_threads() <= threads_before, "the background thread to stop")
    assert len(pool.sizes) == HOLD + 1  # no chunk after the one in progress
    gc.collect()
    assert all(ref() is None for ref in pool.chunks)


def test_sleep_2_stops_the_background_allocation_without_waiting(host_device, a_dir, sd_a, a_out):
    pool = HostPool(hold_at=HOLD)
    threads_before = _host_threads()
    llm = make_llm(a_dir, device=host_device(pool), enable_sleep_mode=True)
    assert pool.holding.wait(TIMEOUT)
    llm.sleep(2)  # returns while the held chunk is still being allocated
    assert llm.memory_usage() == {"weights": {"device": 0, "host": 0}, "kv_cache": {"device": 0, "host": 0}}
    pool.release.set()
    _until(lambda: _host_threads() <= threads_before, "the background thread to stop")
    assert len(pool.sizes) == HOLD + 1
    llm.wake_up()
    llm.update_weights(sd_a)
    assert greedy(llm) == a_out
    _sleep_wake_keeps_weights(llm, a_out)  # a new copy, allocated by this sleep
    assert set(pool.threads[HOLD + 1 :]) == {threading.current_thread().name}


def test_enable_sleep_mode_allocates_on_the_cpu_platform(a_dir, a_out):
    """The built-in platforms' allocate_host, with and without enable_sleep_mode."""
    eager, lazy = make_llm(a_dir, enable_sleep_mode=True), make_llm(a_dir)
    nbytes = eager.worker.memory.arenas["weights"].nbytes
    assert eager.worker.memory.wait_host_copy(TIMEOUT)
    assert eager.memory_usage()["weights"]["host"] == nbytes and lazy.memory_usage()["weights"]["host"] == 0
    for llm in (eager, lazy):
        _sleep_wake_keeps_weights(llm, a_out)
        assert llm.memory_usage()["weights"]["host"] == nbytes
