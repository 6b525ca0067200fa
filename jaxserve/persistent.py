"""Small persistent (immutable, structure-sharing) containers for scheduler state.

Schedulers are pure, so every step returns a new state; these containers make that cost O(change)
rather than O(state): an update shares everything it did not touch with the old version. Maps come
from ``immutables.Map`` (a C hash-array-mapped trie). Here:

* cons lists: ``(head, tail)`` pairs, ``None`` is empty (O(1) push, used for stacks);
* ``Queue``: Okasaki's two-list FIFO queue;
* ``KeyedQueue``: a priority queue keyed by a sort key (a FIFO for items pushed in key order, a
  leftist heap for the rest), with removal by id (lazy deletion);
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Iterable, Iterator, Optional

import immutables

Cons = Optional[tuple]  # None | (head, tail)
EMPTY_MAP = immutables.Map()


def cons_from(items: Iterable[Any], tail: Cons = None) -> Cons:
    """Pushes ``items`` in order onto ``tail``: the last item ends up at the head."""
    for x in items:
        tail = (x, tail)
    return tail


def cons_iter(lst: Cons) -> Iterator[Any]:
    """Iterates head first."""
    while lst is not None:
        yield lst[0]
        lst = lst[1]


def cons_to_list_oldest_first(lst: Cons) -> list:
    out = list(cons_iter(lst))
    out.reverse()
    return out


class Queue:
    """Persistent FIFO. Invariant: ``front`` is empty only when the queue is empty."""

    __slots__ = ("front", "rear", "size")

    def __init__(self, front: Cons = None, rear: Cons = None, size: int = 0):
        self.front, self.rear, self.size = front, rear, size

    def push(self, x: Any) -> "Queue":
        if self.front is None:
            return Queue((x, None), None, 1)
        return Queue(self.front, (x, self.rear), self.size + 1)

    def extend(self, items: Iterable[Any]) -> "Queue":
        """Pushes ``items`` in order (one new Queue for the whole batch)."""
        q = self
        if q.front is None:
            it = iter(items)
            for x in it:
                q = Queue((x, None), None, 1)
                break
            else:
                return q
            items = it
        rear, size = q.rear, q.size
        for x in items:
            rear = (x, rear)
            size += 1
        return Queue(q.front, rear, size)

    def peek(self) -> Any:
        if self.front is None:
            raise IndexError("peek from an empty Queue")
        return self.front[0]

    def pop(self) -> "Queue":
        if self.front is None:
            raise IndexError("pop from an empty Queue")
        front = self.front[1]
        if front is None:
            return Queue(cons_from(cons_iter(self.rear)), None, self.size - 1)
        return Queue(front, self.rear, self.size - 1)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Any]:
        yield from cons_iter(self.front)
        yield from cons_to_list_oldest_first(self.rear)


_EMPTY_QUEUE = Queue()


# -- leftist heap: node = (rank, key, item, left, right) ------------------------------------------


def _merge(a, b):
    """The leftist heap holding both heaps' nodes. Iterative (the recursion merged down the right
    spines, one Python call per level): walk down, always into the smaller root's right child,
    then rebuild the path bottom-up, swapping children where the leftist rank requires."""
    path = []
    while a is not None and b is not None:
        if b[1] < a[1]:
            a, b = b, a
        path.append(a)
        a = a[4]
    merged = b if a is None else a
    for _, key, item, left, _ in reversed(path):
        right = merged
        if left is None or left[0] < right[0]:
            left, right = right, left
        merged = ((right[0] + 1) if right is not None else 1, key, item, left, right)
    return merged


class KeyedQueue:
    """A persistent priority queue of items that each have a unique ``id``; smallest key first
    (ties: first pushed first).

    Entries are ``((key, stamp), (id, item))``. An entry whose key is no smaller than that of the
    last entry appended to ``run`` is appended there (a FIFO, already sorted: O(1) push and pop),
    the usual case of arrivals in key order; any other entry goes to a leftist heap (O(log n)).
    The smallest entry is the smaller of the two heads.

    ``remove(id)`` is O(log n) amortized through lazy deletion: ``members`` maps each live id to the
    stamp of its live entry, and dead entries are dropped when they reach a head.
    """

    __slots__ = ("heap", "members", "next_stamp", "run", "run_last")

    def __init__(self, heap: Any = None, members: immutables.Map = EMPTY_MAP, next_stamp: int = 0,
                 run: Optional[Queue] = None, run_last: Optional[tuple] = None):
        self.heap, self.members, self.next_stamp = heap, members, next_stamp
        self.run = run if run is not None else _EMPTY_QUEUE
        self.run_last = run_last  # (key, stamp) of the entry last appended to run, None when run is empty

    def _with(self, heap, members, run, run_last) -> "KeyedQueue":
        return KeyedQueue(heap, members, self.next_stamp, run, run_last)

    def push(self, key: tuple, item_id: str, item: Any) -> "KeyedQueue":
        if item_id in self.members:
            raise ValueError(f"KeyedQueue already holds {item_id!r}")
        stamp = self.next_stamp
        order = (key, stamp)
        entry = (order, (item_id, item))
        members = self.members.set(item_id, stamp)
        if self.run_last is None or self.run_last < order:
            return KeyedQueue(self.heap, members, stamp + 1, self.run.push(entry), order)
        node = (1, order, (item_id, item), None, None)
        return KeyedQueue(_merge(self.heap, node), members, stamp + 1, self.run, self.run_last)

    def _top_in_run(self) -> Optional[bool]:
        """Whether the smallest entry heads ``run`` (True) or the heap (False); None when empty."""
        run, heap = self.run, self.heap
        if run.front is None:
            return None if heap is None else False
        return heap is None or run.front[0][0] < heap[1]

    def peek(self) -> Any:
        """The item with the smallest key; IndexError when empty."""
        where = self._top_in_run()
        if where is None:
            raise IndexError("peek from an empty KeyedQueue")
        return self.run.front[0][1][1] if where else self.heap[2][1]

    def pop(self) -> "KeyedQueue":
        where = self._top_in_run()
        if where is None:
            raise IndexError("pop from an empty KeyedQueue")
        if where:
            item_id = self.run.front[0][1][0]
            run = self.run.pop()
            q = self._with(self.heap, self.members.delete(item_id), run, self.run_last if run else None)
        else:
            _, _, (item_id, _), left, right = self.heap
            q = self._with(_merge(left, right), self.members.delete(item_id), self.run, self.run_last)
        return q._clean()

    def remove(self, item_id: str) -> "KeyedQueue":
        if item_id not in self.members:
            return self
        return self._with(self.heap, self.members.delete(item_id), self.run, self.run_last)._clean()

    def get(self, item_id: str) -> Any:
        """The live item with this id, or None (O(n): for inspection and tests)."""
        for i, item in self._live_items():
            if i == item_id:
                return item
        return None

    def _live(self, order: tuple, item_id: str) -> bool:
        return self.members.get(item_id) == order[1]

    def _clean(self) -> "KeyedQueue":
        """Drops dead entries from both heads, so that each head is live (or its part empty)."""
        heap, run = self.heap, self.run
        while heap is not None and not self._live(heap[1], heap[2][0]):
            heap = _merge(heap[3], heap[4])
        while run.front is not None and not self._live(run.front[0][0], run.front[0][1][0]):
            run = run.pop()
        if heap is self.heap and run is self.run:
            return self
        return self._with(heap, self.members, run, self.run_last if run else None)

    def _live_items(self) -> Iterator[tuple[str, Any]]:
        for order, (item_id, item) in self.run:
            if self._live(order, item_id):
                yield item_id, item
        stack = [self.heap] if self.heap is not None else []
        while stack:
            node = stack.pop()
            (_, stamp), (item_id, item) = node[1], node[2]
            if self.members.get(item_id) == stamp:
                yield item_id, item
            stack.extend(n for n in (node[3], node[4]) if n is not None)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.members

    def __len__(self) -> int:
        return len(self.members)

    def __bool__(self) -> bool:
        return self.heap is not None or self.run.front is not None

    def sorted_items(self) -> list[Any]:
        """Items in key order (O(n log n)): for inspection and tests."""
        q, out = self, []
        while q:
            out.append(q.peek())
            q = q.pop()
        return out


def evolve(obj: Any, **changes: Any) -> Any:
    """A copy of the frozen dataclass ``obj`` with ``changes`` (no __post_init__ re-validation:
    for hot paths whose values are already valid). ~10x cheaper than ``dataclasses.replace``."""
    new = object.__new__(type(obj))
    d = new.__dict__
    d.update(obj.__dict__)
    d.update(changes)
    return new


def pick(items: Sequence[Any], indices: Sequence[int]) -> tuple:
    """``tuple(items[i] for i in indices)`` at C speed."""
    if len(indices) == 0:
        return ()
    if len(indices) == 1:
        return (items[indices[0]],)
    return operator.itemgetter(*indices)(items)
