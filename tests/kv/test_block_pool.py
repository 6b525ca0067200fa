"""BlockPool (refcounts, check-then-commit, reuse order, prefix cache, LRU eviction, persistence),
prefix hashing (chain_hashes, prompt_block_hashes) and KVConfig / KVState."""

import random

import pytest
from hypothesis import given, settings, strategies as st

from jaxserve.kv import BlockPool, KVConfig, KVState, OutOfBlocksError, chain_hashes, extend_chain, prompt_block_hashes
from jaxserve.request import Request, SamplingParams

SP = SamplingParams(1)


def snap(pool):
    """Everything observable about a pool, as plain values."""
    return dict(
        refcounts=dict(pool.refcounts),
        evictable=pool.evictable,  # in LRU order
        cached=dict(pool.cached),
        block_hash=dict(pool.block_hash),
        stack=pool.stacked,
        next_fresh=pool.next_fresh,
        num_free=pool.num_free,
        num_used=pool.num_used,
    )


# -- basic allocate / free / refcounts --------------------------------------------------------


def test_fresh_pool():
    p = BlockPool(5)
    p.check()
    assert p.num_free == 5 and p.num_used == 0
    assert all(p.refcount(b) == 0 for b in range(5))
    assert p.can_allocate(5) and not p.can_allocate(6)
    assert p.can_allocate(3, reserve=2) and not p.can_allocate(3, reserve=3)


def test_allocate_and_free_refcounts():
    p0 = BlockPool(6)
    p1, a = p0.allocate(3)
    p1.check()
    assert a == (0, 1, 2)
    assert [p1.refcount(b) for b in range(6)] == [1, 1, 1, 0, 0, 0]
    assert p1.num_free == 3 and p1.num_used == 3
    p2 = p1.acquire([1, 1, 2])
    p2.check()
    assert [p2.refcount(b) for b in range(3)] == [1, 3, 2]
    assert p2.num_free == 3 and p2.num_used == 3
    p3 = p2.free([1, 2])
    p3.check()
    assert [p3.refcount(b) for b in range(3)] == [1, 2, 1] and p3.num_free == 3
    p4 = p3.free([0, 1, 1, 2])
    p4.check()
    assert p4.num_used == 0 and p4.num_free == 6
    # old versions are unchanged
    assert [p1.refcount(b) for b in range(3)] == [1, 1, 1]
    assert [p2.refcount(b) for b in range(3)] == [1, 3, 2]
    assert p0.num_free == 6 and p0.num_used == 0


def test_allocate_zero():
    p = BlockPool(2)
    q, blocks = p.allocate(0)
    assert blocks == () and snap(q) == snap(p)
    full, _ = p.allocate(2)
    q, blocks = full.allocate(0)
    assert blocks == () and q.num_free == 0


def test_allocate_too_many_raises_and_changes_nothing():
    p, _ = BlockPool(4, enable_caching=True).allocate(3)
    p = p.register([0], [100]).free([0])  # 0 evictable; 1, 2 used; 3 fresh
    before = snap(p)
    assert p.num_free == 2
    with pytest.raises(OutOfBlocksError):
        p.allocate(3)
    assert snap(p) == before
    p.check()
    # a successful allocation afterwards behaves as if the failure never happened
    q, blocks = p.allocate(2)
    assert blocks == (3, 0)
    q.check()


def test_can_allocate_has_no_side_effects():
    p, _ = BlockPool(4, enable_caching=True).allocate(4)
    p = p.register([0, 1], [10, 11]).free([1, 0, 2])
    before = snap(p)
    for n in range(6):
        for reserve in range(3):
            assert p.can_allocate(n, reserve) == (n + reserve <= 3)
    assert p.num_evictable_in([0, 1, 2, 3]) == 2
    assert p.match_prefix([10, 11]) == (0, 1)
    assert snap(p) == before


def test_free_errors_change_nothing():
    p, _ = BlockPool(4).allocate(2)
    before = snap(p)
    with pytest.raises(ValueError, match="block 3"):
        p.free([3])  # fresh
    with pytest.raises(ValueError, match="block 1"):
        p.free([0, 1, 1])  # 1 freed twice in one call: nothing at all is freed
    assert snap(p) == before
    q = p.free([1])
    with pytest.raises(ValueError, match="block 1"):
        q.free([1])  # stacked
    p.check()
    q.check()


def test_acquire_errors_change_nothing():
    p, _ = BlockPool(4, enable_caching=True).allocate(3)
    p = p.free([2])  # 2 stacked (uncached), 3 fresh
    before = snap(p)
    for bad in ([2], [3], [0, 2]):
        with pytest.raises(ValueError, match="neither allocated nor cached"):
            p.acquire(bad)
        assert snap(p) == before


def test_uncached_free_blocks_are_reused_lifo_before_fresh():
    p, a = BlockPool(8).allocate(5)
    assert a == (0, 1, 2, 3, 4)
    p = p.free([1, 3, 2])  # pushed 1, 3, 2: the stack top is 2
    p.check()
    p, b = p.allocate(5)
    assert b == (2, 3, 1, 5, 6)
    p.check()
    assert p.num_free == 1


def test_reuse_order_stacked_then_fresh_then_lru():
    p = BlockPool(6, enable_caching=True)
    p, a = p.allocate(5)  # 0..4, block 5 fresh
    p = p.register([0, 1, 2], [100, 101, 102])
    p = p.free([2, 1, 0])  # cached, evictable with LRU order 2, 1, 0
    p = p.free([4])  # uncached -> stack
    p.check()
    assert p.num_free == 5
    p, b = p.allocate(1)
    assert b == (4,)  # stacked first
    p, b = p.allocate(1)
    assert b == (5,)  # then fresh
    assert p.match_prefix([100, 101, 102]) == (0, 1, 2)  # cache untouched so far
    p, b = p.allocate(1)
    assert b == (2,)  # then the least recently freed cached block
    assert p.match_prefix([100, 101, 102]) == (0, 1)
    assert 102 not in p.cached and 2 not in p.block_hash
    p, b = p.allocate(2)
    assert b == (1, 0)
    assert p.match_prefix([100]) == ()
    assert p.num_free == 0
    p.check()


def test_peek_names_what_allocate_takes_and_changes_nothing():
    p = BlockPool(6, enable_caching=True)
    p, _ = p.allocate(5)
    p = p.register([0, 1, 2], [100, 101, 102]).free([2, 1, 0]).free([4])  # stacked 4, fresh 5, LRU 2, 1, 0
    for n in range(6):
        assert p.peek(n) == p.allocate(n)[1]  # stacked, then fresh, then least recently freed
    assert p.peek(3) == (4, 5, 2) and p.num_free == 5 and p.match_prefix([100, 101, 102]) == (0, 1, 2)
    p.check()
    with pytest.raises(OutOfBlocksError):
        p.peek(6)


def test_tail_first_free_evicts_tail_first():
    p = BlockPool(4, enable_caching=True)
    p, table = p.allocate(4)
    hashes = chain_hashes(list(range(16)), 4, 4)
    p = p.register(table, hashes)
    p = p.free(reversed(table))
    p.check()
    assert p.match_prefix(hashes) == table
    for k in range(4, 0, -1):
        p, (b,) = p.allocate(1)
        assert b == table[k - 1]  # the tail goes first
        assert p.match_prefix(hashes) == table[: k - 1]  # the head of the prefix stays matchable
        p.check()


def test_acquire_refreshes_lru_position():
    p = BlockPool(3, enable_caching=True)
    p, t = p.allocate(3)
    p = p.register(t, [1, 2, 3]).free([0, 1, 2])  # LRU: 0, 1, 2
    p = p.acquire([0]).free([0])  # 0 now most recently freed: LRU 1, 2, 0
    p.check()
    p, b = p.allocate(3)
    assert b == (1, 2, 0)
    p.check()


def test_acquire_evictable_block_revives_it():
    p = BlockPool(3, enable_caching=True)
    p, t = p.allocate(2)
    p = p.register(t, [7, 8]).free([1, 0])
    assert p.num_free == 3 and p.num_evictable_in([0, 1, 2]) == 2
    hit = p.match_prefix([7, 8, 9])
    assert hit == (0, 1)
    q = p.acquire(hit)
    q.check()
    assert q.refcount(0) == q.refcount(1) == 1
    assert q.num_free == 1 and q.num_evictable_in([0, 1]) == 0
    # revived blocks are not handed out again
    q2, b = q.allocate(1)
    assert b == (2,)
    with pytest.raises(OutOfBlocksError):
        q2.allocate(1)
    # still cached while referenced
    assert q.match_prefix([7, 8]) == (0, 1)
    # the old pool is unchanged
    assert p.num_free == 3 and p.refcount(0) == 0


def test_match_prefix_stops_at_first_miss():
    p = BlockPool(4, enable_caching=True)
    p, t = p.allocate(4)
    p = p.register([t[0], t[1], t[3]], [10, 11, 13])
    assert p.match_prefix([10, 11, 12, 13]) == (0, 1)
    assert p.match_prefix([11, 10]) == (1, 0)
    assert p.match_prefix([99, 10]) == ()
    assert p.match_prefix([]) == ()


def test_register_duplicate_hash_keeps_first_block():
    p = BlockPool(4, enable_caching=True)
    p, t = p.allocate(3)
    p = p.register([0], [50])
    p = p.register([1], [50])  # same content computed twice: the first block stays
    assert p.match_prefix([50]) == (0,)
    assert 1 not in p.block_hash and p.block_hash[0] == 50
    p.check()
    q = p.register([2, 1], [70, 70])  # duplicates within one call: the first one wins too
    assert q.match_prefix([70]) == (2,) and 1 not in q.block_hash
    q.check()
    # the duplicate (uncached) block is reusable at once when freed, the cached one is evictable
    p = p.free([1, 0])
    assert p.num_evictable_in([0, 1]) == 1
    p, b = p.allocate(1)
    assert b == (1,)
    p.check()


def test_register_does_not_touch_refcounts():
    p, t = BlockPool(3, enable_caching=True).allocate(2)
    q = p.register(t, [1, 2])
    assert dict(q.refcounts) == dict(p.refcounts) and q.num_free == p.num_free
    assert len(p.cached) == 0 and len(q.cached) == 2  # the old pool has no cache entries


def test_evicted_block_is_no_longer_matched_and_can_be_recached():
    p = BlockPool(2, enable_caching=True)
    p, (a, b) = p.allocate(2)
    p = p.register([a], [111]).free([a])
    assert p.match_prefix([111]) == (a,)
    p, (c,) = p.allocate(1)  # only free block is the cached one: evicts it
    assert c == a
    p.check()
    assert p.match_prefix([111]) == ()
    assert 111 not in p.cached and a not in p.block_hash and a not in p.evictable
    # the rewritten block can be cached again under its new content
    p = p.register([c], [222])
    assert p.match_prefix([222]) == (c,)
    # and the old hash may name another block now
    p = p.register([b], [111])
    assert p.match_prefix([111, 222]) == (b, c)
    p.check()
    p = p.free([c, b])
    p.check()
    assert p.num_free == 2


def test_uncache_drops_the_entry_of_an_allocated_block():
    p = BlockPool(3, enable_caching=True)
    p, t = p.allocate(3)
    p = p.register(t[:2], [5, 6])
    q = p.uncache(0)
    q.check()
    assert q.match_prefix([5, 6]) == ()
    assert 0 not in q.block_hash and 5 not in q.cached
    assert q.match_prefix([6]) == (1,)
    assert dict(q.refcounts) == dict(p.refcounts)
    assert p.match_prefix([5, 6]) == (0, 1)  # the old pool still has the entry
    # an uncached block is no longer evictable when freed: it is reusable at once
    q = q.free([0, 1])
    assert q.num_evictable_in([0, 1]) == 1 and q.num_stacked == 1
    q.check()
    # uncaching a block without an entry changes nothing
    r = p.uncache(2)
    assert snap(r) == snap(p)


def test_uncache_rejects_unallocated_blocks():
    p = BlockPool(3, enable_caching=True)
    p, t = p.allocate(2)
    p = p.register([0], [5]).free([0, 1])  # 0 evictable, 1 stacked, 2 fresh
    before = snap(p)
    for b in (0, 1, 2):
        with pytest.raises(ValueError, match=f"block {b}"):
            p.uncache(b)
    assert snap(p) == before


def test_caching_disabled():
    p = BlockPool(3)
    p, t = p.allocate(2)
    q = p.register(t, [1, 2])
    assert q is p or snap(q) == snap(p)
    assert q.match_prefix([1, 2]) == ()
    q = q.free([0, 1])
    assert q.num_evictable_in([0, 1]) == 0
    assert len(q.evictable) == 0 and q.num_stacked == 2
    q.check()


def test_lru_order_under_churn_and_unlinking_anywhere():
    p = BlockPool(4, enable_caching=True)
    p, t = p.allocate(4)
    p = p.register(t, [10, 11, 12, 13]).free([3, 2, 1, 0])
    order = [3, 2, 1, 0]  # reference LRU order, oldest first
    for i in range(60):
        picked = [order[i % 4], order[(i * 7 + 1) % 4]][: 1 + i % 2]  # head, middle or tail; one or two
        picked = list(dict.fromkeys(picked))
        p = p.acquire(picked)
        assert list(p.evictable) == [b for b in order if b not in picked]
        p = p.free(picked)
        order = [b for b in order if b not in picked] + picked
        assert list(p.evictable) == order
        p.check()
        assert list(p.allocate(4)[1]) == order
    assert p.num_free == 4


def test_old_pools_are_unchanged_by_later_operations():
    p0 = BlockPool(5, enable_caching=True)
    history = [(p0, snap(p0))]
    p, t = p0.allocate(3)
    history.append((p, snap(p)))
    p = p.register(t[:2], [1, 2])
    history.append((p, snap(p)))
    p = p.acquire([0])
    history.append((p, snap(p)))
    p = p.free([1, 0, 0, 2])
    history.append((p, snap(p)))
    p, _ = p.allocate(5)  # evicts both cached blocks
    history.append((p, snap(p)))
    p = p.free(range(5))
    history.append((p, snap(p)))
    for old, s in history:
        assert snap(old) == s
        old.check()


def test_allocate_negative_is_rejected():
    p = BlockPool(4)
    with pytest.raises((ValueError, OutOfBlocksError)):
        q, _ = p.allocate(-1)
        q.check()  # if it did not raise, the pool must at least be intact


# -- random operations against a reference model ----------------------------------------------


class RefPool:
    """Plain-dict model of the documented behaviour."""

    def __init__(self, n, caching):
        self.n, self.caching = n, caching
        self.rc = {}
        self.stack = []  # top at the end
        self.next_fresh = 0
        self.lru = []  # evictable blocks, least recently freed first
        self.cache = {}  # hash -> block
        self.bhash = {}  # block -> hash

    def num_free(self):
        return len(self.stack) + self.n - self.next_fresh + len(self.lru)

    def allocate(self, k):
        if k > self.num_free():
            raise OutOfBlocksError
        out = []
        while self.stack and len(out) < k:
            out.append(self.stack.pop())
        while self.next_fresh < self.n and len(out) < k:
            out.append(self.next_fresh)
            self.next_fresh += 1
        while len(out) < k:
            b = self.lru.pop(0)
            del self.cache[self.bhash.pop(b)]
            out.append(b)
        for b in out:
            self.rc[b] = 1
        return tuple(out)

    def free(self, blocks):
        trial = dict(self.rc)
        for b in blocks:
            if trial.get(b, 0) <= 0:
                raise ValueError
            trial[b] -= 1
        for b in blocks:
            self.rc[b] -= 1
            if self.rc[b] == 0:
                del self.rc[b]
                (self.lru if b in self.bhash else self.stack).append(b)

    def acquire(self, blocks):
        if any(self.rc.get(b, 0) == 0 and b not in self.lru for b in blocks):
            raise ValueError
        for b in blocks:
            if self.rc.get(b, 0) == 0:
                self.lru.remove(b)
            self.rc[b] = self.rc.get(b, 0) + 1

    def register(self, blocks, hashes):
        if not self.caching:
            return
        for b, h in zip(blocks, hashes):
            assert b in self.rc and b not in self.bhash  # the documented precondition
            if h not in self.cache:
                self.cache[h], self.bhash[b] = b, h

    def uncache(self, b):
        if b not in self.rc:
            raise ValueError
        if b in self.bhash:
            del self.cache[self.bhash.pop(b)]

    def match(self, hashes):
        out = []
        if self.caching:
            for h in hashes:
                if h not in self.cache:
                    break
                out.append(self.cache[h])
        return tuple(out)


def assert_same(pool, ref):
    pool.check()
    assert dict(pool.refcounts) == ref.rc
    assert pool.num_free == ref.num_free()
    assert pool.num_used == len(ref.rc)
    assert set(pool.evictable) == set(ref.lru)
    assert dict(pool.cached) == ref.cache
    assert dict(pool.block_hash) == ref.bhash
    for b in range(ref.n):
        assert pool.refcount(b) == ref.rc.get(b, 0)


class DrawChoices:
    """Choices drawn by hypothesis (shrinkable)."""

    def __init__(self, data):
        self.data = data

    def int(self, lo, hi):
        return self.data.draw(st.integers(lo, hi))

    def sample(self, seq):
        return self.data.draw(st.sampled_from(seq))

    def sublist(self, seq, lo, hi, unique=False):
        return self.data.draw(st.lists(st.sampled_from(seq), min_size=lo, max_size=hi, unique=unique))


class RandomChoices:
    """Choices from a seeded random.Random (cheap long walks)."""

    def __init__(self, seed):
        self.rng = random.Random(seed)

    def int(self, lo, hi):
        return self.rng.randint(lo, hi)

    def sample(self, seq):
        return self.rng.choice(seq)

    def sublist(self, seq, lo, hi, unique=False):
        k = self.rng.randint(lo, min(hi, len(seq)) if unique else hi)
        return self.rng.sample(list(seq), k) if unique else [self.rng.choice(seq) for _ in range(k)]


OPS = ["allocate", "allocate", "free", "free", "acquire", "acquire", "register", "register", "uncache", "match", "can"]


def random_op(pool, ref, c):
    """Performs one random operation on both the pool and the model, checking the pool's answers."""
    n, op, live = ref.n, c.sample(OPS), sorted(ref.rc)
    before = snap(pool)

    def expect_error(exc, fn):
        with pytest.raises(exc):
            fn()
        assert snap(pool) == before  # a failed operation changes nothing
        return pool

    if op == "allocate":
        k = c.int(0, 2) if c.int(0, 3) else c.int(0, n + 1)
        try:
            expected = ref.allocate(k)
        except OutOfBlocksError:
            return expect_error(OutOfBlocksError, lambda: pool.allocate(k))
        pool, got = pool.allocate(k)
        assert got == expected
        assert len(set(got)) == k
        assert not set(got) & set(live)  # freed-page hygiene: never a block a live table references
    elif op == "free":
        refs = [b for b in live for _ in range(ref.rc[b])]
        blocks = c.sublist(refs, 0, len(refs)) if refs else []
        if not c.int(0, 4):
            blocks = blocks + [c.int(0, n - 1)]  # often not allocated (or freed once too often)
        try:
            ref.free(blocks)
        except ValueError:
            return expect_error(ValueError, lambda: pool.free(blocks))
        pool = pool.free(blocks)
    elif op == "acquire":
        kind, valid = c.int(0, 4), live + ref.lru
        if ref.lru and kind >= 2:  # a prefix-cache hit on evictable blocks
            blocks = c.sublist(ref.lru, 1, 2)
        elif valid and kind:
            blocks = c.sublist(valid, 1, 3)
        else:  # anything, often a stacked or fresh block
            blocks = c.sublist(list(range(n)), 0, 3)
        try:
            ref.acquire(blocks)
        except ValueError:
            return expect_error(ValueError, lambda: pool.acquire(blocks))
        num_ev, old_free = pool.num_evictable_in(set(blocks)), pool.num_free
        pool = pool.acquire(blocks)
        assert pool.num_free == old_free - num_ev
    elif op == "register":  # full, allocated, not yet cached blocks (the documented precondition)
        candidates = [b for b in live if b not in ref.bhash]
        if not candidates:
            return pool
        blocks = c.sublist(candidates, 0, 4, unique=True)
        hashes = [c.int(0, n + 2) for _ in blocks]
        ref.register(blocks, hashes)
        pool = pool.register(blocks, hashes)
    elif op == "uncache":
        b = c.sample(live) if live and c.int(0, 3) else c.int(0, n - 1)
        try:
            ref.uncache(b)
        except ValueError:
            return expect_error(ValueError, lambda: pool.uncache(b))
        pool = pool.uncache(b)
    elif op == "match":
        hashes = [c.int(0, n + 2) for _ in range(c.int(0, 5))]
        assert pool.match_prefix(hashes) == ref.match(hashes)
        assert snap(pool) == before
        return pool
    else:
        k, reserve = c.int(0, n + 1), c.int(0, 2)
        assert pool.can_allocate(k, reserve) == (k + reserve <= ref.num_free())
        assert snap(pool) == before
        return pool
    assert_same(pool, ref)
    return pool


@given(n=st.integers(1, 4) | st.integers(1, 10), caching=st.booleans() | st.just(True), data=st.data())
@settings(max_examples=150, deadline=None)
def test_random_operations_match_reference_model(n, caching, data):
    pool, ref, c = BlockPool(n, enable_caching=caching), RefPool(n, caching), DrawChoices(data)
    history = [(pool, snap(pool))]
    for _ in range(data.draw(st.integers(0, 50), label="num_ops")):
        pool = random_op(pool, ref, c)
        history.append((pool, snap(pool)))
    for old, s in history:  # persistence: every version still holds what it held
        assert snap(old) == s
        old.check()


@pytest.mark.parametrize("seed", range(12))
def test_long_random_walks_match_reference_model(seed):
    c = RandomChoices(seed)
    n, caching = c.sample([1, 2, 3, 4, 6, 8, 16]), seed % 4 != 3
    pool, ref = BlockPool(n, enable_caching=caching), RefPool(n, caching)
    history = []
    for i in range(600):
        pool = random_op(pool, ref, c)
        if i % 50 == 0:
            history.append((pool, snap(pool)))
    for old, s in history:
        assert snap(old) == s


# -- KVConfig / KVState -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"num_blocks": 0}, "num_blocks"),
        ({"num_blocks": -3}, "num_blocks"),
        ({"num_blocks": True}, "num_blocks"),
        ({"num_blocks": 4.0}, "num_blocks"),
        ({"num_blocks": "4"}, "num_blocks"),
        ({"num_blocks": 4, "block_size": 0}, "block_size"),
        ({"num_blocks": 4, "block_size": True}, "block_size"),
        ({"num_blocks": 4, "block_size": 16.0}, "block_size"),
        ({"num_blocks": 4, "num_host_blocks": -1}, "num_host_blocks"),
        ({"num_blocks": 4, "num_host_blocks": False}, "num_host_blocks"),
        ({"num_blocks": 4, "num_host_blocks": 2.5}, "num_host_blocks"),
    ],
)
def test_kv_config_rejects_bad_field(kw, field):
    with pytest.raises(ValueError, match=rf"KVConfig\.{field}\b"):
        KVConfig(**kw)


def test_kv_config_values():
    c = KVConfig(10)
    assert (c.num_blocks, c.block_size, c.num_host_blocks) == (10, 16, 0)
    assert c.capacity_tokens == 160
    c = KVConfig(num_blocks=3, block_size=4, num_host_blocks=2)
    assert c.capacity_tokens == 12
    with pytest.raises(AttributeError):
        c.num_blocks = 5


def test_kv_state_create():
    s = KVState.create(KVConfig(num_blocks=8, block_size=4, num_host_blocks=3), enable_prefix_caching=True)
    assert s.block_size == 4
    assert s.device.num_blocks == 8 and s.device.enable_caching
    assert s.host.num_blocks == 3 and not s.host.enable_caching
    assert s.usage == 0.0
    dev, _ = s.device.allocate(2)
    s2 = KVState(s.config, dev, s.host)
    assert s2.usage == 0.25 and s.usage == 0.0
    off = KVState.create(KVConfig(num_blocks=2))
    assert not off.device.enable_caching and off.host.num_blocks == 0


# -- prefix hashing ---------------------------------------------------------------------------


@given(
    prefix=st.lists(st.integers(0, 50), max_size=40),
    a_tail=st.lists(st.integers(0, 50), max_size=20),
    b_tail=st.lists(st.integers(0, 50), max_size=20),
    bs=st.integers(1, 8),
)
@settings(max_examples=150, deadline=None)
def test_chain_hashes_prefix_property(prefix, a_tail, b_tail, bs):
    a, b = prefix + a_tail, prefix + b_tail
    ha, hb = chain_hashes(a, bs, len(a) // bs), chain_hashes(b, bs, len(b) // bs)
    assert len(ha) == len(a) // bs and len(hb) == len(b) // bs
    # the first block where the token lists differ
    diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    shared = diff // bs
    common = min(len(ha), len(hb))
    assert ha[:shared] == hb[:shared]
    for i in range(shared, common):  # from the first block holding a differing token on, all differ
        assert ha[i] != hb[i]


@given(tokens=st.lists(st.integers(0, 1000), max_size=60), bs=st.integers(1, 8), data=st.data())
@settings(max_examples=100, deadline=None)
def test_chain_hashes_continue_and_extend(tokens, bs, data):
    n = len(tokens) // bs
    full = chain_hashes(tokens, bs, n)
    k = data.draw(st.integers(0, n))
    head = chain_hashes(tokens, bs, k)
    assert head == full[:k]
    rest = chain_hashes(tokens[k * bs :], bs, n - k, parent=head[-1] if head else None)
    assert head + rest == full
    for i in range(n):
        assert extend_chain(tuple(full[:i]), tokens[i * bs : (i + 1) * bs]) == full[i]


def test_chain_hashes_depend_on_position_and_parent():
    h = chain_hashes([1, 2, 1, 2], 2, 2)
    assert h[0] != h[1]  # same block content, different parent
    assert chain_hashes([1, 2], 2, 1) != chain_hashes([2, 1], 2, 1)
    assert chain_hashes([1, 2], 2, 1, parent=h[0]) != chain_hashes([1, 2], 2, 1)
    assert chain_hashes([1, 2, 3], 2, 1) == chain_hashes([1, 2, 4], 2, 1)  # only full blocks named


def test_prompt_block_hashes_real_tokens():
    toks = list(range(1, 40))
    r = Request("r", prompt_token_ids=toks, sampling=SP)
    h = prompt_block_hashes(r, 8)
    assert len(h) == 39 // 8 == 4
    assert h == tuple(chain_hashes(toks, 8, 4))
    assert prompt_block_hashes(Request("s", prompt_token_ids=toks[:7], sampling=SP), 8) == ()
    # real tokens win over trace ids
    r2 = Request("r2", prompt_token_ids=toks, sampling=SP, prefix_block_hashes=(1, 2))
    assert prompt_block_hashes(r2, 8) == h


def test_prompt_block_hashes_placeholder_without_identity_is_empty():
    assert prompt_block_hashes(Request("r", prompt_len=4096, sampling=SP), 16) == ()
    assert prompt_block_hashes(Request("r", prompt_len=4096, sampling=SP, prefix_block_hashes=()), 16) == ()


def trace_req(rid, ids, prompt_len, span=512):
    return Request(rid, prompt_len=prompt_len, sampling=SP, prefix_block_hashes=tuple(ids),
                   prefix_hash_block_size=span)


def test_prompt_block_hashes_trace_ids_mooncake_shape():
    common = [101, 102, 103]
    a = trace_req("a", common + [7, 8], 5 * 512)
    b = trace_req("b", common + [9, 10], 5 * 512)
    ha, hb = prompt_block_hashes(a, 16), prompt_block_hashes(b, 16)
    assert len(ha) == len(hb) == 5 * 32
    assert ha[: 3 * 32] == hb[: 3 * 32]
    assert all(x != y for x, y in zip(ha[3 * 32 :], hb[3 * 32 :]))
    assert len(set(ha)) == len(ha)  # every block of a prompt is distinct
    # the same trace ids give the same chain, independent of request id
    assert prompt_block_hashes(trace_req("c", common + [7, 8], 5 * 512), 16) == ha
    # trace chains never collide with token chains of the same length
    real = Request("t", prompt_token_ids=[0] * (5 * 512), sampling=SP)
    assert not set(prompt_block_hashes(real, 16)) & set(ha)


def test_prompt_block_hashes_trace_chain_needs_every_earlier_id():
    # Same second trace id after a different first one: chained, so no block is shared at all.
    ha = prompt_block_hashes(trace_req("a", [1, 7], 1024), 16)
    hb = prompt_block_hashes(trace_req("b", [2, 7], 1024), 16)
    assert len(ha) == len(hb) == 64
    assert not set(ha) & set(hb)


def test_prompt_block_hashes_trace_counts():
    # a prompt shorter than its ids cover: only its full blocks
    assert len(prompt_block_hashes(trace_req("a", [1, 2], 1000), 16)) == 1000 // 16
    # ids cover less than the prompt: only blocks the ids cover
    assert len(prompt_block_hashes(trace_req("a", [1, 2], 4096), 16)) == 2 * 32
    # a partial last trace block still names the full kv blocks inside it
    h1 = prompt_block_hashes(trace_req("a", [1, 2], 600), 16)
    h2 = prompt_block_hashes(trace_req("b", [1, 3], 600), 16)
    assert len(h1) == 37 and h1[:32] == h2[:32] and h1[32] != h2[32]


@given(
    k=st.integers(0, 6),
    a_extra=st.integers(0, 4),
    b_extra=st.integers(0, 4),
    span=st.sampled_from([512, 64, 100, 16]),
    bs=st.sampled_from([16, 8, 48, 7, 128, 1024]),
    a_len_frac=st.integers(0, 600),
    b_len_frac=st.integers(0, 600),
)
@settings(max_examples=150, deadline=None)
def test_prompt_block_hashes_trace_shared_prefix_property(k, a_extra, b_extra, span, bs, a_len_frac, b_len_frac):
    common = list(range(1000, 1000 + k))
    # after the common part every id differs (each trace id names the whole prefix before it)
    a_ids = common + list(range(2000, 2000 + a_extra))
    b_ids = common + list(range(3000, 3000 + b_extra))
    if not a_ids or not b_ids:
        return
    a_len = max(1, (len(a_ids) - 1) * span + a_len_frac % span + 1)
    b_len = max(1, (len(b_ids) - 1) * span + b_len_frac % span + 1)
    ha = prompt_block_hashes(trace_req("a", a_ids, a_len, span), bs)
    hb = prompt_block_hashes(trace_req("b", b_ids, b_len, span), bs)
    assert len(ha) == min(a_len // bs, len(a_ids) * span // bs)
    assert len(hb) == min(b_len // bs, len(b_ids) * span // bs)
    shared = (k * span) // bs  # blocks whose last token lies inside the common trace blocks
    for i in range(min(len(ha), len(hb))):
        if i < shared:
            assert ha[i] == hb[i], i
        else:
            assert ha[i] != hb[i], i


def test_prompt_block_hashes_share_cache_through_pool():
    """End to end: a second request with the same first trace id hits the first one's cached blocks."""
    bs = 16
    a = trace_req("a", [5, 6], 1024)
    b = trace_req("b", [5, 9], 1024)
    ha, hb = prompt_block_hashes(a, bs), prompt_block_hashes(b, bs)
    pool = BlockPool(100, enable_caching=True)
    pool, ta = pool.allocate(len(ha))
    pool = pool.register(ta, ha)
    hit = pool.match_prefix(hb)
    assert hit == ta[:32]
    pool = pool.acquire(hit)
    assert all(pool.refcount(x) == 2 for x in hit) and all(pool.refcount(x) == 1 for x in ta[32:])
    pool.check()
