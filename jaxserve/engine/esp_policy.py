"""LoongServe's elastic sequence parallelism (ESP): the pure policy that picks, per request and per
phase, how many devices work on it and where its KV pages go.

* **Prefill degree** (``prefill_degree``): a prompt of ``L`` tokens is prefilled across
  ``k = min(sp, ceil(L / prefill_tokens_per_device))`` devices (1 for a short prompt); an explicit
  per-request degree overrides it. The prefill's attention over its own new tokens is split over
  those ``k`` devices (``prefill_group``).
* **Decode placement** (``decode_shards``): proactive scale-down. The request's KV (prompt and
  ``max_new_tokens``) goes to as few devices as can hold it, most free pages first, each taking at
  most ``decode_pages_per_device`` pages; the prefill writes its KV straight into those devices'
  pages, so nothing migrates when decode starts.
* **Scale-up** (``next_device``): a new page goes to the first planned device that still has a free
  page; when none has (the pools filled up meanwhile), to the device with the most free pages, which
  joins the request's decode set (multi-master decode from then on).

Every function is pure: free-page counts in, device ids out; ties go to the lower device id.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class EspPolicy:
    """``prefill_tokens_per_device``: prompt tokens each prefill device takes (a prompt at most this
    long is prefilled on one device). ``decode_pages_per_device``: the most pages of one request a
    device is planned to hold (None: as many as it has free), which spreads a long request's decode
    over several devices."""

    prefill_tokens_per_device: int = 1024
    decode_pages_per_device: int | None = None

    def __post_init__(self):
        if not isinstance(self.prefill_tokens_per_device, int) or self.prefill_tokens_per_device < 1:
            raise ValueError(f"prefill_tokens_per_device must be an int >= 1, got {self.prefill_tokens_per_device!r}")
        cap = self.decode_pages_per_device
        if cap is not None and (not isinstance(cap, int) or cap < 1):
            raise ValueError(f"decode_pages_per_device must be None or an int >= 1, got {cap!r}")


def prefill_degree(policy: EspPolicy, prompt_len: int, num_devices: int, explicit: int | None = None) -> int:
    """Devices the prefill of a ``prompt_len``-token prompt runs on, in ``[1, num_devices]``;
    ``explicit`` (a per-request choice) wins. Raises ``ValueError`` for an explicit degree outside
    that range."""
    if explicit is not None:
        if not 1 <= explicit <= num_devices:
            raise ValueError(f"prefill degree must be in [1, {num_devices}] (the ESP devices), got {explicit}")
        return explicit
    return max(1, min(num_devices, math.ceil(prompt_len / policy.prefill_tokens_per_device)))


def prefill_group(k: int, decode_devices: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """The ``k`` devices a prefill runs on: its decode devices first (the new tokens they will keep
    need no staging copy), then the others in id order."""
    order = list(dict.fromkeys(decode_devices)) + [d for d in range(num_devices) if d not in decode_devices]
    return tuple(order[:k])


def decode_shards(policy: EspPolicy, pages_needed: int, free: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Proactive scale-down: ``(device, pages)`` for a request that will need ``pages_needed`` pages,
    given each device's ``free`` pages: devices with the most free pages first, each planned for at
    most ``decode_pages_per_device`` pages, until the need is covered (or every device is used: the
    rest is left to ``next_device``'s scale-up)."""
    cap = policy.decode_pages_per_device or max(max(free, default=0), 1)
    shards, left = [], pages_needed
    for d in sorted(range(len(free)), key=lambda d: (-free[d], d)):
        if left <= 0:
            break
        take = min(left, cap, free[d])
        if take > 0:
            shards.append((d, take))
            left -= take
    if left > 0 and not shards:  # nothing free now: plan the emptiest device, scale up later
        shards.append((min(range(len(free)), key=lambda d: (-free[d], d)), left))
    return tuple(shards)


def next_device(shards: Sequence[tuple[int, int]], placed: Sequence[int], free: Sequence[int]) -> int:
    """The device of a request's next page: the first shard ``(device, planned pages)`` that has
    fewer than planned pages placed there (``placed[device]``) and a free page; else (scale-up) the
    device with the most free pages. Raises ``ValueError`` when no device has a free page."""
    for d, planned in shards:
        if placed[d] < planned and free[d] > 0:
            return d
    best = min(range(len(free)), key=lambda d: (-free[d], d))
    if free[best] <= 0:
        raise ValueError("no ESP device has a free KV page (the scheduler planned more blocks than exist)")
    return best


def zigzag_assignment(num_blocks: int, group: Sequence[int]) -> list[int]:
    """The prefill device of each of a chunk's ``num_blocks`` new pages over ``group`` (``k``
    devices): the chunk is cut into ``2k`` runs of pages and device ``i`` takes runs ``i`` and
    ``2k-1-i`` (``parallel.zigzag``'s layout), so the causal work is balanced across the group."""
    k = len(group)
    run = max(1, math.ceil(num_blocks / (2 * k)))
    owner = []
    for b in range(num_blocks):
        r = min(b // run, 2 * k - 1)
        owner.append(group[r if r < k else 2 * k - 1 - r])
    return owner
