"""Rerooted persistent containers (jaxserve.kv.versioned) against plain copies."""

import gc
import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve.kv.versioned import MISSING, Versioned


def versions_behind(v: Versioned) -> int:
    """How many links separate ``v`` from the current version (0 when current)."""
    n = 0
    while v._data is None:
        v, n = v._link[0], n + 1
    return n


def is_current(v: Versioned) -> bool:
    return v._data is not None


class Box(Versioned):
    """One int array and one dict, the smallest Versioned value."""

    __slots__ = ()

    @classmethod
    def create(cls, n):
        box = cls()
        box._data, box._link = [np.zeros(n, np.int64), {}], None
        return box

    def content(self):
        arr, d = self._read()
        return arr.tolist(), dict(d)

    def edit(self, edits):
        return self._derive(edits, Box())


def random_edits(rng, content, n):
    """A list of valid edits and the content they produce."""
    arr, d = list(content[0]), dict(content[1])
    edits = []
    for _ in range(rng.randint(0, 3)):
        kind = rng.choice(["fancy", "slice", "scalar", "insert", "delete"])
        if kind == "fancy":
            idx = rng.sample(range(n), rng.randint(1, n))
            vals = [rng.randint(-5, 5) for _ in idx]
            edit = (0, np.array(idx), np.array(vals))
            if rng.random() < 0.5:  # with the cells' current values, as a maker that read them passes
                edit += (np.array([arr[i] for i in idx]),)
            edits.append(edit)
            for i, v in zip(idx, vals):
                arr[i] = v
        elif kind == "slice":
            a = rng.randint(0, n - 1)
            b = rng.randint(a, n)
            v = rng.randint(-5, 5)
            edits.append((0, slice(a, b), v))
            arr[a:b] = [v] * (b - a)
        elif kind == "scalar":
            i, v = rng.randrange(n), rng.randint(-5, 5)
            edits.append((0, i, v))
            arr[i] = v
        elif kind == "insert":
            keys = [k for k in rng.sample(range(12), 3) if k not in d]
            vals = [rng.randint(0, 9) for _ in keys]
            edits.append((1, keys, vals))
            d.update(zip(keys, vals))
        elif d:
            keys = rng.sample(sorted(d), rng.randint(1, len(d)))
            edits.append((1, keys, MISSING))
            for k in keys:
                del d[k]
    return edits, (arr, d)


@given(seed=st.integers(0, 10**9), n=st.integers(1, 6))
@settings(max_examples=100, deadline=None)
def test_every_version_keeps_its_content_whatever_order_they_are_used_in(seed, n):
    rng = random.Random(seed)
    versions = [(Box.create(n), ([0] * n, {}))]
    for _ in range(40):
        # derive from any version (a tree of histories, not only a line), then read any version
        base, content = rng.choice(versions)
        assert base.content() == content
        edits, new_content = random_edits(rng, content, n)
        new = base.edit(edits)
        assert is_current(new) and versions_behind(base) == 1
        versions.append((new, new_content))
        old, old_content = rng.choice(versions)
        assert old.content() == old_content
    for v, content in reversed(versions):
        assert v.content() == content


def test_a_cell_written_twice_in_one_derive_is_undone_in_order():
    box = Box.create(3)
    new = box.edit([(0, np.array([1]), np.array([5])), (0, slice(0, 3), 7), (0, 2, 9)])
    assert new.content()[0] == [7, 7, 9]
    assert box.content()[0] == [0, 0, 0]
    assert new.content()[0] == [7, 7, 9]


def test_views_handed_out_are_not_kept():
    box = Box.create(2)
    new = box.edit([(0, slice(0, 2), 4)])
    assert new.content()[0] == [4, 4]
    assert box.content()[0] == [0, 0]  # rerooted: the shared array holds the old content now
    assert versions_behind(new) == 1 and versions_behind(box) == 0


def test_long_histories_are_freed_without_recursion():
    box = Box.create(4)
    first = box
    for i in range(200_000):
        box = box.edit([(0, i % 4, i)])
    assert first.content()[0] == [0, 0, 0, 0]  # 200,000 links back
    assert box.content()[0] == [199_996, 199_997, 199_998, 199_999]
    del first, box
    gc.collect()
