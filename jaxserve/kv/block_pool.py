"""A persistent pool of KV blocks: reference counts, free blocks, prefix cache, LRU eviction.

Every operation returns a new ``BlockPool`` and leaves the old one valid and unchanged. The
per-block tables are numpy arrays (and one dict) shared by all versions through rerooting
(``jaxserve.kv.versioned``), so an operation costs O(blocks it touches), vectorized, whatever the
pool size; only switching to an older version pays for the edits in between.

A block is in exactly one of four places:
* allocated: ``refcount(b) >= 1`` (it is in that many block tables);
* evictable: refcount 0 but still holding a cached full block; evictable blocks form a doubly
  linked list in the order they were freed (least recently freed first);
* stacked: freed and holding nothing useful, reused first (LIFO);
* fresh: never used (``b >= next_fresh``).
Allocation takes stacked, then fresh, then the least recently freed evictable blocks, whose cache
entries are dropped at that moment (so a freed block is visible to nobody until it is rewritten).

Cache keys are exact block identities (``jaxserve.kv.prefix_hash``: bytes spelling out a block's
tokens and its parent's digest), looked up by equality, so a hit is never a mere hash match.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from jaxserve.kv.versioned import MISSING, Versioned

# Slots of the shared tables (Versioned._data), each indexed by block id unless noted.
RC = 0  # int64 reference count
CACHED = 1  # bool: the block holds a prefix-cache entry
HASH = 2  # dict: block -> its cache key, for every cached block
NEXT = 3  # int64: LRU successor (meaningful for evictable blocks; NONE at the tail)
PREV = 4  # int64: LRU predecessor (NONE at the head)
STACK = 5  # int64: the free stack's storage; entries [0, num_stacked) are live, the top last
BY_HASH = 6  # dict: cache key -> block, for every cached block
NONE = -1


class OutOfBlocksError(RuntimeError):
    """``allocate`` was asked for more blocks than are free (callers check ``can_allocate`` first)."""


def _coalesce(blocks: Iterable[int]) -> tuple[list[int], np.ndarray, Any]:
    """``(blocks as a list, unique blocks as an array, multiplicity)``. The unique blocks keep
    the order of each one's last occurrence (when a block's count drops to 0 in a ``free``); the
    multiplicity is 1 when nothing repeats (the usual case: one block table)."""
    lst = blocks if type(blocks) is list else list(blocks)
    if len(set(lst)) == len(lst):
        return lst, np.fromiter(lst, np.int64, len(lst)), 1
    counts: dict[int, int] = {}
    for b in lst:
        counts[b] = counts.get(b, 0) + 1
    last = {b: i for i, b in enumerate(lst)}
    uniq = sorted(counts, key=last.__getitem__)
    return lst, np.array(uniq, np.int64), np.array([counts[b] for b in uniq], np.int64)


def _first_in(lst: list[int], bad: np.ndarray) -> int:
    bad_set = set(bad.tolist())
    return next(b for b in lst if b in bad_set)


class BlockPool(Versioned):
    __slots__ = (
        "enable_caching",
        "lru_head",  # least recently freed evictable block, or NONE
        "lru_tail",  # most recently freed evictable block, or NONE
        "next_fresh",  # blocks >= next_fresh were never used
        "num_blocks",
        "num_evictable",
        "num_stacked",
        "num_used",  # allocated blocks
    )

    def __init__(self, num_blocks: int, enable_caching: bool = False):
        n = num_blocks
        # np.zeros is lazily backed by the OS, so a big pool costs nothing until blocks are used.
        self._data = [np.zeros(n, np.int64), np.zeros(n, bool), {},
                      np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64), {}]
        self._link = None
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.next_fresh = 0
        self.num_stacked = 0
        self.num_used = 0
        self.num_evictable = 0
        self.lru_head = NONE
        self.lru_tail = NONE

    def _with(self, **changes) -> BlockPool:
        """A new version object with this one's small fields and ``changes`` (no tables yet)."""
        new = object.__new__(BlockPool)
        new.num_blocks = self.num_blocks
        new.enable_caching = self.enable_caching
        new.next_fresh = self.next_fresh
        new.num_stacked = self.num_stacked
        new.num_used = self.num_used
        new.num_evictable = self.num_evictable
        new.lru_head = self.lru_head
        new.lru_tail = self.lru_tail
        for name, value in changes.items():
            setattr(new, name, value)
        return new

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation may take now (stacked + fresh + evictable)."""
        return self.num_stacked + (self.num_blocks - self.next_fresh) + self.num_evictable

    def _valid(self, b) -> bool:
        return 0 <= b < self.num_blocks

    def refcount(self, block: int) -> int:
        return int(self._read()[RC][block]) if self._valid(block) else 0

    def is_evictable(self, block: int) -> bool:
        data = self._read()
        return self._valid(block) and data[RC].item(block) == 0 and data[CACHED].item(block)

    def can_allocate(self, n: int, reserve: int = 0) -> bool:
        """Whether ``n`` blocks can be allocated leaving at least ``reserve`` free. No side effects."""
        return n + reserve <= self.num_free

    def match_prefix(self, hashes: Sequence[Hashable]) -> tuple[int, ...]:
        """Blocks caching the longest cached prefix of the key chain ``hashes`` (keys compared by
        equality: with prefix_hash keys, each hit holds exactly the asked-for block content)."""
        if not self.enable_caching:
            return ()
        out = []
        get = self._read()[BY_HASH].get
        for h in hashes:
            b = get(h)
            if b is None:
                break
            out.append(b)
        return tuple(out)

    def num_evictable_in(self, blocks: Iterable[int]) -> int:
        """How many of ``blocks`` are evictable (acquiring them lowers ``num_free`` by this much)."""
        lst = [b for b in blocks if 0 <= b < self.num_blocks]
        if not lst:
            return 0
        arr = np.fromiter(lst, np.int64, len(lst))
        data = self._read()
        return np.count_nonzero(data[CACHED][arr] & (data[RC][arr] == 0))

    # -- inspection (tests, debugging): read-only views of this version -------------------------
    @property
    def refcounts(self) -> Mapping[int, int]:
        """block -> refcount, for allocated blocks."""
        return _View(self, lambda d, b: int(d[RC][b]) if self._valid(b) and d[RC][b] > 0 else None,
                     lambda d: np.flatnonzero(d[RC]).tolist(), lambda d: self.num_used)

    @property
    def cached(self) -> Mapping[Hashable, int]:
        """key -> block, for cached blocks."""
        return _View(self, lambda d, h: d[BY_HASH].get(h), lambda d: list(d[BY_HASH]), lambda d: len(d[BY_HASH]))

    @property
    def block_hash(self) -> Mapping[int, Hashable]:
        """block -> key, for cached blocks (in block order)."""
        return _View(self, lambda d, b: d[HASH].get(b), lambda d: sorted(d[HASH]), lambda d: len(d[HASH]))

    @property
    def evictable(self) -> tuple[int, ...]:
        """Evictable blocks, least recently freed (next evicted) first. O(evictable)."""
        nxt, out, b = self._read()[NEXT], [], self.lru_head
        for _ in range(self.num_evictable):
            out.append(b)
            b = nxt.item(b)
        return tuple(out)

    @property
    def stacked(self) -> tuple[int, ...]:
        """Stacked blocks, the next one reused first."""
        return tuple(self._read()[STACK][: self.num_stacked][::-1].tolist())

    # -- updates -------------------------------------------------------------------------------
    def allocate(self, n: int) -> tuple[BlockPool, tuple[int, ...]]:
        """Takes ``n`` free blocks (refcount 1 each). Raises OutOfBlocksError, changing nothing."""
        if n < 0:
            raise ValueError(f"allocate: n must be >= 0, got {n}")
        if n > self.num_free:
            raise OutOfBlocksError(f"asked for {n} blocks, {self.num_free} free")
        if n == 0:
            return self, ()
        edits, changes = [], {}
        out = self._take(self._read(), n, edits, changes)
        edits.append((RC, out, 1))
        return self._derive(edits, self._with(**changes)), tuple(out.tolist())

    def peek(self, n: int) -> tuple[int, ...]:
        """The blocks ``allocate(n)`` would return, in that order, without taking them (n <= num_free)."""
        if not 0 <= n <= self.num_free:
            raise OutOfBlocksError(f"peek: asked for {n} blocks, {self.num_free} free")
        return tuple(self._take(self._read(), n, [], {}).tolist()) if n else ()

    def _take(self, data: list, n: int, edits: list, changes: dict) -> np.ndarray:
        """The ``n`` blocks an allocation takes, in order: stacked (the top first), then fresh, then
        the least recently freed evictable ones; adds the edits and field changes that take them
        (all but their refcounts)."""
        parts = []
        top = self.num_stacked
        k = min(n, top)
        if k:
            parts.append(data[STACK][top - k : top][::-1])
        take = min(n - k, self.num_blocks - self.next_fresh)
        if take:
            parts.append(np.arange(self.next_fresh, self.next_fresh + take, dtype=np.int64))
        changes.update(num_stacked=top - k, next_fresh=self.next_fresh + take, num_used=self.num_used + n)
        if n - k - take:
            parts.append(self._evict(data, n - k - take, edits, changes))
        return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()  # never a view of a table

    def _evict(self, data: list, m: int, edits: list, changes: dict) -> np.ndarray:
        """The ``m`` least recently freed evictable blocks; adds the edits that unlink them and
        drop their cache entries."""
        nxt = data[NEXT]
        out, b = [], self.lru_head
        for _ in range(m):
            out.append(b)
            b = nxt.item(b)
        changes.update(lru_head=b, num_evictable=self.num_evictable - m)
        if b == NONE:
            changes["lru_tail"] = NONE
        else:
            edits.append((PREV, b, NONE))
        keys = data[HASH]
        edits.append((BY_HASH, [keys[b] for b in out], MISSING))
        edits.append((HASH, out, MISSING))
        blocks = np.array(out, np.int64)
        edits.append((CACHED, blocks, False))
        return blocks

    def acquire(self, blocks: Iterable[int]) -> BlockPool:
        """Adds one reference to each block (allocated or evictable), e.g. on a prefix-cache hit."""
        lst, arr, inc = _coalesce(blocks)
        if not lst:
            return self
        data = self._read()
        bad = arr[(arr < 0) | (arr >= self.num_blocks)]
        if not len(bad):
            old = data[RC][arr]
            revive = arr[old == 0]
            bad = revive[~data[CACHED][revive]]
        if len(bad):
            raise ValueError(f"acquire: block {_first_in(lst, bad)} is neither allocated nor cached")
        edits = [(RC, arr, old + inc, old)]
        changes = {"num_used": self.num_used + len(revive)}
        if len(revive):
            self._unlink(data, revive.tolist(), edits, changes)
        return self._derive(edits, self._with(**changes))

    def _unlink(self, data: list, blocks: list[int], edits: list, changes: dict) -> None:
        """Adds the edits that take evictable ``blocks`` out of the LRU list."""
        nxt, prv = data[NEXT], data[PREV]
        new_next: dict[int, int] = {}  # links changed so far in this operation
        new_prev: dict[int, int] = {}
        head, tail = self.lru_head, self.lru_tail
        for b in blocks:
            p = new_prev[b] if b in new_prev else prv.item(b)
            n = new_next[b] if b in new_next else nxt.item(b)
            if p == NONE:
                head = n
            else:
                new_next[p] = n
            if n == NONE:
                tail = p
            else:
                new_prev[n] = p
        for slot, links in ((NEXT, new_next), (PREV, new_prev)):
            if links:
                edits.append((slot, np.array(list(links), np.int64), np.array(list(links.values()), np.int64)))
        changes.update(lru_head=head, lru_tail=tail, num_evictable=self.num_evictable - len(blocks))

    def free(self, blocks: Iterable[int]) -> BlockPool:
        """Drops one reference from each block; a block reaching 0 becomes evictable if it caches a
        full block, else reusable at once. Free a table tail-first so its tail is evicted first.
        Raises ValueError, changing nothing, if a block would drop below 0 references."""
        lst, arr, dec = _coalesce(blocks)
        if not lst:
            return self
        if min(lst) < 0 or max(lst) >= self.num_blocks:
            raise ValueError(f"free: block {next(b for b in lst if not 0 <= b < self.num_blocks)} is not allocated")
        data = self._read()
        old = data[RC][arr]
        if type(dec) is int:  # (the usual case: no repeats) a block at refcount 0 is not allocated
            if np.count_nonzero(old) < len(old):
                raise ValueError(f"free: block {_first_in(lst, arr[old == 0])} is not allocated")
            new = old - 1
        else:
            new = old - dec
            if new.min() < 0:
                raise ValueError(f"free: block {_first_in(lst, arr[new < 0])} is not allocated")
        zero = arr if not np.count_nonzero(new) else arr[new == 0]  # (usually every block: no sharing)
        edits = [(RC, arr, new, old)]
        if not self.enable_caching:  # (then no block is ever cached)
            stack_up, lru_up = zero, zero[:0]
        else:
            is_cached = data[CACHED][zero]
            num_cached = np.count_nonzero(is_cached)
            if num_cached == len(zero):  # (all but a table's partial last block)
                stack_up, lru_up = zero[:0], zero
            elif not num_cached:
                stack_up, lru_up = zero, zero[:0]
            else:
                stack_up, lru_up = zero[~is_cached], zero[is_cached]
        top = self.num_stacked
        changes = {"num_used": self.num_used - len(zero), "num_stacked": top + len(stack_up)}
        if len(stack_up):
            edits.append((STACK, slice(top, top + len(stack_up)), stack_up))
        if len(lru_up):
            self._append_lru(lru_up, edits, changes)
        return self._derive(edits, self._with(**changes))

    def _append_lru(self, blocks: np.ndarray, edits: list, changes: dict) -> None:
        """Adds the edits that append ``blocks``, in order, at the LRU list's tail."""
        k, tail = len(blocks), self.lru_tail
        chain = np.empty(k + 2, np.int64)  # tail, *blocks, NONE: each cell's successor follows it
        chain[0], chain[1 : k + 1], chain[k + 1] = tail, blocks, NONE
        if tail == NONE:
            edits.append((NEXT, blocks, chain[2:]))
            changes["lru_head"] = int(blocks[0])
        else:
            edits.append((NEXT, chain[: k + 1], chain[1:]))
        edits.append((PREV, blocks, chain[:k]))
        changes.update(lru_tail=int(blocks[-1]), num_evictable=self.num_evictable + k)

    def register(self, blocks: Sequence[int], hashes: Sequence[Hashable]) -> BlockPool:
        """Caches full, allocated, uncached ``blocks`` under the keys ``hashes``. A key already
        cached (the same content computed twice) keeps its first block."""
        if not self.enable_caching:
            return self
        data = self._read()
        cached = data[BY_HASH]
        # The first block of a hash computed twice wins: build the map from the back.
        fresh = dict(zip(reversed(hashes), reversed(blocks))) if len(hashes) > 1 else dict(zip(hashes, blocks))
        if not cached.keys().isdisjoint(fresh):  # (C-speed test; content cached already is rare)
            fresh = {h: b for h, b in fresh.items() if h not in cached}
        if not fresh:
            return self
        new_blocks = list(fresh.values())
        if len(set(new_blocks)) != len(new_blocks) or min(new_blocks) < 0 or max(new_blocks) >= self.num_blocks:
            raise ValueError("register: a block is listed twice, or is no block of this pool")
        arr = np.fromiter(new_blocks, np.int64, len(new_blocks))
        if np.count_nonzero(data[CACHED][arr]):  # (count_nonzero: cheaper than .any())
            raise ValueError("register: a block is already cached")
        if np.count_nonzero(data[RC][arr]) < len(arr):  # refcounts are >= 0: some is 0
            raise ValueError("register: only allocated blocks can be cached")
        new_keys = list(fresh)
        edits = [(BY_HASH, new_keys, new_blocks), (HASH, new_blocks, new_keys), (CACHED, arr, True)]
        return self._derive(edits, self._with())

    def uncache(self, block: int) -> BlockPool:
        """Drops an allocated block's cache entry so its owner may write into it."""
        data = self._read()
        if not self._valid(block) or data[RC][block] < 1:
            raise ValueError(f"uncache: block {block} is not allocated")
        if not data[CACHED][block]:
            return self
        edits = [(BY_HASH, [data[HASH][block]], MISSING), (HASH, [block], MISSING), (CACHED, block, False)]
        return self._derive(edits, self._with())

    def check(self) -> None:
        """Verifies the pool's internal invariants (O(num_blocks): tests and debugging)."""
        rc, cached, hashes, nxt, prv, stack, by_hash = self._read()
        n = self.num_blocks
        assert (rc >= 0).all(), "refcount below 0"
        allocated = np.flatnonzero(rc).tolist()
        assert len(allocated) == self.num_used, "num_used is wrong"
        lru, b, prev = [], self.lru_head, NONE
        while b != NONE and len(lru) <= n:
            assert prv[b] == prev, f"LRU list broken at block {b}"
            lru.append(b)
            prev, b = b, int(nxt[b])
        assert prev == self.lru_tail and len(lru) == self.num_evictable, "LRU list broken"
        stacked = stack[: self.num_stacked].tolist()
        places = [set(allocated), set(lru), set(stacked), set(range(self.next_fresh, n))]
        assert len(lru) == len(places[1]) and len(stacked) == len(places[2]), "a block is listed twice"
        assert sum(map(len, places)) == n, "a block is lost or in two places"
        assert set().union(*places) == set(range(n)), "unknown block id"
        assert set(lru) == set(np.flatnonzero((rc == 0) & cached).tolist()), "evictable != cached with refcount 0"
        assert int(cached.sum()) == len(by_hash) == len(hashes), "cache tables disagree"
        for h, b in by_hash.items():
            assert cached[b] and b in hashes and hashes[b] == h, f"cache tables disagree on block {b}"
            assert b < self.next_fresh and b not in places[2], f"cached block {b} is free"


class _View(Mapping):
    """A read-only mapping over one pool version's tables (``get(data, key)`` is None if absent)."""

    __slots__ = ("_get", "_keys", "_len", "_pool")

    def __init__(self, pool: BlockPool, get: Callable, keys: Callable, size: Callable):
        self._pool, self._get, self._keys, self._len = pool, get, keys, size

    def __getitem__(self, key):
        value = self._get(self._pool._read(), key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key) -> bool:
        return self._get(self._pool._read(), key) is not None

    def __iter__(self) -> Iterator:
        return iter(self._keys(self._pool._read()))

    def __len__(self) -> int:
        return self._len(self._pool._read())
