"""KVCacheManager: which blocks each request holds, prefix-cache lookups and allocation."""

from __future__ import annotations

from rollout.engine.block_pool import ROOT_HASH, BlockPool, KVBlock, hash_block
from rollout.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Maps requests to blocks of a BlockPool; knows nothing about the model or the device."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self._req_blocks: dict[str, list[KVBlock]] = {}
        # How many leading blocks of each request are registered in the prefix cache.
        self._num_cached_blocks: dict[str, int] = {}
        # Requests holding KV from before a prefix-cache reset never register blocks again:
        # their later blocks chain onto KV computed with old weights.
        self._stale: set[str] = set()
        # The cached block of each request's last registered prefix (the chain's tail).
        self._chain_tail: dict[str, KVBlock] = {}
        # Requests recording routes: how many leading blocks were offered their routes.
        self._num_routed_blocks: dict[str, int] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def block_ids(self, req_id: str, start: int = 0) -> list[int]:
        """The request's block ids from block index ``start`` on."""
        return [b.block_id for b in self._req_blocks.get(req_id, ())[start:]]

    def get_computed_blocks(self, req: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of full blocks; at least the last token is always recomputed
        because its logits are needed (a scoring request recomputes every position scored).
        A request recording routes stops at the first block without stored routes (it
        recomputes from there, so every route it returns is of the KV it used)."""
        if not (self.enable_caching and req.uses_prefix_cache):
            return [], 0
        self._update_hashes(req)
        max_blocks = req.max_cache_hit_tokens // self.block_size
        tokens = req.all_token_ids
        hits: list[KVBlock] = []
        for i in range(min(max_blocks, len(req.block_hashes))):
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            block = self.pool.get_cached_block(req.block_hashes[i], chunk, hits[-1] if hits else None)
            if block is None or (req.records_routes and block.routes is None):
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self, req: Request, num_new_tokens: int, computed_blocks: list[KVBlock] = ()
    ) -> bool:
        """Make room for ``num_new_tokens`` more tokens after ``req.num_computed_tokens`` plus
        the hit blocks. Returns False, changing nothing, when the pool is short."""
        held = self._req_blocks.get(req.req_id, [])
        if not computed_blocks and req.num_computed_tokens + num_new_tokens <= len(held) * self.block_size:
            return True  # the common decode step: its slot is in a block it holds
        num_computed = req.num_computed_tokens + len(computed_blocks) * self.block_size
        num_required = cdiv(num_computed + num_new_tokens, self.block_size)
        num_new_blocks = num_required - len(held) - len(computed_blocks)
        # Hits sitting in the free queue stop being allocatable once touched.
        num_evictable_hits = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + num_evictable_hits > self.pool.num_free_blocks:
            return False
        self.pool.touch(list(computed_blocks))
        if not held and self.enable_caching and req.uses_prefix_cache:
            self.pool.num_hit_queries += 1  # one lookup per admission that got its blocks
        blocks = self._req_blocks.setdefault(req.req_id, [])
        blocks.extend(computed_blocks)
        if computed_blocks:
            self._num_cached_blocks[req.req_id] = len(blocks)
            self._chain_tail[req.req_id] = computed_blocks[-1]
            self.pool.num_hit_blocks += len(computed_blocks)
            if req.records_routes:  # the hit positions' routes are the stored ones
                hit = [r for b in computed_blocks for r in b.routes][: req.num_prompt_tokens]
                req.prompt_routed_experts[: len(hit)] = hit
                self._num_routed_blocks[req.req_id] = len(blocks)
        if num_new_blocks > 0:
            blocks.extend(self.pool.get_new_blocks(num_new_blocks))
        return True

    def cache_blocks(self, req: Request, num_tokens: int) -> None:
        """Register the full blocks among the first ``num_tokens`` tokens in the prefix cache.

        Called at schedule time for tokens computed in this step: within a layer every K/V
        write of a step happens before any attention read, so a request scheduled later in
        the same step may already hit these blocks.
        """
        if not (self.enable_caching and req.uses_prefix_cache) or req.req_id in self._stale:
            return
        num_full = num_tokens // self.block_size
        start = self._num_cached_blocks.get(req.req_id, 0)
        if num_full <= start:
            return
        self._update_hashes(req, num_full)
        blocks = self._req_blocks[req.req_id]
        tokens = req.all_token_ids
        bs = self.block_size
        # The chain continues from the block cached for the previous prefix, which may be
        # another request's equal block; it must still be cached under that prefix's hash.
        parent = self._chain_tail.get(req.req_id)
        if start > 0 and (parent is None or parent.block_hash != req.block_hashes[start - 1]):
            self._stale.add(req.req_id)
            return
        for i in range(start, num_full):
            chunk = tuple(tokens[i * bs : (i + 1) * bs])
            parent = self.pool.cache_block(blocks[i], req.block_hashes[i], chunk, parent)
            if parent is None:  # a hash collision: stop registering this request's chain
                self._stale.add(req.req_id)
                return
        self._chain_tail[req.req_id] = parent
        self._num_cached_blocks[req.req_id] = num_full

    def store_routes(self, req: Request) -> None:
        """Keep the routes of the request's full blocks whose KV it computed and registered
        (called after its routes come back), so a later request recording routes may hit them."""
        blocks = self._req_blocks.get(req.req_id)
        if not blocks:
            return
        bs = self.block_size
        start = self._num_routed_blocks.get(req.req_id, 0)
        end = min(req.num_routed_positions // bs, len(blocks), len(req.block_hashes))
        for i in range(start, end):
            # Registered under this request's prefix: its own block (a hit came with routes;
            # an equal prefix cached elsewhere left this copy unregistered).
            b = blocks[i]
            if b.block_hash is not None and b.block_hash == req.block_hashes[i] and b.routes is None:
                b.routes = req.routes_at(i * bs, (i + 1) * bs)
        self._num_routed_blocks[req.req_id] = max(start, end)

    def free(self, req: Request) -> None:
        blocks = self._req_blocks.pop(req.req_id, [])
        self._num_routed_blocks.pop(req.req_id, None)
        self._num_cached_blocks.pop(req.req_id, None)
        self._stale.discard(req.req_id)
        self._chain_tail.pop(req.req_id, None)
        # Tail blocks are the least likely to be shared, so they go first in eviction order.
        self.pool.free_blocks(blocks[::-1])

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
        self._stale.update(self._req_blocks)

    def _update_hashes(self, req: Request, upto: int | None = None) -> None:
        num_full = req.num_tokens // self.block_size if upto is None else upto
        tokens = req.all_token_ids
        hashes = req.block_hashes
        for i in range(len(hashes), num_full):
            parent = hashes[-1] if hashes else ROOT_HASH
            hashes.append(hash_block(parent, tuple(tokens[i * self.block_size : (i + 1) * self.block_size])))
