"""A persistent pool of KV blocks: reference counts, free blocks, prefix cache, LRU eviction.

Every operation returns a new ``BlockPool`` and leaves the old one valid and unchanged; the cost is
proportional to the blocks touched, not to the pool size (see ``jaxserve.persistent``).

A block is in exactly one of four places:
* allocated: ``refcounts[b] >= 1`` (it is in that many block tables);
* evictable: refcount 0 but still holding a cached full block (``evictable[b]`` is its LRU stamp);
* stacked: freed and holding nothing useful (``free_stack``), reused first;
* fresh: never used (``b >= next_fresh``).
Allocation takes stacked, then fresh, then the least recently freed evictable block, whose cache
entry is dropped at that moment (so a freed block is visible to nobody until it is rewritten).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import immutables

from jaxserve.persistent import EMPTY_MAP, Cons, Queue


class OutOfBlocksError(RuntimeError):
    """``allocate`` was asked for more blocks than are free (callers check ``can_allocate`` first)."""


class BlockPool:
    __slots__ = (
        "num_blocks",
        "enable_caching",
        "refcounts",
        "next_fresh",
        "free_stack",
        "num_stacked",
        "cached",
        "block_hash",
        "evictable",
        "lru",
        "clock",
    )

    def __init__(
        self,
        num_blocks: int,
        enable_caching: bool = False,
        refcounts: immutables.Map = EMPTY_MAP,
        next_fresh: int = 0,
        free_stack: Cons = None,
        num_stacked: int = 0,
        cached: immutables.Map = EMPTY_MAP,
        block_hash: immutables.Map = EMPTY_MAP,
        evictable: immutables.Map = EMPTY_MAP,
        lru: Queue = Queue(),
        clock: int = 0,
    ):
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.refcounts = refcounts  # block -> refcount >= 1
        self.next_fresh = next_fresh
        self.free_stack = free_stack
        self.num_stacked = num_stacked
        self.cached = cached  # block hash -> block
        self.block_hash = block_hash  # block -> block hash (cached blocks only)
        self.evictable = evictable  # block -> LRU stamp (cached blocks with refcount 0)
        self.lru = lru  # (stamp, block), oldest first; entries whose stamp is stale are skipped
        self.clock = clock

    def _with(self, **changes) -> "BlockPool":
        new = object.__new__(BlockPool)
        for name in BlockPool.__slots__:
            setattr(new, name, changes.get(name, getattr(self, name)))
        return new

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation may take now (stacked + fresh + evictable)."""
        return self.num_stacked + (self.num_blocks - self.next_fresh) + len(self.evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one block table."""
        return len(self.refcounts)

    def refcount(self, block: int) -> int:
        return self.refcounts.get(block, 0)

    def can_allocate(self, n: int, reserve: int = 0) -> bool:
        """Whether ``n`` blocks can be allocated leaving at least ``reserve`` free. No side effects."""
        return n + reserve <= self.num_free

    def match_prefix(self, hashes: Sequence[int]) -> tuple[int, ...]:
        """Blocks caching the longest cached prefix of the hash chain ``hashes``."""
        if not self.enable_caching:
            return ()
        out = []
        cached = self.cached
        for h in hashes:
            b = cached.get(h)
            if b is None:
                break
            out.append(b)
        return tuple(out)

    def num_evictable_in(self, blocks: Iterable[int]) -> int:
        """How many of ``blocks`` are evictable (acquiring them lowers ``num_free`` by this much)."""
        ev = self.evictable
        return sum(1 for b in blocks if b in ev)

    # -- updates -------------------------------------------------------------------------------
    def allocate(self, n: int) -> tuple["BlockPool", tuple[int, ...]]:
        """Takes ``n`` free blocks (refcount 1 each). Raises OutOfBlocksError, changing nothing."""
        if n < 0:
            raise ValueError(f"allocate: n must be >= 0, got {n}")
        if n > self.num_free:
            raise OutOfBlocksError(f"asked for {n} blocks, {self.num_free} free")
        if n == 0:
            return self, ()
        out: list[int] = []
        stack, num_stacked = self.free_stack, self.num_stacked
        while stack is not None and len(out) < n:
            out.append(stack[0])
            stack = stack[1]
            num_stacked -= 1
        take = min(n - len(out), self.num_blocks - self.next_fresh)
        out.extend(range(self.next_fresh, self.next_fresh + take))
        changes = dict(free_stack=stack, num_stacked=num_stacked, next_fresh=self.next_fresh + take)
        if len(out) < n:
            changes.update(self._evict(n - len(out), out))
        with self.refcounts.mutate() as rc:
            for b in out:
                rc[b] = 1
            changes["refcounts"] = rc.finish()
        return self._with(**changes), tuple(out)

    def _evict(self, n: int, out: list[int]) -> dict:
        """Pops the ``n`` least recently freed evictable blocks into ``out``, dropping their cache entries."""
        lru, evictable, cached, block_hash = self.lru, self.evictable, self.cached, self.block_hash
        with evictable.mutate() as ev, cached.mutate() as ca, block_hash.mutate() as bh:
            while n:
                stamp, b = lru.peek()
                lru = lru.pop()
                if ev.get(b) != stamp:
                    continue  # touched or re-freed since this entry was queued
                del ev[b]
                del ca[bh[b]]
                del bh[b]
                out.append(b)
                n -= 1
            return dict(lru=lru, evictable=ev.finish(), cached=ca.finish(), block_hash=bh.finish())

    def acquire(self, blocks: Iterable[int]) -> "BlockPool":
        """Adds one reference to each block (allocated or evictable), e.g. on a prefix-cache hit."""
        evictable = self.evictable
        with self.refcounts.mutate() as rc, evictable.mutate() as ev:
            for b in blocks:
                count = rc.get(b, 0)
                if count == 0:
                    if b not in ev:
                        raise ValueError(f"acquire: block {b} is neither allocated nor cached")
                    del ev[b]
                rc[b] = count + 1
            return self._with(refcounts=rc.finish(), evictable=ev.finish())

    def free(self, blocks: Iterable[int]) -> "BlockPool":
        """Drops one reference from each block; a block reaching 0 becomes evictable if it caches a
        full block, else reusable at once. Free a table tail-first so its tail is evicted first."""
        stack, num_stacked, clock = self.free_stack, self.num_stacked, self.clock
        block_hash = self.block_hash
        newly_evictable = []
        with self.refcounts.mutate() as rc, self.evictable.mutate() as ev:
            for b in blocks:
                count = rc.pop(b, 0)
                if count != 1:
                    if count <= 0:
                        raise ValueError(f"free: block {b} is not allocated")
                    rc[b] = count - 1
                    continue
                if b in block_hash:
                    ev[b] = clock
                    newly_evictable.append((clock, b))
                    clock += 1
                else:
                    stack = (b, stack)
                    num_stacked += 1
            evictable = ev.finish()
            lru = self.lru.extend(newly_evictable) if newly_evictable else self.lru
            pool = self._with(
                refcounts=rc.finish(),
                evictable=evictable,
                free_stack=stack,
                num_stacked=num_stacked,
                clock=clock,
                lru=lru,
            )
        if len(lru) > 2 * len(evictable) + 64:
            pool = pool._with(lru=_compact_lru(evictable))
        return pool

    def register(self, blocks: Sequence[int], hashes: Sequence[int]) -> "BlockPool":
        """Caches full, allocated, uncached ``blocks`` under ``hashes``. A hash already cached (the
        same content computed twice) keeps its first block."""
        if not self.enable_caching:
            return self
        cached, block_hash = self.cached, self.block_hash
        fresh: dict[int, int] = {}
        for h, b in zip(hashes, blocks):
            if h not in cached and h not in fresh:
                fresh[h] = b
        if not fresh:
            return self
        pairs = fresh.items()
        block_hash = block_hash.update((b, h) for h, b in pairs)
        if len(block_hash) != len(self.block_hash) + len(pairs):
            raise ValueError("register: a block is already cached, or listed twice")
        return self._with(cached=cached.update(pairs), block_hash=block_hash)

    def uncache(self, block: int) -> "BlockPool":
        """Drops an allocated block's cache entry so its owner may write into it."""
        if block not in self.refcounts:
            raise ValueError(f"uncache: block {block} is not allocated")
        h = self.block_hash.get(block)
        if h is None:
            return self
        return self._with(cached=self.cached.delete(h), block_hash=self.block_hash.delete(block))

    def check(self) -> None:
        """Verifies the pool's internal invariants (O(num_blocks): tests and debugging)."""
        stacked = []
        node = self.free_stack
        while node is not None:
            stacked.append(node[0])
            node = node[1]
        places = [set(self.refcounts.keys()), set(self.evictable.keys()), set(stacked),
                  set(range(self.next_fresh, self.num_blocks))]
        assert len(stacked) == len(places[2]) == self.num_stacked, "free stack corrupt"
        assert sum(map(len, places)) == self.num_blocks, "a block is lost or in two places"
        assert set().union(*places) == set(range(self.num_blocks)), "unknown block id"
        assert all(c >= 1 for c in self.refcounts.values()), "refcount below 1"
        assert set(self.evictable.keys()) <= set(self.block_hash.keys()), "evictable block not cached"
        assert len(self.cached) == len(self.block_hash), "cache maps disagree"
        for b, h in self.block_hash.items():
            assert self.cached.get(h) == b, f"cache maps disagree on block {b}"
            assert b < self.next_fresh and b not in places[2], f"cached block {b} is free"


def _compact_lru(evictable: immutables.Map) -> Queue:
    q = Queue()
    for stamp, b in sorted((s, b) for b, s in evictable.items()):
        q = q.push((stamp, b))
    return q
