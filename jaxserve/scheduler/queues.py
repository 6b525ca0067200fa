"""Waiting-queue order: which waiting request a scheduler considers next.

A ``QueueOrder`` is a stateless policy object; the queue itself is a persistent value it creates
(``empty()``) and transforms. Two families:

* ``KeyedOrder(key)``: smallest ``key(seq)`` first — FCFS (``fcfs_key``), priority tiers
  (``priority_key``), shortest prompt first (``shortest_prompt_key``) or any key a script defines.
* ``FairOrder``: VTC fair queueing (Sheng et al., OSDI'24) — serve the backlogged client with the
  least virtual service, FCFS within a client.

Hooks ``on_admit`` and ``on_generated`` let an order account for service; keyed orders ignore them.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable, Optional

import immutables

from jaxserve.persistent import EMPTY_MAP, KeyedQueue, evolve
from jaxserve.scheduler.seq import SeqState


def fcfs_key(seq: SeqState) -> tuple:
    return (seq.seq_no,)


def priority_key(seq: SeqState) -> tuple:
    """Lower ``Request.priority`` first, FCFS within a tier."""
    return (seq.request.priority, seq.seq_no)


def shortest_prompt_key(seq: SeqState) -> tuple:
    return (seq.request.prompt_len, seq.seq_no)


@dataclasses.dataclass(frozen=True)
class KeyedOrder:
    key: Callable[[SeqState], tuple] = fcfs_key
    accounts_service = False  # on_admit / on_generated are no-ops

    def empty(self) -> KeyedQueue:
        return KeyedQueue()

    def push(self, q: KeyedQueue, seq: SeqState, *, is_arrival: bool) -> KeyedQueue:
        return q.push(self.key(seq), seq.request_id, seq)

    def peek(self, q: KeyedQueue) -> Optional[SeqState]:
        return q.peek() if q else None

    def pop(self, q: KeyedQueue) -> KeyedQueue:
        return q.pop()

    def remove(self, q: KeyedQueue, request_id: str) -> KeyedQueue:
        return q.remove(request_id)

    def contains(self, q: KeyedQueue, request_id: str) -> bool:
        return request_id in q

    def size(self, q: KeyedQueue) -> int:
        return len(q)

    def items(self, q: KeyedQueue) -> list[SeqState]:
        return q.sorted_items()

    def on_admit(self, q: KeyedQueue, seq: SeqState) -> KeyedQueue:
        return q

    def on_generated(self, q: KeyedQueue, client_ids: list[str]) -> KeyedQueue:
        return q


FCFS = KeyedOrder(fcfs_key)


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclasses.dataclass(frozen=True)
class FairQueue:
    """VTC's queue value: one FCFS queue per backlogged client and every client's counter."""

    per_client: immutables.Map = EMPTY_MAP  # client -> non-empty KeyedQueue
    counters: immutables.Map = EMPTY_MAP  # client -> virtual service received
    where: immutables.Map = EMPTY_MAP  # request id -> client
    last_left: Optional[str] = None  # the client whose queue emptied most recently

    def __len__(self) -> int:
        return len(self.where)


@dataclasses.dataclass(frozen=True)
class FairOrder:
    """Virtual token counters. Service = (w_p * input + w_q * output tokens) / weight[client].

    A client that becomes backlogged has its counter lifted to the least counter among the other
    backlogged clients (or, when nobody is backlogged, to the counter of the client that left the
    queue last), so it cannot bank service while idle. Prompts are charged once, when a
    request is first admitted (a recompute after preemption is not the client's service).
    """

    w_p: float = 1.0
    w_q: float = 2.0
    weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
    accounts_service = True

    def __post_init__(self):
        for name in ("w_p", "w_q"):
            if not _finite_number(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"vtc option {name} must be a finite number >= 0, got {getattr(self, name)!r}")
        for client, w in dict(self.weights).items():
            if not _finite_number(w) or w <= 0:
                raise ValueError(f"vtc option weights[{client!r}] must be a finite number > 0, got {w!r}")
        object.__setattr__(self, "weights", immutables.Map(dict(self.weights)))

    def weight(self, client: str) -> float:
        return self.weights.get(client, 1.0)

    def empty(self) -> FairQueue:
        return FairQueue()

    def _next_client(self, q: FairQueue) -> Optional[str]:
        # Ties go to the smaller client id, never to map iteration order (which is hash-seeded).
        best = None
        for client in q.per_client.keys():
            key = (q.counters.get(client, 0.0), client)
            if best is None or key < best:
                best = key
        return None if best is None else best[1]

    def push(self, q: FairQueue, seq: SeqState, *, is_arrival: bool) -> FairQueue:
        client = seq.request.client_id
        sub = q.per_client.get(client)
        counters = q.counters
        if sub is None:
            sub = KeyedQueue()
            lifted = counters.get(client, 0.0)
            if is_arrival:
                others = [counters.get(c, 0.0) for c in q.per_client.keys()]
                if others:
                    lifted = max(lifted, min(others))
                elif q.last_left is not None:  # nobody waits: no banking idle time either
                    lifted = max(lifted, counters.get(q.last_left, 0.0))
            counters = counters.set(client, lifted)
        sub = sub.push(fcfs_key(seq), seq.request_id, seq)
        return FairQueue(q.per_client.set(client, sub), counters, q.where.set(seq.request_id, client), q.last_left)

    def peek(self, q: FairQueue) -> Optional[SeqState]:
        client = self._next_client(q)
        return None if client is None else q.per_client[client].peek()

    def pop(self, q: FairQueue) -> FairQueue:
        client = self._next_client(q)
        if client is None:
            raise IndexError("pop from an empty FairQueue")
        return self._remove_from(q, client, q.per_client[client].peek().request_id)

    def remove(self, q: FairQueue, request_id: str) -> FairQueue:
        client = q.where.get(request_id)
        return q if client is None else self._remove_from(q, client, request_id)

    def _remove_from(self, q: FairQueue, client: str, request_id: str) -> FairQueue:
        sub = q.per_client[client].remove(request_id)
        if sub:
            return FairQueue(q.per_client.set(client, sub), q.counters, q.where.delete(request_id), q.last_left)
        return FairQueue(q.per_client.delete(client), q.counters, q.where.delete(request_id), client)

    def contains(self, q: FairQueue, request_id: str) -> bool:
        return request_id in q.where

    def size(self, q: FairQueue) -> int:
        return len(q.where)

    def items(self, q: FairQueue) -> list[SeqState]:
        out = []
        while True:
            seq = self.peek(q)
            if seq is None:
                return out
            out.append(seq)
            q = self.pop(q)

    def counter(self, q: FairQueue, client: str) -> float:
        return q.counters.get(client, 0.0)

    def on_admit(self, q: FairQueue, seq: SeqState) -> FairQueue:
        if seq.num_preemptions:
            return q
        client = seq.request.client_id
        charge = self.w_p * seq.request.prompt_len / self.weight(client)
        return evolve(q, counters=q.counters.set(client, self.counter(q, client) + charge))

    def on_generated(self, q: FairQueue, client_ids: list[str]) -> FairQueue:
        if not client_ids:
            return q
        with q.counters.mutate() as counters:
            for client, n in collections.Counter(client_ids).items():
                counters[client] = counters.get(client, 0.0) + n * self.w_q / self.weight(client)
            return evolve(q, counters=counters.finish())


QueueOrder = Any  # KeyedOrder | FairOrder | anything with the same methods
