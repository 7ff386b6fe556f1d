"""BlockPool and KVCacheManager with no model: ref counts, LRU order, prefix hits, invariants."""

from __future__ import annotations

import subprocess
import sys

import pytest

import rollout.engine.block_pool as block_pool_module
import rollout.engine.kv_cache as kv_cache_module
from rollout.engine.block_pool import ROOT_HASH, BlockPool, hash_block
from rollout.engine.kv_cache import KVCacheManager
from tests.helpers.sched import admit, make_request


def _free_order(pool: BlockPool) -> list[int]:
    """Block ids in eviction order, read by allocating everything (then handed back)."""
    blocks = pool.get_new_blocks(pool.num_free_blocks)
    ids = [b.block_id for b in blocks]
    pool.free_blocks(blocks)  # back in the same order; hashes are gone (evicted)
    return ids


def _snapshot(kv: KVCacheManager) -> tuple:
    pool = kv.pool
    return (
        pool.counts(), [b.ref_cnt for b in pool.blocks], [b.block_hash for b in pool.blocks],
        list(pool._free_queue), dict(kv._req_blocks), dict(kv._num_cached_blocks),
    )


# ---- BlockPool -------------------------------------------------------------------------
def test_new_pool_is_all_free():
    pool = BlockPool(5, enable_caching=True)
    assert pool.counts() == (5, 0, 0)
    assert pool.num_free_blocks == 5
    pool.check_invariants()
    with pytest.raises(ValueError):
        BlockPool(0, enable_caching=True)


def test_allocation_takes_from_front_in_id_order():
    pool = BlockPool(6, enable_caching=True)
    a = pool.get_new_blocks(2)
    b = pool.get_new_blocks(3)
    assert [x.block_id for x in a] == [0, 1]
    assert [x.block_id for x in b] == [2, 3, 4]
    assert all(x.ref_cnt == 1 for x in a + b)
    assert pool.counts() == (1, 0, 5)
    pool.check_invariants()


def test_freed_blocks_are_appended_in_the_order_given():
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.get_new_blocks(3)  # 0, 1, 2; free queue [3]
    pool.free_blocks([blocks[2], blocks[0], blocks[1]])
    assert _free_order(pool) == [3, 2, 0, 1]


def test_asking_for_too_many_blocks_raises_and_changes_nothing():
    pool = BlockPool(3, enable_caching=True)
    pool.get_new_blocks(2)
    with pytest.raises(RuntimeError):
        pool.get_new_blocks(2)
    assert pool.counts() == (1, 0, 2)
    pool.check_invariants()


def test_ref_counts_touch_and_free():
    pool = BlockPool(3, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.touch([block])  # a second request shares it
    assert block.ref_cnt == 2
    pool.free_blocks([block])
    assert block.ref_cnt == 1 and pool.counts() == (2, 0, 1)  # still held: not in the free queue
    pool.free_blocks([block])
    assert block.ref_cnt == 0 and pool.counts() == (3, 0, 0)
    pool.check_invariants()
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free_blocks([block])


def test_touch_pulls_a_cached_free_block_out_of_the_free_queue():
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.get_new_blocks(2)
    pool.cache_block(blocks[0], 111, (1, 2), None)
    pool.free_blocks(blocks)  # free queue [2, 3, 0, 1]
    assert pool.counts() == (3, 1, 0)
    pool.touch([blocks[0]])  # a prefix hit
    assert blocks[0].ref_cnt == 1 and pool.num_free_blocks == 3
    assert pool.counts() == (3, 0, 1)
    pool.check_invariants()
    # Released again, it moves to the tail: the most recently used block is evicted last.
    pool.free_blocks([blocks[0]])
    assert _free_order(pool) == [2, 3, 1, 0]


def test_cache_block_registers_the_first_copy_only():
    pool = BlockPool(3, enable_caching=True)
    a, b, c = pool.get_new_blocks(3)
    pool.cache_block(a, 42, (1, 2), None)
    assert (a.block_hash, a.token_ids) == (42, (1, 2))
    assert pool.get_cached_block(42, (1, 2), None) is a
    pool.cache_block(b, 42, (1, 2), None)  # same prefix computed twice: the copy stays private
    assert b.block_hash is None and pool.get_cached_block(42, (1, 2), None) is a
    pool.cache_block(a, 43, (3, 4), None)  # already registered: unchanged
    assert a.block_hash == 42 and pool.get_cached_block(43, (3, 4), None) is None
    pool.check_invariants()


def test_cache_block_is_a_no_op_without_caching():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.get_new_blocks(1)
    pool.cache_block(a, 42, (1, 2), None)
    assert a.block_hash is None and pool.get_cached_block(42, (1, 2), None) is None


def test_hash_hit_requires_equal_tokens():
    pool = BlockPool(2, enable_caching=True)
    (a,) = pool.get_new_blocks(1)
    forged = hash_block(ROOT_HASH, (1, 2, 3))  # the hash of (1, 2, 3) on a block holding (9, 9, 9)
    pool.cache_block(a, forged, (9, 9, 9), None)
    assert pool.get_cached_block(forged, (1, 2, 3), None) is None
    assert pool.get_cached_block(forged, (9, 9, 9), None) is a


def test_eviction_drops_the_hash():
    pool = BlockPool(2, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, 42, (1,), None)
    pool.free_blocks([a, b])  # free queue [a, b]: a is evicted first
    assert pool.counts() == (1, 1, 0)
    (got,) = pool.get_new_blocks(1)
    assert got is a and a.block_hash is None and a.token_ids is None
    assert pool.get_cached_block(42, (1,), None) is None
    assert pool.counts() == (1, 0, 1)
    pool.check_invariants()


def test_reset_prefix_cache_forgets_free_and_used_blocks():
    pool = BlockPool(3, enable_caching=True)
    a, b, c = pool.get_new_blocks(3)
    pool.cache_block(a, 1, (1,), None)
    pool.cache_block(b, 2, (2,), None)
    pool.free_blocks([a])
    assert pool.counts() == (0, 1, 2)
    pool.reset_prefix_cache()
    assert pool.counts() == (1, 0, 2)
    assert a.block_hash is None and b.block_hash is None
    assert pool.get_cached_block(1, (1,), None) is None and pool.get_cached_block(2, (2,), None) is None
    assert b.ref_cnt == 1  # still held by its request
    pool.check_invariants()


def test_check_invariants_catches_corruption():
    pool = BlockPool(3, enable_caching=True)
    blocks = pool.get_new_blocks(2)
    pool.check_invariants()
    blocks[0].ref_cnt = 0  # a used block lost its reference but never reached the free queue
    with pytest.raises(AssertionError):
        pool.check_invariants()
    blocks[0].ref_cnt = 1
    blocks[1].block_hash = 5  # a hash the cache does not know (reported as a KeyError)
    with pytest.raises((AssertionError, KeyError)):
        pool.check_invariants()


# ---- KVCacheManager --------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompt_len, expected_hit",
    [(1, 0), (3, 0), (4, 0), (5, 4), (8, 4), (9, 8), (12, 8), (13, 12)],
)
def test_hit_keeps_at_least_the_last_token_to_recompute(prompt_len, expected_hit):
    kv = KVCacheManager(num_blocks=16, block_size=4)
    tokens = list(range(100, 100 + prompt_len))
    a = make_request("a", tokens)
    assert admit(kv, a) == 0
    b = make_request("b", tokens)
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == expected_hit == len(hits) * 4
    assert [blk.block_id for blk in hits] == kv.block_ids("a")[: len(hits)]
    assert num_hit < b.num_tokens


def test_hit_covers_only_the_common_prefix_of_full_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make_request("a", list(range(16)))
    admit(kv, a)
    b = make_request("b", list(range(10)) + [99] * 6)  # diverges inside block 2
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8 and [x.block_id for x in hits] == kv.block_ids("a")[:2]
    # Equal tokens after a different prefix are a different chain: no hit.
    c = make_request("c", [99] * 4 + list(range(4, 16)))
    assert kv.get_computed_blocks(c) == ([], 0)


def test_hit_chain_stops_at_the_first_miss():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(100, 113))  # 3 full blocks + 1 token
    a = make_request("a", tokens)
    admit(kv, a)
    b0, b1, b2, _ = kv.pool.blocks[:4]
    assert kv.block_ids("a") == [0, 1, 2, 3]
    kv.free(a)  # free queue [4, 5, 6, 7, 3, 2, 1, 0]
    kv.pool.touch([b0, b2])
    kv.pool.free_blocks([b0, b2])  # [4, 5, 6, 7, 3, 1, 0, 2]
    held = kv.pool.get_new_blocks(6)  # evicts 4, 5, 6, 7, 3 and 1
    assert b1.block_hash is None and b2.block_hash is not None
    b = make_request("b", tokens)
    hits, num_hit = kv.get_computed_blocks(b)
    assert hits == [b0] and num_hit == 4
    # Block 2 is still cached, but it is not reachable past the missing block 1.
    assert kv.pool.get_cached_block(b.block_hashes[2], tuple(tokens[8:12]), b2.parent) is b2
    kv.pool.free_blocks(held)
    kv.pool.check_invariants()


def test_free_releases_tail_blocks_first():
    kv = KVCacheManager(num_blocks=6, block_size=2)
    a = make_request("a", 6)  # blocks 0, 1, 2
    admit(kv, a)
    kv.free(a)
    assert kv.block_ids("a") == []
    assert _free_order(kv.pool) == [3, 4, 5, 2, 1, 0]


def test_shared_blocks_are_ref_counted_across_requests():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(100, 110))
    a, b = make_request("a", tokens), make_request("b", tokens)
    admit(kv, a)
    assert admit(kv, b) == 8
    shared = kv.pool.blocks[kv.block_ids("a")[0]]
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2] and shared.ref_cnt == 2
    assert kv.pool.counts() == (4, 0, 4)  # a: 3 blocks, b: 2 shared + 1 own
    kv.free(a)
    assert shared.ref_cnt == 1 and kv.pool.counts() == (5, 0, 3)  # a's partial last block is free
    kv.free(b)
    assert kv.pool.counts() == (6, 2, 0)
    kv.pool.check_invariants()


def test_allocate_slots_short_returns_false_and_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = make_request("a", 9)  # 3 blocks, 2 full ones cached
    admit(kv, a)
    kv.free(a)
    assert kv.pool.counts() == (2, 2, 0)
    # 8 hit tokens (2 evictable blocks) + 9 new tokens need 5 blocks: one too many.
    b = make_request("b", a.prompt_token_ids[:8] + [7] * 9)
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8
    before = _snapshot(kv)
    assert not kv.allocate_slots(b, b.num_tokens - num_hit, hits)
    assert _snapshot(kv) == before and kv.block_ids("b") == []
    # Exactly enough (the 2 evictable hits count against the free blocks): it fits.
    c = make_request("c", a.prompt_token_ids[:8] + [7] * 8)
    hits, num_hit = kv.get_computed_blocks(c)
    assert kv.allocate_slots(c, c.num_tokens - num_hit, hits)
    assert kv.block_ids("c")[:2] == [0, 1] and kv.pool.counts() == (0, 0, 4)
    kv.pool.check_invariants()


def test_allocate_slots_short_for_a_running_request_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    a, b = make_request("a", 4), make_request("b", 2)
    admit(kv, a)
    admit(kv, b)
    a.output_token_ids.append(5)  # a needs a third block for its 5th token; none is free
    before = _snapshot(kv)
    assert not kv.allocate_slots(a, 1)
    assert _snapshot(kv) == before
    kv.free(b)
    assert kv.allocate_slots(a, 1) and len(kv.block_ids("a")) == 3


def test_stale_requests_never_register_blocks_after_a_reset():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    tokens = list(range(100, 113))
    a = make_request("a", tokens)
    hits, _ = kv.get_computed_blocks(a)
    assert kv.allocate_slots(a, 6, hits)  # a chunk of 6: block 0 is full
    a.num_computed_tokens = 6
    kv.cache_blocks(a, 6)
    assert kv.pool.counts()[1] == 0 and kv.pool.blocks[0].block_hash is not None
    kv.reset_prefix_cache()
    assert kv.pool.blocks[0].block_hash is None
    # The rest of a's prompt chains onto KV from before the reset: never registered.
    assert kv.allocate_slots(a, 7)
    a.num_computed_tokens = 13
    kv.cache_blocks(a, 13)
    assert all(b.block_hash is None for b in kv.pool.blocks)
    assert kv.get_computed_blocks(make_request("b", tokens)) == ([], 0)
    # A fresh request after the reset registers normally, and so does a itself once it
    # has freed its blocks and recomputed.
    kv.free(a)
    c = make_request("c", tokens)
    admit(kv, c)
    assert kv.get_computed_blocks(make_request("d", tokens))[1] == 12
    kv.free(c)
    kv.reset_prefix_cache()
    a.num_computed_tokens = 0
    admit(kv, a)
    assert kv.get_computed_blocks(make_request("e", tokens))[1] == 12
    kv.pool.check_invariants()


def test_no_hits_and_no_registration_without_caching():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    tokens = list(range(100, 110))
    admit(kv, make_request("a", tokens))
    assert kv.pool.counts() == (5, 0, 3)
    assert kv.get_computed_blocks(make_request("b", tokens)) == ([], 0)


def test_prompt_logprobs_requests_neither_hit_nor_register():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    tokens = list(range(100, 110))
    p = make_request("p", tokens, prompt_logprobs=1)
    admit(kv, p)
    assert kv.pool.counts()[1:] == (0, 3) and all(b.block_hash is None for b in kv.pool.blocks)
    admit(kv, make_request("a", tokens))
    assert kv.get_computed_blocks(make_request("q", tokens, prompt_logprobs=0)) == ([], 0)
    assert kv.get_computed_blocks(make_request("b", tokens))[1] == 8


def test_hash_collision_never_mixes_prefixes(monkeypatch):
    # A collision-prone hash (the sum of the block's tokens) makes collisions easy to build;
    # with the real 64-bit hash they are rare but possible, and the docstring promises that
    # a collision can never mix prefixes.
    monkeypatch.setattr(kv_cache_module, "hash_block", lambda parent, tokens: hash((parent, sum(tokens))))
    kv = KVCacheManager(num_blocks=16, block_size=2)
    admit(kv, make_request("x", [2, 1, 7, 7, 0]))  # caches (2, 1) under h0 = H(root, 3)
    r = make_request("r", [1, 2, 5, 6, 9])
    assert admit(kv, r) == 0  # (1, 2) collides with (2, 1): the token check rejects it
    # r's block 1 (5, 6), computed after (1, 2), is registered under H(h0, 11).
    s = make_request("s", [2, 1, 5, 6, 9])
    hits, _ = kv.get_computed_blocks(s)
    # s may reuse x's block (2, 1), but not r's (5, 6): that KV attended to (1, 2).
    assert [b.block_id for b in hits] == kv.block_ids("x")[:1]


# Loads block_pool.py alone (stdlib only), so each process starts in milliseconds.
_HASH_SNIPPET = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("block_pool", sys.argv[1])
module = sys.modules["block_pool"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
root = module.ROOT_HASH
print(module.hash_block(root, (1, 2, 3)), module.hash_block(module.hash_block(root, (1,)), (2,)))
"""


def test_block_hashes_are_equal_across_processes():
    path = block_pool_module.__file__
    values = {
        subprocess.run([sys.executable, "-c", _HASH_SNIPPET, path], capture_output=True, text=True, check=True).stdout
        for _ in range(3)
    }
    assert len(values) == 1, values
