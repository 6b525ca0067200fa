"""``prefix_affinity``: send a request where its prompt's prefix is cached, unless load is too
uneven (the cache-aware policy of the SGLang router and llm-d's prefix scorer).

Match: a replica's match is the longest run of the request's leading full prompt blocks it holds,
counting both its real prefix cache (``ReplicaView.cached_prefix_blocks``) and the router's own
record of the prefixes it sent there (``state``: block key -> replicas), which covers requests
still queued there. Decision, as SGLang's router makes it:

1. imbalanced (max - min requests > ``balance_abs_threshold`` and max > ``balance_rel_threshold``
   x min): the shortest queue;
2. else, if the best match covers at least ``cache_threshold`` of the prompt: the best-matching
   replica (ties: the shorter queue);
3. else the shortest queue.

Block keys are ``kv.prefix_hash`` chain keys of ``block_size``-token blocks, so equal keys mean
equal prefixes. Requests with no prefix identity (length-only, no trace hash ids) match nothing.
The record keeps at most ``max_keys`` keys (``PrefixRecord``'s two generations).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import immutables

from jaxserve.cluster.routers.base import PerRequestRouter
from jaxserve.cluster.view import least
from jaxserve.kv.prefix_hash import prompt_block_hashes
from jaxserve.persistent import EMPTY_MAP


class PrefixRecord(NamedTuple):
    """Block key -> replica indices sent it, in two generations: when ``current`` reaches half of
    ``max_keys`` it becomes ``previous`` and the oldest generation is dropped (a bounded record
    with O(1) upkeep; a key seen in either counts)."""

    current: immutables.Map = EMPTY_MAP
    previous: immutables.Map = EMPTY_MAP

    def replicas(self, key) -> frozenset:
        return self.current.get(key) or self.previous.get(key) or frozenset()


@dataclasses.dataclass(frozen=True)
class PrefixAffinityRouter(PerRequestRouter):
    cache_threshold: float = 0.5
    balance_abs_threshold: int = 32
    balance_rel_threshold: float = 1.5
    block_size: int = 16
    max_keys: int = 200_000

    def __post_init__(self):
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {self.cache_threshold!r}")
        if self.balance_abs_threshold < 0 or self.balance_rel_threshold < 1.0:
            raise ValueError("balance_abs_threshold must be >= 0 and balance_rel_threshold >= 1")
        if self.block_size < 1 or self.max_keys < 1:
            raise ValueError("block_size and max_keys must be >= 1")

    def init_policy(self, num_replicas: int) -> PrefixRecord:
        return PrefixRecord()

    def choose(self, policy: PrefixRecord, view, request):
        accepting = view.accepting
        if not accepting:
            return policy, None
        shortest = least(accepting, lambda r: r.num_requests)
        keys = prompt_block_hashes(request, self.block_size)
        loads = [r.num_requests for r in accepting]
        imbalanced = max(loads) - min(loads) > self.balance_abs_threshold and max(loads) > self.balance_rel_threshold * min(loads)
        choice = shortest
        if keys and not imbalanced:
            matched = {r.index: self._matched(policy, r, keys, request) for r in accepting}
            best = least(accepting, lambda r: (-matched[r.index], r.num_requests))
            if matched[best] * self.block_size >= self.cache_threshold * request.prompt_len and matched[best] > 0:
                choice = best
        return self._record(policy, keys, choice), choice

    def _matched(self, policy: PrefixRecord, replica, keys, request) -> int:
        """Leading keys replica holds, by the router's record or (converted to its own block size,
        rounded down) by its real cache."""
        n = 0
        for key in keys:
            if replica.index not in policy.replicas(key):
                break
            n += 1
        real = replica.cached_prefix_blocks(request) * replica.block_size // self.block_size
        return max(n, real)

    def _record(self, policy: PrefixRecord, keys, index: int) -> PrefixRecord:
        if not keys:
            return policy
        current = policy.current.mutate()
        for key in keys:
            current[key] = policy.replicas(key) | {index}
        current = current.finish()
        if len(current) >= self.max_keys // 2:
            return PrefixRecord(EMPTY_MAP, current)
        return PrefixRecord(current, policy.previous)
