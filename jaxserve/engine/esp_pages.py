"""Where each KV block lives under elastic sequence parallelism: the engine's own page map.

The scheduler allocates *logical* blocks from one pool of ``num_devices * pages_per_device``
blocks, exactly as on one device; the BatchPlan is unchanged. This map binds each logical block,
when its first token is written, to one page of one device's pool (``esp_policy`` picks the device),
so a request's KV is a list of (device, token range) shards and a page lives on exactly one device.
A binding is dropped when no live request's block table holds the block any more (finished,
aborted, preempted, swapped out, or replaced by copy-on-write), which returns the page to its
device's free list. Since at most ``num_blocks`` logical blocks are in use, some device always has
a free page; the policy's scale-up finds it.

A prefill of degree ``k > 1`` also *stages* its new pages over ``k`` devices (zig-zag): the rows of
a staged page are written both to their destination page and to a per-step staging page on the
prefill device, which attends over them; staging pages (``stage_pages`` per device, after the pool)
are reused every step. The map is host-side, mutable state of one runner (like its caches).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from jaxserve.engine.esp_policy import EspPolicy, decode_shards, next_device, prefill_degree, prefill_group, zigzag_assignment
from jaxserve.plan import BatchPlan


class RowPages(NamedTuple):
    """Where one plan row's KV is: per block of its table up to this step's last token."""

    dest_dev: np.ndarray  # int32 [blocks]: the device holding block j
    dest_page: np.ndarray  # int32 [blocks]: its page in that device's pool
    stage_dev: np.ndarray  # int32 [blocks]: the prefill device staging block j this step, -1 if none
    stage_page: np.ndarray  # int32 [blocks]: the staging page there (pool size + i), -1 if none


@dataclasses.dataclass
class _Placement:
    """One request's ESP state: its planned decode shards and pages placed per device."""

    prompt_len: int
    max_total_tokens: int
    degree: int | None  # an explicit prefill degree, or None (the policy decides)
    shards: tuple[tuple[int, int], ...] = ()
    placed: list[int] = dataclasses.field(default_factory=list)


class EspPages:
    """See the module docstring. ``pages_per_device`` pages in each of ``num_devices`` pools, plus
    ``stage_pages`` staging pages per device."""

    def __init__(self, num_devices: int, pages_per_device: int, stage_pages: int, page_size: int, policy: EspPolicy):
        self.num_devices, self.pages_per_device = num_devices, pages_per_device
        self.stage_pages, self.page_size, self.policy = stage_pages, page_size, policy
        self._free = [list(range(pages_per_device - 1, -1, -1)) for _ in range(num_devices)]  # pop() -> page 0 first
        self.binding: dict[int, tuple[int, int]] = {}  # logical block -> (device, page)
        self._owners: dict[int, set[str]] = {}  # logical block -> live requests whose tables hold it
        self._tables: dict[str, tuple[int, ...]] = {}
        self._requests: dict[str, _Placement] = {}
        self.num_scale_ups = 0  # pages placed on a device outside the request's decode plan

    # -- requests -----------------------------------------------------------------------------
    def register(self, request_id: str, prompt_len: int, max_total_tokens: int) -> None:
        old = self._requests.get(request_id)
        self._requests[request_id] = _Placement(prompt_len, max_total_tokens, old.degree if old else None)

    def set_prefill_degree(self, request_id: str, degree: int | None) -> None:
        """An explicit prefill degree for a registered request (None: back to the policy's)."""
        prefill_degree(self.policy, 1, self.num_devices, degree)  # validates
        self._requests[request_id].degree = degree

    def release(self, request_id: str) -> None:
        """The request left: its pages go back to their devices (those no other live table holds)."""
        self._drop_table(request_id)
        self._requests.pop(request_id, None)

    def drop_kv(self, request_id: str) -> None:
        """The request's blocks were freed while it stays registered (preempted or swapped out):
        free its pages and plan its placement afresh when it runs again."""
        self._drop_table(request_id)
        p = self._requests.get(request_id)
        if p is not None:
            p.shards, p.placed = (), []

    # -- queries ------------------------------------------------------------------------------
    def free_pages(self) -> list[int]:
        """Free pages per device."""
        return [len(f) for f in self._free]

    def decode_devices(self, request_id: str) -> tuple[int, ...]:
        """The devices of the request's decode plan, scale-ups included, in plan order."""
        return tuple(d for d, _ in self._placement(request_id).shards)

    def shards_of(self, request_id: str) -> list[tuple[int, int, int]]:
        """``(device, first token, end token)`` runs of the request's KV in table order (its shards)."""
        runs, ps = [], self.page_size
        for j, b in enumerate(self._tables.get(request_id, ())):
            if b not in self.binding:
                break
            d = self.binding[b][0]
            if runs and runs[-1][0] == d:
                runs[-1] = (d, runs[-1][1], (j + 1) * ps)
            else:
                runs.append((d, j * ps, (j + 1) * ps))
        return runs

    def where(self, block: int) -> tuple[int, int]:
        """``(device, page)`` of a bound logical block; ``ValueError`` naming it otherwise."""
        try:
            return self.binding[block]
        except KeyError:
            raise ValueError(
                f"KV block {block} holds no KV on any ESP device (never written, or freed: the ESP "
                "engine keeps no prefix cache)"
            ) from None

    # -- binding ------------------------------------------------------------------------------
    def bind(self, block: int, device: int) -> tuple[int, int]:
        """Binds an unbound logical block to a free page of ``device``."""
        if block in self.binding:
            raise ValueError(f"KV block {block} is already on device {self.binding[block][0]}")
        if not self._free[device]:
            raise ValueError(f"ESP device {device} has no free KV page")
        self.binding[block] = where = (device, self._free[device].pop())
        return where

    def bind_anywhere(self, block: int, near: int | None = None) -> tuple[int, int]:
        """Binds ``block`` on device ``near`` if it has a free page, else on the emptiest device."""
        free = self.free_pages()
        device = near if near is not None and free[near] > 0 else next_device((), [0] * len(free), free)
        return self.bind(block, device)

    def _unbind_if_orphan(self, block: int) -> None:
        if not self._owners.get(block) and block in self.binding:
            device, page = self.binding.pop(block)
            self._free[device].append(page)
            self._owners.pop(block, None)

    def _drop_table(self, request_id: str) -> None:
        for b in self._tables.pop(request_id, ()):
            self._owners.get(b, set()).discard(request_id)
            self._unbind_if_orphan(b)

    def _set_table(self, request_id: str, table: tuple[int, ...]) -> None:
        old = self._tables.get(request_id, ())
        if old == table:
            return
        self._tables[request_id] = table
        for b in table:
            self._owners.setdefault(b, set()).add(request_id)
        for b in set(old) - set(table):  # replaced by copy-on-write
            self._owners.get(b, set()).discard(request_id)
            self._unbind_if_orphan(b)

    def _placement(self, request_id: str) -> _Placement:
        try:
            return self._requests[request_id]
        except KeyError:
            raise ValueError(f"request {request_id!r} is not registered with the ESP runner") from None

    def _bind_new(self, request_id: str, block: int) -> tuple[int, int]:
        """Binds a block whose first token is written now, by the request's decode placement."""
        p = self._placement(request_id)
        free = self.free_pages()
        if not p.shards:  # first pages of the request: proactive scale-down plan
            need = -(-p.max_total_tokens // self.page_size)
            p.shards, p.placed = decode_shards(self.policy, need, free), [0] * self.num_devices
        device = next_device(p.shards, p.placed, free)
        if device not in (d for d, _ in p.shards):  # scale-up: the device joins the decode set
            p.shards = p.shards + ((device, 1),)
            self.num_scale_ups += 1
        p.placed[device] += 1
        return self.bind(block, device)

    def prepare(self, plan: BatchPlan) -> list[RowPages]:
        """Records the plan's block tables, binds the blocks written for the first time this step and
        assigns staging pages to prefill chunks of degree > 1; returns each plan row's pages."""
        ps, rows, staged = self.page_size, [], [0] * self.num_devices
        n_new, n_done = plan.num_new_tokens.tolist(), plan.num_computed_tokens.tolist()
        for rid, table in zip(plan.request_ids, plan.block_tables):
            self._set_table(rid, tuple(int(b) for b in table))
        for rid, c, n, table in zip(plan.request_ids, n_done, n_new, plan.block_tables):
            used = -(-(c + n) // ps)
            dest = np.zeros((2, used), np.int32)
            for j in range(used):
                b = int(table[j])
                if b not in self.binding:
                    if j * ps < c:
                        self.where(b)  # raises: its tokens should already be in KV
                    self._bind_new(rid, b)
                dest[:, j] = self.binding[b]
            stage = np.full((2, used), -1, np.int32)
            p = self._placement(rid)
            k = prefill_degree(self.policy, p.prompt_len, self.num_devices, p.degree)
            if n > 1 and k > 1:
                first = c // ps
                group = prefill_group(k, [d for d, _ in p.shards], self.num_devices)
                for j, d in zip(range(first, used), zigzag_assignment(used - first, group)):
                    if d != dest[0, j] and staged[d] < self.stage_pages:
                        stage[:, j] = (d, self.pages_per_device + staged[d])
                        staged[d] += 1
            rows.append(RowPages(dest[0], dest[1], stage[0], stage[1]))
        return rows

    def check_invariants(self) -> None:
        """Every page is free or bound to exactly one block, and every bound block has an owner
        (tests call this)."""
        for d in range(self.num_devices):
            bound = sorted(p for dev, p in self.binding.values() if dev == d)
            if sorted(bound + self._free[d]) != list(range(self.pages_per_device)):
                raise AssertionError(f"device {d}: pages bound {bound} and free {sorted(self._free[d])} overlap or leak")
        orphans = [b for b in self.binding if not self._owners.get(b)]
        if orphans:
            raise AssertionError(f"blocks {orphans} are bound but no live request holds them")

