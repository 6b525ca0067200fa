"""Persistent containers: cons lists, Queue, KeyedQueue — against reference models."""

import collections
import re

import pytest
from hypothesis import given, settings, strategies as st

from jaxserve.persistent import (
    KeyedQueue,
    Queue,
    cons_from,
    cons_iter,
    cons_to_list_oldest_first,
    evolve,
    pick,
)

# -- cons lists -------------------------------------------------------------------------------


def test_cons_helpers():
    assert cons_from([]) is None
    assert list(cons_iter(None)) == []
    lst = cons_from([1, 2, 3])
    assert lst == (3, (2, (1, None)))
    assert list(cons_iter(lst)) == [3, 2, 1]
    assert cons_to_list_oldest_first(lst) == [1, 2, 3]
    assert cons_to_list_oldest_first(None) == []


@given(a=st.lists(st.integers()), b=st.lists(st.integers()))
@settings(max_examples=100, deadline=None)
def test_cons_from_onto_tail_shares_the_tail(a, b):
    base = cons_from(a)
    ext = cons_from(b, base)
    assert list(cons_iter(ext)) == list(reversed(b)) + list(reversed(a))
    assert cons_to_list_oldest_first(ext) == a + b
    assert list(cons_iter(base)) == list(reversed(a))  # the tail is unchanged
    # structure sharing: walking len(b) cells down ext reaches the very same base object
    node = ext
    for _ in b:
        node = node[1]
    assert node is base


@given(items=st.lists(st.integers(), max_size=10), data=st.data())
@settings(max_examples=100, deadline=None)
def test_pick_matches_indexing(items, data):
    idx = data.draw(st.lists(st.integers(0, len(items) - 1), max_size=6) if items else st.just([]))
    assert pick(items, idx) == tuple(items[i] for i in idx)
    assert pick(tuple(items), tuple(idx)) == tuple(items[i] for i in idx)
    assert type(pick(items, idx)) is tuple


def test_evolve_copies_a_frozen_dataclass_with_changes():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class P:
        a: int
        b: tuple
        c: str = "x"

    p = P(1, (2, 3))
    q = evolve(p, a=5, c="y")
    assert type(q) is P and q == P(5, (2, 3), "y")
    assert q.b is p.b  # untouched fields are shared, not copied
    assert p == P(1, (2, 3), "x")  # the original is unchanged
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.a = 7
    assert evolve(p) == p and evolve(p) is not p


# -- Queue ------------------------------------------------------------------------------------

queue_ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 1000)),
        st.just(("pop",)),
        st.just(("peek",)),
        st.tuples(st.just("extend"), st.lists(st.integers(0, 1000), max_size=4)),
    ),
    max_size=80,
)


@given(ops=queue_ops, data=st.data())
@settings(max_examples=200, deadline=None)
def test_queue_matches_deque_and_old_versions_are_unchanged(ops, data):
    q, ref = Queue(), collections.deque()
    versions = [(q, list(ref))]
    for op in ops:
        if op[0] == "push":
            q = q.push(op[1])
            ref.append(op[1])
        elif op[0] == "extend":
            q = q.extend(iter(op[1]))  # any iterable, consumed once
            ref.extend(op[1])
        elif op[0] == "pop":
            if not ref:
                with pytest.raises(IndexError):
                    q.pop()
                continue
            q = q.pop()
            ref.popleft()
        else:
            if not ref:
                with pytest.raises(IndexError):
                    q.peek()
            else:
                assert q.peek() == ref[0]
            continue
        assert len(q) == len(ref)
        assert list(q) == list(ref)
        if ref:
            assert q.peek() == ref[0]
        versions.append((q, list(ref)))
    # persistence: every older version still holds exactly what it held, and still works
    for old, snap in versions:
        assert list(old) == snap and len(old) == len(snap)
        if snap:
            assert old.peek() == snap[0]
            assert list(old.pop()) == snap[1:]
        assert list(old.push("new")) == snap + ["new"]
    # branching from an old version does not disturb a newer one
    if len(versions) > 2:
        i = data.draw(st.integers(0, len(versions) - 1))
        old, snap = versions[i]
        branch = old.push(-1).push(-2)
        assert list(branch) == snap + [-1, -2]
        assert list(versions[-1][0]) == versions[-1][1]


def test_queue_basics():
    q = Queue()
    assert len(q) == 0 and list(q) == []
    with pytest.raises(IndexError):
        q.peek()
    with pytest.raises(IndexError):
        q.pop()
    q1 = q.push("a").push("b").push("c")
    assert list(q1) == ["a", "b", "c"] and q1.peek() == "a"
    q2 = q1.pop()
    assert list(q2) == ["b", "c"] and q2.peek() == "b"
    q3 = q2.push("d").pop().pop()
    assert list(q3) == ["d"] and q3.peek() == "d"
    assert list(q1) == ["a", "b", "c"] and list(q2) == ["b", "c"]
    assert len(q3.pop()) == 0
    assert list(q.extend([])) == [] and len(q.extend([])) == 0
    e = q.extend(["x", "y"]).extend(["z"])
    assert list(e) == ["x", "y", "z"] and len(e) == 3 and e.peek() == "x"
    assert list(e.pop().pop()) == ["z"]
    assert list(q1.extend(["d", "e"])) == ["a", "b", "c", "d", "e"] and list(q1) == ["a", "b", "c"]


# -- KeyedQueue -------------------------------------------------------------------------------

IDS = ["a", "b", "c", "d"]
kq_ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.tuples(st.integers(0, 4), st.integers(0, 2)), st.sampled_from(IDS)),
        st.tuples(st.just("push"), st.tuples(st.integers(0, 4), st.integers(0, 2)), st.sampled_from(IDS)),
        st.just(("pop",)),
        st.tuples(st.just("remove"), st.sampled_from(IDS)),
    ),
    max_size=60,
)


class RefKeyedQueue:
    """Sorted list of (key, push_seq, id, item): smallest key first, FIFO among equal keys."""

    def __init__(self):
        self.entries, self.seq = [], 0

    def push(self, key, item_id, item):
        self.entries.append((key, self.seq, item_id, item))
        self.seq += 1
        self.entries.sort(key=lambda e: (e[0], e[1]))

    def pop(self):
        self.entries.pop(0)

    def remove(self, item_id):
        self.entries = [e for e in self.entries if e[2] != item_id]

    def ids(self):
        return {e[2] for e in self.entries}

    def items(self):
        return [e[3] for e in self.entries]


def kq_snapshot(q):
    return q.sorted_items(), len(q), bool(q), {i: (i in q) for i in IDS}


@given(ops=kq_ops)
@settings(max_examples=200, deadline=None)
def test_keyed_queue_matches_sorted_list_and_old_versions_are_unchanged(ops):
    q, ref = KeyedQueue(), RefKeyedQueue()
    versions = [(q, kq_snapshot(q))]
    counter = 0
    for op in ops:
        if op[0] == "push":
            key, item_id = op[1], op[2]
            item = (item_id, counter)  # unique item so order is fully observable
            counter += 1
            if item_id in ref.ids():
                with pytest.raises(ValueError, match=re.escape(repr(item_id))):
                    q.push(key, item_id, item)
                continue
            q = q.push(key, item_id, item)
            ref.push(key, item_id, item)
        elif op[0] == "pop":
            if not ref.entries:
                with pytest.raises(IndexError):
                    q.pop()
                with pytest.raises(IndexError):
                    q.peek()
                continue
            assert q.peek() == ref.entries[0][3]
            q = q.pop()
            ref.pop()
        else:
            q = q.remove(op[1])  # removing an absent id is a no-op
            ref.remove(op[1])
        assert len(q) == len(ref.entries)
        assert bool(q) == bool(ref.entries)
        for i in IDS:
            assert (i in q) == (i in ref.ids())
            live = [e[3] for e in ref.entries if e[2] == i]
            assert q.get(i) == (live[0] if live else None)
        if ref.entries:
            assert q.peek() == ref.entries[0][3]
        assert q.sorted_items() == ref.items()
        versions.append((q, kq_snapshot(q)))
    for old, snap in versions:
        assert kq_snapshot(old) == snap


def test_keyed_queue_basics():
    q = KeyedQueue()
    assert len(q) == 0 and not q and "a" not in q and q.get("a") is None
    with pytest.raises(IndexError):
        q.peek()
    with pytest.raises(IndexError):
        q.pop()
    q = q.push((2,), "a", "A").push((1,), "b", "B").push((2,), "c", "C").push((0,), "d", "D")
    assert q.sorted_items() == ["D", "B", "A", "C"]
    assert q.peek() == "D" and len(q) == 4
    with pytest.raises(ValueError, match="'a'"):
        q.push((9,), "a", "again")
    q2 = q.remove("d")  # removing the top
    assert q2.peek() == "B" and len(q2) == 3 and "d" not in q2
    q3 = q2.remove("a").remove("zzz")  # removing from the middle, then an absent id
    assert q3.sorted_items() == ["B", "C"] and len(q3) == 2
    q4 = q3.push((0,), "a", "A2")  # a removed id may come back, with its new key and item
    assert q4.sorted_items() == ["A2", "B", "C"] and q4.get("a") == "A2"
    q5 = q4.pop().pop().pop()
    assert len(q5) == 0 and not q5 and q5.sorted_items() == []
    # old versions untouched
    assert q.sorted_items() == ["D", "B", "A", "C"] and len(q) == 4
    assert q3.sorted_items() == ["B", "C"] and q3.get("a") is None


def test_keyed_queue_dead_entry_of_a_re_pushed_id_stays_dead():
    # "a" is removed while not at the top (its heap entry stays, dead), then pushed again with a later key:
    # once "b" is popped the dead entry reaches the top and must be skipped, not mistaken for the new "a".
    q = KeyedQueue().push((5,), "a", "old-a").push((0,), "b", "B").remove("a").push((9,), "a", "new-a")
    assert len(q) == 2 and q.get("a") == "new-a"
    q2 = q.pop()
    assert q2.peek() == "new-a" and len(q2) == 1
    assert q2.pop().sorted_items() == [] and not q2.pop()
    assert q.sorted_items() == ["B", "new-a"]


def test_keyed_queue_remove_everything_then_empty():
    q = KeyedQueue()
    for i, k in enumerate([5, 3, 8, 1]):
        q = q.push((k,), f"x{i}", i)
    for i in (2, 0, 3, 1):
        q = q.remove(f"x{i}")
    assert len(q) == 0 and not q
    with pytest.raises(IndexError):
        q.peek()
    with pytest.raises(IndexError):
        q.pop()


def test_keyed_queue_many_items_is_sorted_and_stable():
    import random

    rng = random.Random(0)
    q, ref = KeyedQueue(), []
    for i in range(2000):
        k = rng.randrange(50)
        q = q.push((k,), f"id{i}", i)
        ref.append((k, i))
    for i in range(0, 2000, 3):
        q = q.remove(f"id{i}")
    ref = sorted((k, i) for k, i in ref if i % 3)
    assert len(q) == len(ref)
    assert q.sorted_items() == [i for _, i in ref]
