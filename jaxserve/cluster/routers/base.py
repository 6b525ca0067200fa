"""The router protocol: a pure policy that places requests on replicas.

A router's memory is one immutable ``state`` (``init(num_replicas)``), which also holds the requests
waiting at the router: ``submit(state, request)`` queues an arrival, ``dispatch(state, view)``
returns the placements it makes now, ``(request, replica index)`` pairs, each on an accepting
replica and each request at most once. Requests it does not place stay queued until a later
dispatch (a router may hold work back, as fair dispatch does); ``pending(state)`` lists them,
oldest first, and ``has_pending(state)`` says cheaply whether there are any (the cluster dispatches
only then). Routers are frozen dataclasses of options, so the same inputs give the same
placements.

Most policies place every request on arrival by a per-request choice: ``PerRequestRouter`` turns
``choose(state, view, request) -> (state, index)`` into a router, updating the view after each
placement (``ClusterView.placed``) so that simultaneous arrivals see each other.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple, Optional, Protocol

from jaxserve.cluster.view import ClusterView
from jaxserve.request import Request

Placements = tuple[tuple[Request, int], ...]


class Router(Protocol):
    accounts_service: bool  # the cluster fills ClusterView.served_tokens only for routers that read it

    def init(self, num_replicas: int) -> Any: ...

    def submit(self, state: Any, request: Request) -> Any: ...

    def dispatch(self, state: Any, view: ClusterView) -> tuple[Any, Placements]: ...

    def pending(self, state: Any) -> tuple[Request, ...]: ...

    def has_pending(self, state: Any) -> bool: ...


class QueuedState(NamedTuple):
    """A per-request router's state: its policy's own memory and the arrivals not yet placed."""

    policy: Any
    pending: tuple[Request, ...] = ()


class PerRequestRouter(abc.ABC):
    """Places each queued request, oldest first, on the replica ``choose`` picks (None: keep it)."""

    accounts_service = False

    def init(self, num_replicas: int) -> QueuedState:
        return QueuedState(self.init_policy(num_replicas))

    def init_policy(self, num_replicas: int) -> Any:
        return None

    @abc.abstractmethod
    def choose(self, policy: Any, view: ClusterView, request: Request) -> tuple[Any, Optional[int]]:
        """The accepting replica for ``request``, or None to keep it queued; and the new memory."""

    def submit(self, state: QueuedState, request: Request) -> QueuedState:
        return state._replace(pending=state.pending + (request,))

    def pending(self, state: QueuedState) -> tuple[Request, ...]:
        return state.pending

    def has_pending(self, state: QueuedState) -> bool:
        return bool(state.pending)

    def dispatch(self, state: QueuedState, view: ClusterView) -> tuple[QueuedState, Placements]:
        policy, placements, kept = state.policy, [], []
        last = len(state.pending) - 1
        for k, request in enumerate(state.pending):
            policy, index = self.choose(policy, view, request) if view.accepting else (policy, None)
            if index is None:
                kept.append(request)
                continue
            placements.append((request, index))
            if k < last:  # (the next request sees this one placed)
                view = view.placed(index, request)
        return QueuedState(policy, tuple(kept)), tuple(placements)
