"""Paged KV cache bookkeeping: a block pool with reference counts and prefix hashes.

The tensors live in the model runner ([num_blocks, block_size, kv_heads, head_dim] per layer
for K and V); this module only decides which block ids each request owns.

Invariants (checked by `check_invariants`, exercised by property tests):
  * every block is in exactly one state: fresh (never handed out: its pages may be uncommitted),
    free (ref 0, not cached), cached (ref 0, holds the K/V of a known full block, evictable) or
    used (ref > 0);
  * fresh + free + cached + used == total;
  * a block with ref > 0 is never on the evictable list, so it is never handed out twice.

Where the cache tensors commit pages as they are first written (CPU), fresh blocks cost no
memory until used, so which block to hand out decides the process's RSS: a freed block first,
then a fresh one while the blocks ever used stay under the peak in use plus `retain_blocks`,
else the least recently used cached block. RSS then follows the load (with a bounded prefix
cache on top), not the budget.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from kvserve.engine.request import Request


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None  # set once the block is full and registered

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


def hash_block(parent: bytes | None, token_ids: list[int], extra: bytes = b"") -> bytes:
    """Chained, collision-resistant identity of a full block: sha256(parent, tokens, extra)."""
    h = hashlib.sha256(parent or b"\0" * 32)
    h.update(array("q", token_ids).tobytes())
    h.update(extra)
    return h.digest()


class BlockPool:
    """Hands out block ids: freed blocks first, then fresh ones (lowest id first) or the least
    recently used cached block, evicting its hash (see the module docstring for the choice)."""

    def __init__(self, num_blocks: int, enable_caching: bool = True, retain_blocks: int | None = None) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # blocks handed out before whose ref count is 0: plain free ones at the front, cached ones
        # behind them from least to most recently used
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.next_fresh = 0  # blocks next_fresh.. have never been handed out
        self.retain_blocks = retain_blocks  # None: fresh blocks before any cached one (no limit)
        self.peak_used = 0
        self.cached: dict[bytes, KVCacheBlock] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now (fresh, free or cached-and-evictable)."""
        return len(self.evictable) + self.num_blocks - self.next_fresh

    @property
    def num_cached_blocks(self) -> int:
        return sum(1 for i in self.evictable if self.blocks[i].block_hash is not None)

    @property
    def num_used_blocks(self) -> int:
        return self.next_fresh - len(self.evictable)

    @property
    def num_touched_blocks(self) -> int:
        """Blocks ever handed out: on a lazily committed cache, the ones whose pages are resident."""
        return self.next_fresh

    def _take(self) -> int:
        front = next(iter(self.evictable), None)
        if front is not None and self.blocks[front].block_hash is None:
            return self.evictable.popitem(last=False)[0]
        if self.next_fresh < self.num_blocks and (
                front is None or self.retain_blocks is None or self.next_fresh < self.peak_used + self.retain_blocks):
            self.next_fresh += 1
            return self.next_fresh - 1
        return self.evictable.popitem(last=False)[0]

    def allocate(self, n: int) -> list[KVCacheBlock]:
        if n > self.num_free_blocks:
            raise RuntimeError(f"asked for {n} blocks, {self.num_free_blocks} free")  # callers check first
        out = []
        for _ in range(n):
            block = self.blocks[self._take()]
            if block.block_hash is not None:
                del self.cached[block.block_hash]
                block.block_hash = None
                self.num_evictions += 1
            block.ref_cnt = 1
            out.append(block)
        self.peak_used = max(self.peak_used, self.num_used_blocks)
        return out

    def lookup(self, block_hash: bytes) -> KVCacheBlock | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def touch(self, blocks: list[KVCacheBlock]) -> None:
        """Take a reference on cached blocks (a prefix hit)."""
        for b in blocks:
            if b.ref_cnt == 0:
                del self.evictable[b.block_id]
            b.ref_cnt += 1

    def free(self, blocks: list[KVCacheBlock]) -> None:
        """Drop one reference each; pass blocks tail first so a sequence's last blocks are evicted first."""
        for b in blocks:
            assert b.ref_cnt > 0, f"double free of {b}"
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                if b.block_hash is None:
                    self.evictable[b.block_id] = None
                    self.evictable.move_to_end(b.block_id, last=False)  # plain free blocks go first
                else:
                    self.evictable[b.block_id] = None  # cached blocks: most recently used at the back

    def register(self, block: KVCacheBlock, block_hash: bytes) -> None:
        """Mark a full block as holding the K/V identified by `block_hash`."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return  # an identical block exists already; this one stays private
        block.block_hash = block_hash
        self.cached[block_hash] = block

    def check_invariants(self) -> None:
        used = [b for b in self.blocks if b.ref_cnt > 0]
        assert all(b.ref_cnt >= 0 for b in self.blocks)
        assert all(self.blocks[i].ref_cnt == 0 for i in self.evictable)
        assert all(i < self.next_fresh for i in self.evictable)
        assert all(b.ref_cnt == 0 and b.block_hash is None for b in self.blocks[self.next_fresh:])
        assert len(used) + len(self.evictable) == self.next_fresh
        if self.retain_blocks is not None:  # committed blocks: the peak in use plus the cache's allowance
            assert self.next_fresh <= self.peak_used + self.retain_blocks
        assert all(self.cached[b.block_hash] is b for b in self.blocks if b.block_hash is not None)
        assert len(self.cached) == sum(1 for b in self.blocks if b.block_hash is not None)


class KVCacheManager:
    """Block tables of requests; prefix lookup; slot allocation for the tokens of one step."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_host_blocks: int = 0, retain_blocks: int | None = None) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching, retain_blocks)
        # host-side pool for swap preemption (pinned CPU memory on GPU); same block size
        self.host_pool = BlockPool(num_host_blocks, enable_caching=False) if num_host_blocks > 0 else None
        self.swapped: dict[str, list[KVCacheBlock]] = {}
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self.req_hashes: dict[str, list[bytes]] = {}
        self.req_registered: dict[str, int] = {}  # how many leading blocks already carry their hash
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found cached

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def usage(self) -> float:
        return self.pool.num_used_blocks / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def internal_waste(self, num_cached_tokens: dict[str, int]) -> float:
        """Fraction of the slots in used blocks that hold no token (given each request's tokens in cache)."""
        filled: dict[int, int] = {}
        for rid, blocks in self.req_blocks.items():
            n = num_cached_tokens.get(rid, 0)
            for i, b in enumerate(blocks):
                f = min(max(n - i * self.block_size, 0), self.block_size)
                if f > filled.get(b.block_id, -1):
                    filled[b.block_id] = f
        slots = len(filled) * self.block_size
        return 1.0 - sum(filled.values()) / slots if slots else 0.0

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]

    def _hashes(self, req: Request, upto_tokens: int) -> list[bytes]:
        """Chained hashes of the request's full blocks covering its first `upto_tokens` tokens."""
        hashes = self.req_hashes.setdefault(req.request_id, [])
        bs = self.block_size
        for i in range(len(hashes), upto_tokens // bs):
            hashes.append(hash_block(hashes[-1] if hashes else None, req.all_token_ids[i * bs : (i + 1) * bs]))
        return hashes

    def get_computed_blocks(self, req: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of a new request, leaving at least one token to compute for logits."""
        if not self.pool.enable_caching or req.params.prompt_logprobs is not None:
            return [], 0  # prompt logprobs need the logits of every prompt position
        hashes = self._hashes(req, req.num_tokens - 1)
        hits = []
        for h in hashes:
            b = self.pool.lookup(h)
            if b is None:
                break
            hits.append(b)
        self.prefix_queries += req.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self, req: Request, num_new_tokens: int, computed_blocks: list[KVCacheBlock] | None = None,
        num_lookahead_tokens: int = 0,
    ) -> bool:
        """Make room for `num_new_tokens` more tokens of `req` (after its computed ones); False if full.

        `num_lookahead_tokens`: slots for speculative draft tokens after those; their blocks are not
        registered in the prefix cache (the draft may be rejected: see `rollback_slots`)."""
        blocks = self.req_blocks.setdefault(req.request_id, [])
        computed_blocks = computed_blocks or []
        num_computed = req.num_computed_tokens + len(computed_blocks) * self.block_size
        need = self.blocks_needed(num_computed + num_new_tokens + num_lookahead_tokens) - len(blocks) \
            - len(computed_blocks)
        # touching evictable cached blocks removes them from the free list: count them too
        reclaim = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if need + reclaim > self.pool.num_free_blocks:
            if not blocks:
                del self.req_blocks[req.request_id]
            return False
        if computed_blocks:
            self.pool.touch(computed_blocks)
            blocks.extend(computed_blocks)
        if need > 0:
            blocks.extend(self.pool.allocate(need))
        # Blocks that are full once this step's tokens are written carry the hash of their tokens.
        self._register_full(req, blocks, num_computed + num_new_tokens)
        return True

    def _register_full(self, req: Request, blocks: list[KVCacheBlock], num_tokens: int) -> None:
        """Register the hashes of the blocks that the request's first `num_tokens` tokens fill."""
        if not self.pool.enable_caching:
            return
        num_full = num_tokens // self.block_size
        done = self.req_registered.get(req.request_id, 0)
        if num_full > done:
            hashes = self._hashes(req, num_full * self.block_size)
            for i in range(done, num_full):
                self.pool.register(blocks[i], hashes[i])
            self.req_registered[req.request_id] = num_full

    def rollback_slots(self, req: Request) -> None:
        """After a speculative step: free the blocks past the request's tokens (they held only
        rejected draft slots) and register the blocks its accepted tokens filled.

        Rejected slots inside the kept blocks are simply overwritten by later steps; the hashes were
        never registered for them (`allocate_slots` registers scheduled, not lookahead, tokens)."""
        blocks = self.req_blocks.get(req.request_id)
        if not blocks:
            return
        keep = self.blocks_needed(req.num_tokens)
        if len(blocks) > keep:
            tail = blocks[keep:]
            del blocks[keep:]
            assert all(b.block_hash is None for b in tail), "a block past the request's tokens was registered"
            self.pool.free(list(reversed(tail)))
        self._register_full(req, blocks, req.num_computed_tokens)

    def swap_out(self, req: Request) -> list[tuple[int, int]] | None:
        """Move a request's blocks to the host pool; (device, host) id pairs to copy, or None if it is full."""
        blocks = self.req_blocks.get(req.request_id, [])
        if self.host_pool is None or not blocks or len(blocks) > self.host_pool.num_free_blocks:
            return None
        host = self.host_pool.allocate(len(blocks))
        mapping = [(d.block_id, h.block_id) for d, h in zip(blocks, host)]
        self.free(req)
        self.swapped[req.request_id] = host
        return mapping

    def can_swap_in(self, req: Request, num_new_tokens: int) -> bool:
        return self.blocks_needed(req.num_computed_tokens + num_new_tokens) <= self.pool.num_free_blocks

    def swap_in(self, req: Request) -> list[tuple[int, int]]:
        """Bring a swapped request's blocks back; (host, device) id pairs to copy. Check can_swap_in first."""
        host = self.swapped.pop(req.request_id)
        device = self.pool.allocate(len(host))
        self.req_blocks[req.request_id] = device
        self.host_pool.free(list(reversed(host)))  # type: ignore[union-attr]
        if self.pool.enable_caching:  # the copied-back full blocks are valid cache entries again
            num_full = min(req.num_computed_tokens // self.block_size, len(device))
            hashes = self._hashes(req, num_full * self.block_size)
            for i in range(num_full):
                self.pool.register(device[i], hashes[i])
            self.req_registered[req.request_id] = num_full
        return [(h.block_id, d.block_id) for h, d in zip(host, device)]

    def free(self, req: Request) -> None:
        host = self.swapped.pop(req.request_id, None)
        if host is not None:
            self.host_pool.free(list(reversed(host)))  # type: ignore[union-attr]
        blocks = self.req_blocks.pop(req.request_id, [])
        self.pool.free(list(reversed(blocks)))
        self.req_hashes.pop(req.request_id, None)
        self.req_registered.pop(req.request_id, None)

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        if self.host_pool is not None:
            self.host_pool.check_invariants()
            owned = [b.block_id for blocks in self.swapped.values() for b in blocks]
            assert len(owned) == len(set(owned)) == self.host_pool.num_used_blocks
        assert not (set(self.swapped) & set(self.req_blocks)), "a request is both swapped and resident"
        refs: dict[int, int] = {}
        for blocks in self.req_blocks.values():
            for b in blocks:
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
        for b in self.pool.blocks:
            assert refs.get(b.block_id, 0) == b.ref_cnt, f"{b} owned {refs.get(b.block_id, 0)} times"
