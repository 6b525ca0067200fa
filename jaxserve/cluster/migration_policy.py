"""Which running requests to migrate, and where: Llumnix's global scheduling policy, pure.

Every tick the cluster hands the policy its view, each replica's migratable requests and the
replicas already busy migrating; the policy returns ``(request, source, destination)`` moves.
Llumnix (Sun et al., OSDI'24 §4.4) pairs the least free instances with the freest, one migration
at a time per instance, where freeness ``F = (M - virtual usage) / batch size`` counts
  * the blocks in use and the queued prompts' demand (load balancing, de-fragmentation: a replica
    whose queue cannot start looks full),
  * ``headroom_blocks`` per high-priority request (``Request.priority < 0``) on it (priority
    isolation: normal requests are moved away so high-priority ones keep room to decode), and
  * infinite usage on a draining replica (scale-in: everything on it leaves).
From a source it moves a normal-priority request before a high-priority one, then the one with
the fewest tokens (the cheapest copy), as Llumnix does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import NamedTuple

from jaxserve.cluster.routers.freeness import freeness
from jaxserve.cluster.view import ClusterView

Move = tuple[str, int, int]  # (request id, source replica, destination replica)


class Candidate(NamedTuple):
    """A decoding request a replica could give away."""

    request_id: str
    num_tokens: int  # tokens with KV (what a live migration copies)
    priority: int  # Request.priority (< 0: high priority)


@dataclasses.dataclass(frozen=True)
class LlumnixPolicy:
    """Sources: replicas with freeness below ``source_below`` (and every draining replica);
    destinations: accepting replicas with freeness above ``destination_above``; the least free
    source is paired with the freest destination, and so on."""

    source_below: float = 0.0
    destination_above: float = 8.0
    headroom_blocks: int = 0

    def __post_init__(self):
        if not self.destination_above > self.source_below:
            raise ValueError(f"destination_above ({self.destination_above}) must exceed source_below "
                             f"({self.source_below}): a replica would migrate to itself")
        if not isinstance(self.headroom_blocks, int) or self.headroom_blocks < 0:
            raise ValueError(f"headroom_blocks must be an int >= 0, got {self.headroom_blocks!r}")

    def freeness(self, replica, draining: bool) -> float:
        return -math.inf if draining else freeness(replica, self.headroom_blocks)

    def plan(self, view: ClusterView, candidates: Mapping[int, tuple[Candidate, ...]], busy: frozenset) -> tuple[Move, ...]:
        """``candidates[i]``: replica i's migratable requests (looked up only for sources)."""
        scored = [(self.freeness(r, r.draining), r) for r in view.replicas if r.index in candidates and r.index not in busy]
        sources = sorted(((f, r.index) for f, r in scored if (f < self.source_below or r.draining) and candidates[r.index]))
        dests = sorted(((-f, r.index) for f, r in scored if r.accepting and f > self.destination_above))
        moves = []
        for (_, src), (_, dst) in zip(sources, dests):
            if src == dst:
                continue
            pick = min(candidates[src], key=lambda c: (c.priority < 0, c.num_tokens, c.request_id))
            moves.append((pick.request_id, src, dst))
        return tuple(moves)
