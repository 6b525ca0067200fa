"""``fair``: fair dispatch, VTC's virtual token counters (Sheng et al., OSDI'24) kept at the router
across all replicas, so clients get equal service from the cluster, not from each replica.

Arrivals wait at the router in one FCFS queue per client. A dispatch places requests only while
some accepting replica has fewer than ``max_waiting`` requests waiting (so the order of service is
decided here, not in the replicas' queues), each time taking the oldest request of the backlogged
client with the smallest counter (ties: client name) to the replica with room and the fewest
requests. A client's counter is ``w_p`` x prompt tokens dispatched + ``w_q`` x output tokens
served (``ClusterView.served_tokens``, which the cluster fills for this router), divided by its
weight; a client that becomes backlogged is lifted to the smallest counter of those already
backlogged, as in VTC, so idling earns no credit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import immutables

from jaxserve.cluster.view import ClusterView, least
from jaxserve.persistent import EMPTY_MAP, KeyedQueue
from jaxserve.request import Request


class FairState(NamedTuple):
    queues: immutables.Map = EMPTY_MAP  # client -> KeyedQueue of its requests (FCFS)
    charged: immutables.Map = EMPTY_MAP  # client -> w_p x prompt tokens dispatched + lifts
    lifted: frozenset = frozenset()  # backlogged clients whose lift is applied
    seq: int = 0


@dataclasses.dataclass(frozen=True)
class FairRouter:
    max_waiting: int = 2
    w_p: float = 1.0
    w_q: float = 2.0
    weights: Mapping[str, float] = dataclasses.field(default_factory=dict)

    accounts_service = True

    def __post_init__(self):
        if not isinstance(self.max_waiting, int) or self.max_waiting < 1:
            raise ValueError(f"max_waiting must be an int >= 1, got {self.max_waiting!r}")
        if not (self.w_p >= 0 and self.w_q >= 0 and self.w_p + self.w_q > 0):
            raise ValueError(f"w_p and w_q must be >= 0 and not both 0, got {self.w_p!r}, {self.w_q!r}")
        for client, w in self.weights.items():
            if not w > 0:
                raise ValueError(f"weights[{client!r}] must be > 0, got {w!r}")

    def init(self, num_replicas: int) -> FairState:
        return FairState()

    def counter(self, state: FairState, view: ClusterView, client: str) -> float:
        service = state.charged.get(client, 0.0) + self.w_q * view.served_tokens.get(client, 0)
        return service / self.weights.get(client, 1.0)

    def submit(self, state: FairState, request: Request) -> FairState:
        client = request.client_id
        queue = state.queues.get(client, KeyedQueue()).push((state.seq,), request.request_id, (state.seq, request))
        return state._replace(queues=state.queues.set(client, queue), seq=state.seq + 1)

    def pending(self, state: FairState) -> tuple[Request, ...]:
        items = [item for q in state.queues.values() for item in q.sorted_items()]
        return tuple(r for _, r in sorted(items, key=lambda item: item[0]))

    def has_pending(self, state: FairState) -> bool:
        return bool(state.queues)

    def _lift(self, state: FairState, view: ClusterView) -> FairState:
        new = [c for c in state.queues if c not in state.lifted]
        if not new:
            return state
        old = [c for c in state.lifted if c in state.queues]
        charged = state.charged
        if old:
            floor = min(self.counter(state, view, c) for c in old)
            for c in new:
                gap = floor - self.counter(state, view, c)
                if gap > 0:
                    charged = charged.set(c, charged.get(c, 0.0) + gap * self.weights.get(c, 1.0))
        return state._replace(charged=charged, lifted=frozenset(old) | frozenset(new))

    def dispatch(self, state: FairState, view: ClusterView):
        state = self._lift(state, view)
        placements = []
        while state.queues:
            room = [r for r in view.accepting if r.num_waiting < self.max_waiting]
            if not room:
                break
            client = min(state.queues, key=lambda c: (self.counter(state, view, c), c))
            queue = state.queues[client]
            _, request = queue.peek()
            queue = queue.pop()
            queues = state.queues.set(client, queue) if queue else state.queues.delete(client)
            charged = state.charged.set(client, state.charged.get(client, 0.0) + self.w_p * request.prompt_len)
            lifted = state.lifted if queue else state.lifted - {client}
            state = state._replace(queues=queues, charged=charged, lifted=lifted)
            index = least(room, lambda r: r.num_requests)
            placements.append((request, index))
            view = view.placed(index, request)
        return state, tuple(placements)
