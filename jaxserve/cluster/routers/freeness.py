"""``freeness``: Llumnix's dispatch (Sun et al., OSDI'24): the accepting replica with the most
freeness ``F = (M - sum of virtual usage) / B``, M its KV blocks, B its batch size (at least 1).

Virtual usage here is the blocks in use plus the blocks its queued prompts need (Llumnix counts a
queued request's demand, so a replica whose queue cannot start looks full) and
``headroom_blocks`` per high-priority request on it (``Request.priority < 0``: the headroom Llumnix
reserves so high-priority requests keep decoding); a draining replica's usage is infinite, i.e.
it is not accepting. F can be negative: an overloaded replica is less free the more it queues.
"""

from __future__ import annotations

import dataclasses

from jaxserve.cluster.routers.base import PerRequestRouter
from jaxserve.cluster.view import ReplicaView


def freeness(r: ReplicaView, headroom_blocks: int = 0) -> float:
    usage = r.used_blocks + r.queued_blocks + headroom_blocks * r.num_high_priority
    return (r.num_blocks - usage) / max(1, r.num_running)


@dataclasses.dataclass(frozen=True)
class FreenessRouter(PerRequestRouter):
    headroom_blocks: int = 0

    def __post_init__(self):
        if not isinstance(self.headroom_blocks, int) or self.headroom_blocks < 0:
            raise ValueError(f"headroom_blocks must be an int >= 0, got {self.headroom_blocks!r}")

    def choose(self, policy, view, request):
        best = max(view.accepting, key=lambda r: (freeness(r, self.headroom_blocks), -r.index), default=None)
        return policy, None if best is None else best.index
