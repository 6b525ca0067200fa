"""The LoongServe node: elastic instances on one clock, driven by the ESP policy (``esp_policy``,
``esp_batching``) and costed by ``EspCostModel``; writes the same ``EventLog`` as every replica.

Iteration structure (the artifact's macro iterations, simplified):

* When no prefill is in flight and the decode group is between steps, pending prompts are
  dispatched (FCFS admission), given instances (elastic allocation), batched (the DP) and started
  at once, each batch on its block; their KV shards are placed then (proactive scale-down) and
  reserved. Prefilled requests whose KV sits on a block in flight pause until it finishes.
* The other prefilled requests decode as one group, step after step, in lockstep over the
  instances holding their KV (multi-master decode); new arrivals wait for the next step boundary
  after every batch of the current macro iteration has finished.
* Before a decode step each request needs one KV slot on its master; a full master scales the
  request up onto the freest instance not prefilling; with no room anywhere the newest request is
  preempted (KV freed, recomputed later from the head of the queue, prompt plus generated tokens).

KV is counted in tokens per instance (LoongServe allocates token slots, as LightLLM does). A
request holds ``prompt + generated - 1`` KV tokens while it decodes.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple, Optional

import numpy as np

from jaxserve.cluster import esp_policy as policy
from jaxserve.cluster.esp_batching import plan_prefill_batches
from jaxserve.request import Request
from jaxserve.runtime import EventLog, Progress, ProgressHook
from jaxserve.sim.esp_cost_model import EspCostModel


@dataclasses.dataclass(frozen=True)
class EspSettings:
    """``capacity_tokens``: KV token slots per instance; ``max_prefill_requests``: most prompts one
    macro iteration admits (bounds the DP); ``max_context``: longest prompt + output served."""

    capacity_tokens: int
    max_prefill_requests: int = 64
    max_context: int = 1 << 62
    max_sim_time_s: float = float("inf")

    def __post_init__(self):
        for name in ("capacity_tokens", "max_prefill_requests", "max_context"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EspSettings.{name} must be an int >= 1, got {value!r}")


@dataclasses.dataclass
class EspStats:
    """Which paths a run took (tests assert them) and what the scaling plan did."""

    macro_iterations: int = 0
    prefill_batches: int = 0
    multi_batch_plans: int = 0  # macro iterations the DP split into more than one batch
    scale_downs: int = 0  # batches whose KV landed on fewer instances than computed it
    scale_ups: int = 0  # decode steps where a request's master moved to another instance
    preemptions: int = 0
    decode_steps: int = 0
    peak_used: tuple[int, ...] = ()  # per instance, the most KV tokens ever held


class StepRecord(NamedTuple):
    """The fields ``EventLog.record`` reads of a plan: one prefill batch or one decode step."""

    request_ids: tuple[str, ...]
    samples_token: np.ndarray
    num_tokens: int
    num_prefill_tokens: int
    num_seqs: int
    preempted: tuple[str, ...] = ()
    swapped_out: tuple[str, ...] = ()


class Finished(NamedTuple):
    request_id: str
    finish_reason: str


@dataclasses.dataclass
class _Live:
    request: Request
    seq: int  # arrival order
    generated: int = 0
    shards: list = dataclasses.field(default_factory=list)  # [[instance, tokens], ...]; the last is the master
    paused_until: float = 0.0

    @property
    def known_tokens(self) -> int:  # what a (re)computing prefill processes
        return self.request.prompt_len + self.generated


class _Inflight(NamedTuple):
    start: float
    end: float
    lives: tuple
    instances: tuple[int, ...]
    tokens: int


class _Decode(NamedTuple):
    start: float
    end: float
    lives: tuple
    preempted: tuple[str, ...]


class EspNode:
    """One node of ``cost.num_instances`` elastic instances; ``run`` serves requests once."""

    def __init__(self, cost: EspCostModel, settings: EspSettings, check: bool = False):
        self.cost, self.settings, self.check = cost, settings, check
        self.num_instances = cost.num_instances
        self.capacity = settings.capacity_tokens
        self.used = [0] * self.num_instances
        self.busy_until = [0.0] * self.num_instances  # each instance runs one step at a time
        self.stats = EspStats(peak_used=(0,) * self.num_instances)
        self.log = EventLog()
        self.pending: deque[_Live] = deque()
        self.running: dict[str, _Live] = {}
        self.inflight: list[_Inflight] = []
        self.decode: Optional[_Decode] = None
        self.num_done = 0

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, requests: Sequence[Request], on_progress: Optional[ProgressHook] = None) -> EventLog:
        arrivals = sorted(requests, key=lambda r: r.arrival_time)
        next_arrival, t, events = 0, 0.0, 0
        while True:
            times = [e.end for e in self.inflight]
            if self.decode is not None:
                times.append(self.decode.end)
            if next_arrival < len(arrivals):
                times.append(arrivals[next_arrival].arrival_time)
            if not times:
                break
            t = max(t, min(times))
            if t > self.settings.max_sim_time_s:
                break
            while next_arrival < len(arrivals) and arrivals[next_arrival].arrival_time <= t:
                self._arrive(arrivals[next_arrival], next_arrival)
                next_arrival += 1
            for done in sorted((e for e in self.inflight if e.end <= t), key=lambda e: e.end):
                self._finish_prefill(done)
            if self.decode is not None and self.decode.end <= t:
                self._finish_decode(self.decode)
            if self.decode is None:
                for _ in range(2):  # a second round when a step's preemptions left nothing running
                    if not self.inflight and self.pending:
                        self._dispatch(t)
                    self._start_decode(t)
                    if self.decode is not None or self.inflight or not self.pending:
                        break
            if self.pending and not self.inflight and self.decode is None and not self.running:
                raise RuntimeError("LoongServe node stalled: pending prompts fit nowhere with nothing running")
            events += 1
            if on_progress is not None and events % 1000 == 0:
                steps = self.stats.decode_steps + self.stats.prefill_batches
                on_progress(Progress(t, steps, self.num_done, len(arrivals)))
        return self.log

    # -- events ----------------------------------------------------------------------------------
    def _arrive(self, request: Request, seq: int) -> None:
        self.log.add_request(request, request.arrival_time)
        total = request.prompt_len + request.sampling.max_new_tokens
        if total > self.settings.max_context:
            self.log.reject(request.request_id, f"prompt + max_new_tokens = {total} exceeds the context {self.settings.max_context}")
            self.num_done += 1
        elif total > self.capacity * self.num_instances:
            self.log.reject(request.request_id, f"prompt + max_new_tokens = {total} exceeds the node's KV "
                                                f"({self.num_instances} x {self.capacity} tokens)")  # fmt: skip
            self.num_done += 1
        else:
            self.pending.append(_Live(request, seq))

    def _dispatch(self, t: float) -> None:
        lens = [live.known_tokens for live in self.pending]
        count = policy.admit(lens, self._free_total(), len(self.running), self.settings.max_prefill_requests)
        if not count:
            return
        admitted = [self.pending.popleft() for _ in range(count)]
        lens = lens[:count]
        residents = [policy.Resident(rid, tuple((i, n) for i, n in live.shards), 1.0 / max(live.generated, 1))
                     for rid, live in self.running.items()]  # fmt: skip
        time_fn = self.cost.prefill_time_s
        instances = policy.allocate_prefill_instances(self.used, self.capacity, lens, residents, time_fn)
        free = [self.capacity - self.used[i] for i in instances]
        plan = plan_prefill_batches(lens, instances, free, time_fn)
        self.stats.macro_iterations += 1
        self.stats.prefill_batches += len(plan.batches)
        self.stats.multi_batch_plans += len(plan.batches) > 1
        for batch in plan.batches:
            lives = admitted[batch.first:batch.stop]
            batch_lens = lens[batch.first:batch.stop]
            block_free = [self.capacity - self.used[i] for i in batch.instances]
            placed = policy.place_kv(batch_lens, batch.instances, block_free)
            for live, shards in zip(lives, placed):
                live.shards = [[i, n] for i, n in shards]
                for i, n in shards:
                    self._take(i, n)
            holders = {i for shards in placed for i, _ in shards}
            self.stats.scale_downs += len(holders) < len(batch.instances)
            end = t + batch.time_s
            self._occupy(batch.instances, t, end)
            self.inflight.append(_Inflight(t, end, tuple(lives), batch.instances, sum(batch_lens)))
            block = set(batch.instances)
            for live in self.running.values():  # decoding KV on this block waits for it
                if any(i in block for i, _ in live.shards):
                    live.paused_until = max(live.paused_until, end)

    def _finish_prefill(self, done: _Inflight) -> None:
        self.inflight.remove(done)
        finished = []
        for live in done.lives:
            live.generated += 1
            if live.generated >= live.request.sampling.max_new_tokens:
                finished.append(self._retire(live))
            else:
                self.running[live.request.request_id] = live
        ids = tuple(live.request.request_id for live in done.lives)
        record = StepRecord(ids, np.ones(len(ids), bool), done.tokens, done.tokens, len(ids))
        self._record(record, done.start, done.end - done.start, finished, min(done.instances))

    def _start_decode(self, t: float) -> None:
        group = sorted((live for live in self.running.values() if live.paused_until <= t), key=lambda live: live.seq)
        if not group:
            return
        busy = {i for e in self.inflight for i in e.instances}
        preempted: list[str] = []
        ready: list[_Live] = []
        queue = deque(group)
        while queue:  # oldest first: each needs one KV slot for its new token
            live = queue.popleft()
            slot = self._slot_for(live, busy)
            while slot is None:  # no room anywhere: preempt the newest until it fits
                victim = self.running[policy.preemption_victim([(v.seq, v.request.request_id) for v in (*ready, *queue, live)])]
                self._preempt(victim, ready, queue)
                preempted.append(victim.request.request_id)
                if victim is live:
                    break
                slot = self._slot_for(live, busy)
            if slot is None:
                continue
            if slot != live.shards[-1][0]:  # scale up: a new master shard on another instance
                live.shards.append([slot, 0])
                self.stats.scale_ups += 1
            self._take(slot, 1)
            live.shards[-1][1] += 1
            ready.append(live)
        if not ready:
            if preempted:  # everyone was preempted: the queue head restarts at the next dispatch
                self._record(StepRecord((), np.zeros(0, bool), 0, 0, 0, tuple(preempted)), t, 0.0, [], 0)
            return
        duration = self._decode_time(ready)
        self._occupy({i for live in ready for i, _ in live.shards}, t, t + duration)
        self.decode = _Decode(t, t + duration, tuple(ready), tuple(preempted))

    def _slot_for(self, live: _Live, busy: set[int]) -> Optional[int]:
        """Where ``live``'s next token's KV goes: its master if it has room, else the scale-up target."""
        master = live.shards[-1][0]
        if self.used[master] < self.capacity:
            return master
        return policy.scale_up_target(self.used, self.capacity, busy)

    def _decode_time(self, lives: Sequence[_Live]) -> float:
        """The group's step: KV before the step (the slot just reserved is this step's new token)."""
        k = self.num_instances
        masters, kv, exchanges = np.zeros(k), np.zeros(k), np.zeros(k)
        for live in lives:
            masters[live.shards[-1][0]] += 1
            for inst, n in live.shards:
                kv[inst] += n
            kv[live.shards[-1][0]] -= 1
            remote = len(live.shards) - 1
            if remote:
                exchanges[live.shards[-1][0]] += remote
                for inst, _ in live.shards[:-1]:
                    exchanges[inst] += 1
        used = (masters > 0) | (kv > 0)
        return self.cost.decode_time_s(masters[used], kv[used], exchanges[used])

    def _finish_decode(self, step: _Decode) -> None:
        self.decode = None
        self.stats.decode_steps += 1
        replica = min(live.shards[-1][0] for live in step.lives)  # before retiring frees the shards
        finished = []
        for live in step.lives:
            live.generated += 1
            if live.generated >= live.request.sampling.max_new_tokens:
                finished.append(self._retire(live))
        ids = tuple(live.request.request_id for live in step.lives)
        record = StepRecord(ids, np.ones(len(ids), bool), len(ids), 0, len(ids), step.preempted)
        self._record(record, step.start, step.end - step.start, finished, replica)

    # -- KV bookkeeping --------------------------------------------------------------------------
    def _take(self, instance: int, tokens: int) -> None:
        self.used[instance] += tokens
        if self.used[instance] > self.capacity:
            raise AssertionError(f"instance {instance} over-committed: {self.used[instance]} > {self.capacity} KV tokens")
        if self.check and self.used[instance] > self.stats.peak_used[instance]:
            peak = list(self.stats.peak_used)
            peak[instance] = self.used[instance]
            self.stats.peak_used = tuple(peak)

    def _occupy(self, instances, start: float, end: float) -> None:
        for i in instances:
            if self.busy_until[i] > start:
                raise AssertionError(f"instance {i} starts a step at {start} while busy until {self.busy_until[i]}")
            self.busy_until[i] = end

    def _free(self, live: _Live) -> None:
        for inst, n in live.shards:
            self.used[inst] -= n
        live.shards = []

    def _retire(self, live: _Live) -> Finished:
        self._free(live)
        self.running.pop(live.request.request_id, None)
        self.num_done += 1
        return Finished(live.request.request_id, "length")

    def _preempt(self, victim: _Live, ready: list, queue: deque) -> None:
        """Recompute preemption: the victim's KV (and a slot it reserved this step) is freed and it
        goes back to the pending queue in arrival order, ahead of anything that arrived after it."""
        if victim in ready:
            ready.remove(victim)
        if victim in queue:
            queue.remove(victim)
        self._free(victim)
        self.running.pop(victim.request.request_id)
        self.stats.preemptions += 1
        position = sum(1 for p in self.pending if p.seq < victim.seq)
        self.pending.insert(position, victim)

    def _free_total(self) -> int:
        return self.capacity * self.num_instances - sum(self.used)

    def _record(self, record: StepRecord, start: float, duration: float, finished, replica: int) -> None:
        usage = sum(self.used) / (self.capacity * self.num_instances)
        self.log.record(record, start, duration, 0.0, len(self.pending), len(self.running), usage, finished, replica)

