"""LoongServe's scheduling decisions on one node of elastic instances (SOSP'24 §5), as pure functions.

* **Dispatch** (``admit``): first come first served over the pending prefills; the head and those
  behind it are admitted while their prompts fit the node's free KV, less one slot per running
  request (its next decode token). The head is never skipped, so nothing starves behind a shorter
  request.
* **Elastic instance allocation** (``allocate_prefill_instances``): the fewest instances, least
  loaded with decoding KV first, whose free KV holds the admitted prompts; then one more at a time
  while the prefill time it saves, weighted by the prompts' Σ 1/l (input-normalized latency), beats
  the pause it forces on the decoding requests with KV there, weighted by Σ 1/generated tokens
  (output-normalized): the artifact's ``prefill_speedup < decode_slowdown`` test.
* **Scaling plan**: proactive scale-down (``place_kv``): a prefill batch writes each request's KV
  only to the fewest of its instances that hold it (the freest first, so many requests spread over
  the block), which decode it afterwards with no migration; instances left empty are free at once. Scale-up (``scale_up_target``): a decoding request whose
  master instance is full takes the freest other instance as its new master (multi-master decode
  over its shards). ``preemption_victim``: the newest arrival, when no instance has room.

A request's KV is a tuple of shards ``(instance, tokens)``; the last shard's instance is its master.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from jaxserve.cluster.esp_batching import PrefillTimeFn

Shards = tuple[tuple[int, int], ...]


class Resident(NamedTuple):
    """A prefilled request holding KV on the node: its shards and the weight a pause costs it (1/generated)."""

    request_id: str
    shards: Shards
    weight: float


def admit(prompt_lens: Sequence[int], free_tokens: int, num_running: int, max_requests: int) -> int:
    """How many of the pending prompts (FCFS order) to admit: the longest prefix of at most
    ``max_requests`` whose tokens fit ``free_tokens`` less one per running request."""
    budget, count = free_tokens - num_running, 0
    for n in prompt_lens[:max_requests]:
        if n > budget:
            break
        budget -= n
        count += 1
    return count


def _pause_sets(residents: Iterable[Resident], num_instances: int) -> list[set[int]]:
    """Per instance, the indices of the residents holding a shard there."""
    touching: list[set[int]] = [set() for _ in range(num_instances)]
    for r, resident in enumerate(residents):
        for inst, _ in resident.shards:
            touching[inst].add(r)
    return touching


def allocate_prefill_instances(used: Sequence[int], capacity: int, prompt_lens: Sequence[int],
                               residents: Sequence[Resident], time_fn: PrefillTimeFn) -> tuple[int, ...]:
    """The prefill instances for ``prompt_lens`` (module docstring), ordered freest first (the
    batching DP's block order); ``()`` when the whole node cannot hold them."""
    num_instances = len(used)
    lens = np.asarray(prompt_lens, np.float64)
    demand, n = float(lens.sum()), float(len(lens))
    pairs, urgency = float((lens * (lens + 1) / 2).sum()), float((1.0 / lens).sum())
    touching = _pause_sets(residents, num_instances)
    load = [sum(residents[r].weight for r in touching[i]) for i in range(num_instances)]
    order = sorted(range(num_instances), key=lambda i: (load[i], used[i], i))
    chosen: list[int] = []
    paused: set[int] = set()
    free = 0
    for i in order:
        if free >= demand and chosen:
            break
        chosen.append(i)
        paused |= touching[i]
        free += capacity - used[i]
    if free < demand:
        return ()
    for i in order[len(chosen):]:  # scale the prefill up while it pays
        now = float(time_fn(n, demand, pairs, len(chosen)))
        then = float(time_fn(n, demand, pairs, len(chosen) + 1))
        newly = touching[i] - paused
        if (now - then) * urgency <= then * sum(residents[r].weight for r in newly):
            break
        chosen.append(i)
        paused |= newly
    return tuple(sorted(chosen, key=lambda i: (-(capacity - used[i]), i)))


def place_kv(prompt_lens: Sequence[int], instances: Sequence[int], free_tokens: Sequence[int]) -> tuple[Shards, ...]:
    """Proactive scale-down: each prompt's KV shards on ``instances`` (with ``free_tokens`` free
    each), request by request on the freest instance at that point, spilling onto the next freest
    only when it is full: every request lands on as few instances as hold it, and a batch of many
    requests spreads its decoding over the block. ``ValueError`` if it does not fit."""
    room = {int(i): int(f) for i, f in zip(instances, free_tokens)}
    if sum(prompt_lens) > sum(room.values()):
        raise ValueError(f"prompts of {sum(prompt_lens)} tokens do not fit {sum(room.values())} free KV tokens")
    out = []
    for n in prompt_lens:
        left, shards = int(n), []
        for inst in sorted(room, key=lambda i: (-room[i], i)):
            take = min(left, room[inst])
            if take:
                shards.append((inst, take))
                room[inst] -= take
                left -= take
            if not left:
                break
        out.append(tuple(shards))
    return tuple(out)


def scale_up_target(used: Sequence[int], capacity: int, excluded: Iterable[int] = ()) -> int | None:
    """The instance a request whose master is full grows onto: the freest one not ``excluded``
    (busy prefilling), lowest index on ties; None when none has a free slot."""
    skip = set(excluded)
    best = None
    for i, u in enumerate(used):
        if i not in skip and u < capacity and (best is None or u < used[best]):
            best = i
    return best


def preemption_victim(arrival_order: Sequence[tuple[int, str]]) -> str:
    """The request to preempt (recompute later): the newest arrival among ``(arrival seq, id)``."""
    return max(arrival_order)[1]
