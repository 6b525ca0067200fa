"""What a router sees: one immutable snapshot of every replica, built by the cluster before each
dispatch (``ClusterView``), and updated as the router places requests within one dispatch
(``ClusterView.placed``) so that a burst of arrivals is spread as the router means it to be.

Units: blocks are KV blocks of the replica's ``block_size`` tokens; queued tokens are prompt tokens
of requests dispatched to a replica that it has not started yet.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Callable, NamedTuple, Optional

from jaxserve.persistent import EMPTY_MAP
from jaxserve.request import Request


class ReplicaView(NamedTuple):
    """One replica as the router sees it. ``accepting`` is False while it drains or after it
    failed or was removed (routers never place on it); ``cached_prefix_blocks(request)`` counts
    the request's leading full prompt blocks the replica's prefix cache holds (0 without caching)."""

    index: int
    accepting: bool
    num_waiting: int
    num_running: int
    queued_tokens: int
    used_blocks: int
    num_blocks: int
    block_size: int
    num_high_priority: int  # requests on it with Request.priority < 0 (more urgent than the default)
    cached_prefix_blocks: Callable[[Request], int]
    draining: bool = False  # draining or being removed: its requests should leave (Llumnix scale-in)

    @property
    def num_requests(self) -> int:
        """Requests on the replica: waiting (including dispatched, not yet started) and running."""
        return self.num_waiting + self.num_running

    @property
    def queued_blocks(self) -> int:
        """KV blocks the queued prompts will need."""
        return -(-self.queued_tokens // self.block_size)

    @property
    def kv_load(self) -> float:
        """(used + queued blocks) / pool size: what least-KV routing compares."""
        return (self.used_blocks + self.queued_blocks) / self.num_blocks


class ClusterView(NamedTuple):
    """Every replica (index = position, including those not accepting), the time, and the output
    tokens each client has been served so far (for routers that account service)."""

    now: float
    replicas: tuple[ReplicaView, ...]
    served_tokens: Mapping[str, int] = EMPTY_MAP

    @property
    def accepting(self) -> tuple[ReplicaView, ...]:
        return tuple(filter(_ACCEPTING, self.replicas))  # (a router reads it at every arrival)

    def placed(self, index: int, request: Request) -> "ClusterView":
        """The view after ``request`` joins replica ``index``'s queue."""
        r = self.replicas[index]
        r = r._replace(num_waiting=r.num_waiting + 1, queued_tokens=r.queued_tokens + request.prompt_len)
        return self._replace(replicas=self.replicas[:index] + (r,) + self.replicas[index + 1 :])


_ACCEPTING = operator.attrgetter("accepting")


def no_cache(request: Request) -> int:
    """``cached_prefix_blocks`` of a replica without prefix caching."""
    return 0


def least(replicas, key) -> Optional[int]:
    """Index of the replica with the smallest ``key`` (ties: lowest index); None if there is none."""
    best = best_key = None
    for r in replicas:  # (one pass without a (key, index) tuple per replica: routers call it per arrival)
        k = key(r)
        if best is None or k < best_key or (k == best_key and r.index < best):
            best, best_key = r.index, k
    return best
