"""BlockPool: the physical KV blocks, their ref counts, hashes and the LRU free queue."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


# Root of every hash chain. Not None: before Python 3.12 hash(None) is address-based.
ROOT_HASH = 0


def hash_block(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """Chained hash of one full block: equal hashes mean equal prefixes (verified on a hit)."""
    # Python's hash of ints and tuples is not randomised per process, so every rank of a
    # tensor-parallel group computes the same hashes.
    return hash((parent_hash, token_ids))


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    # A hit is verified by its tokens and its parent (the cached block before it in the
    # chain), so a hash collision can never mix prefixes.
    token_ids: tuple[int, ...] | None = None
    parent: KVBlock | None = None
    # Cached blocks only: the experts [position][moe_layer][k] this block's KV was computed
    # with, when a request that recorded routes computed it (None: not known). Host side,
    # dropped with the hash.
    routes: list[list[list[int]]] | None = None


class BlockPool:
    """Owns every KV block.

    Invariant: each block is in exactly one state, so free + cached + used == num_blocks:
    - used: ref_cnt > 0 (held by at least one request)
    - cached: ref_cnt == 0 with a hash (in the free queue, reusable on a prefix hit)
    - free: ref_cnt == 0 without a hash (in the free queue)
    The free queue is in eviction order: allocation takes from the front, freeing appends.
    """

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, KVBlock] = {}
        self.num_hit_queries = 0
        self.num_hit_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free or evictable cached)."""
        return len(self._free_queue)

    def get_cached_block(
        self, block_hash: int, token_ids: tuple[int, ...], parent: KVBlock | None
    ) -> KVBlock | None:
        block = self._cached.get(block_hash)
        if block is None or block.token_ids != token_ids or block.parent is not parent:
            return None
        return block

    def get_new_blocks(self, num: int) -> list[KVBlock]:
        if num > len(self._free_queue):
            raise RuntimeError(f"asked for {num} blocks, {len(self._free_queue)} free")
        out = []
        for _ in range(num):
            _, block = self._free_queue.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on prefix-cache hits, pulling evictable ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free_queue[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: list[KVBlock]) -> None:
        """Drop one reference from each; callers pass tail blocks first so they evict first."""
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} freed twice"
            if block.ref_cnt == 0:
                self._free_queue[block.block_id] = block

    def cache_block(
        self, block: KVBlock, block_hash: int, token_ids: tuple[int, ...], parent: KVBlock | None
    ) -> KVBlock | None:
        """Register ``block``; returns the block now cached for this prefix (``block``, or an
        equal one cached before), or None on a hash collision with a different prefix (or
        with caching off)."""
        if not self.enable_caching:
            return None
        if block.block_hash is not None:
            return block
        existing = self._cached.get(block_hash)
        if existing is not None:
            # The same prefix cached elsewhere: this copy stays private. A different prefix
            # under the same hash: a collision, nothing is registered.
            same = existing.token_ids == token_ids and existing.parent is parent
            return existing if same else None
        block.block_hash = block_hash
        block.token_ids = token_ids
        block.parent = parent
        self._cached[block_hash] = block
        return block

    def reset_prefix_cache(self) -> None:
        """Forget every hash: no later request can hit KV computed before this call."""
        for block in self._cached.values():
            block.block_hash = block.token_ids = block.parent = block.routes = None
        self._cached.clear()

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = block.token_ids = block.parent = block.routes = None

    def counts(self) -> tuple[int, int, int]:
        """(free, cached, used) block counts."""
        used = sum(1 for b in self.blocks if b.ref_cnt > 0)
        cached = sum(1 for b in self._free_queue.values() if b.block_hash is not None)
        return len(self._free_queue) - cached, cached, used

    def check_invariants(self) -> None:
        free, cached, used = self.counts()
        assert free + cached + used == self.num_blocks, (free, cached, used, self.num_blocks)
        for b in self.blocks:
            assert (b.ref_cnt == 0) == (b.block_id in self._free_queue), b
            if b.block_hash is not None:
                assert self._cached.get(b.block_hash) is b, b
            else:
                assert b.routes is None, b
        assert all(b.block_hash == h for h, b in self._cached.items())
