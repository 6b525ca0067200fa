"""The simulator's fast loop: ``run_replica`` for the common case, on counts and mutable state.

``run_replica`` drives a pure scheduler, whose state is a persistent value rebuilt at every step;
that generality (any policy, prefix caching, swapping, migration, engines) costs ~130-150 µs of
CPU per simulated step. Here the built-in ``vllm`` and ``sarathi`` policies (their exact classes)
with the FCFS order, no prefix cache, recompute preemption and the roofline cost model run in one
loop over mutable plain-Python state that keeps token and block *counts* per request (a
simulation never reads block ids). The decoding rows form a *cohort* that gains one token per
decode step, advanced lazily: a global decode counter ``T``, each row's counts stored relative to
it, a histogram of the rows by the step at which they next need a block (``T`` modulo the block
size) and a heap of the counters at which they finish. A step then costs O(1) plus the rows it
admits, completes or retires, instead of O(rows). Steps the cohort cannot take that way (the
decodes need more blocks than are free, so rows are preempted, or the token budget cannot cover
every decode) go through ``_explicit_step``, a row-by-row port of ``StepBuilder``'s moves.

The event log equals ``run_replica``'s bit for bit (tests/sim/test_fast_loop.py compares whole
logs on random workloads): the same steps, the same floats (each step costed by
``RooflineCostModel.combine`` of its plan's integer totals, summed as ``parts`` sums them), the
same per-request records. ``why_not_fast`` says why a run is not eligible;
``jaxserve.sim.simulate.run_sim`` then uses ``run_replica``.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import heapq
import math
from collections.abc import Sequence
from typing import Optional

import numpy as np

from jaxserve.kv.config import KVConfig
from jaxserve.request import Request
from jaxserve.runtime.events import EventLog
from jaxserve.runtime.limits import RunLimits
from jaxserve.runtime.replica import Progress, ProgressHook
from jaxserve.scheduler.base import same_rank
from jaxserve.scheduler.orca import OrcaScheduler
from jaxserve.scheduler.queues import FCFS
from jaxserve.scheduler.sarathi import SarathiScheduler
from jaxserve.scheduler.static import StaticScheduler
from jaxserve.scheduler.vllm import VLLMScheduler
from jaxserve.sim.cost_model import RooflineCostModel
from jaxserve.sim.executor import SIM_TOKEN_ID

_DEFAULT_LIMITS = RunLimits()
_COST_METHODS = ("step", "parts", "_parts", "parts_from_totals", "combine")
_POLICIES = (VLLMScheduler, SarathiScheduler, OrcaScheduler, StaticScheduler)  # their exact classes
_WAITING, _EXPLICIT, _COHORT, _DONE = 0, 1, 2, 3  # where a request is (``FastReplica.phase``)


def why_not_fast(scheduler, kv: KVConfig, cost_model, limits: RunLimits = _DEFAULT_LIMITS,
                 requests: Optional[Sequence[Request]] = None) -> Optional[str]:
    """None when ``run_fast`` runs this exactly as ``run_replica`` would; else why not (one line)."""
    kind = type(scheduler)
    if kind not in _POLICIES:
        return f"scheduler {kind.__name__}: the fast loop runs the vllm, sarathi, orca and static policies only"
    if scheduler.order != FCFS:
        return "scheduler order: the fast loop serves the FCFS queue order only"
    if scheduler.preempt_rank is not same_rank:
        return "scheduler preempt_rank: the fast loop preempts by arrival only"
    if scheduler.enable_prefix_caching:
        return "prefix caching: the fast loop keeps block counts, not the blocks a cache matches"
    if scheduler.preemption_mode == "swap" and kv.num_host_blocks > 0:
        return "swap preemption with host blocks: the fast loop recomputes preempted requests"
    cls = type(cost_model)
    if not isinstance(cost_model, RooflineCostModel) or any(
        getattr(cls, m) is not getattr(RooflineCostModel, m) for m in _COST_METHODS
    ):
        return f"cost model {cls.__name__}: the fast loop costs steps with the roofline's own arithmetic only"
    if limits.max_sim_time_s != _DEFAULT_LIMITS.max_sim_time_s or limits.max_steps != _DEFAULT_LIMITS.max_steps:
        return "sim.max_time_s / max_steps: the fast loop runs until every request is served"
    if requests is not None and len({r.request_id for r in requests}) != len(requests):
        return "duplicate request ids: run_replica rejects the repeats one by one"
    return None


def run_fast(scheduler, kv: KVConfig, cost_model, requests: Sequence[Request], *,
             limits: RunLimits = _DEFAULT_LIMITS, on_progress: Optional[ProgressHook] = None,
             progress_every: int = 2000) -> EventLog:
    """``run_replica(scheduler, kv, SimExecutor(cost_model), requests, limits=limits)``'s event log,
    faster; ``ValueError`` when ``why_not_fast`` names a reason. ``on_progress`` is called about
    every ``progress_every`` steps and once at the end."""
    reason = why_not_fast(scheduler, kv, cost_model, limits, requests)
    if reason is not None:
        raise ValueError(f"run_fast: {reason}")
    log, recorder = EventLog(), StepRecorder()
    replica = FastReplica(scheduler, kv, cost_model, limits, log, recorder)
    arrivals = sorted(requests, key=lambda r: r.arrival_time)  # (stable: ties keep their order)
    with gc_paused():
        _drive(replica, arrivals, on_progress, progress_every)
    recorder.flush(log)
    if on_progress is not None:
        on_progress(Progress(replica.now, replica.num_steps, len(log.rejected) + len(log.finish_reasons), len(arrivals)))
    return log


@contextlib.contextmanager
def gc_paused():
    """The cyclic garbage collector off (restored as it was): a loop that allocates millions of small
    acyclic values (freed by reference counting) would otherwise set off collections that walk
    every live object again and again (~10 % of the Azure hour's loop)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _drive(replica: "FastReplica", arrivals: list, on_progress, progress_every: int) -> None:
    """``drive_replica``'s loop: arrivals added as the clock passes them, steps until all are served."""
    scheduler, log = replica.scheduler, replica.log
    n, nxt = len(arrivals), 0
    while True:
        while nxt < n and arrivals[nxt].arrival_time <= replica.now:
            replica.add(arrivals[nxt])
            nxt += 1
        before = replica.num_steps
        horizon = arrivals[nxt].arrival_time if nxt < n else math.inf
        if replica.next_step_time == math.inf or not replica.step(horizon):  # idle, or blocked until more work arrives
            if nxt == n:
                if replica.has_unfinished:
                    raise RuntimeError(
                        f"scheduler {type(scheduler).__name__} planned an empty step with {len(replica.queue)} "
                        f"waiting and {len(replica.rows)} running requests and no more arrivals"
                    )
                break
            replica.now = max(replica.now, arrivals[nxt].arrival_time)
            continue
        if on_progress is not None and before // progress_every != replica.num_steps // progress_every:
            on_progress(Progress(replica.now, replica.num_steps, len(log.rejected) + len(log.finish_reasons), n))


class StepRecorder:
    """The steps of one or more fast replicas sharing a log, in the order they are taken, one tuple
    each (``FIELDS``); ``flush`` appends them to the log's columns at the end of the run."""

    FIELDS = ("end", "duration", "energy", "tokens", "prefill_tokens", "seqs", "waiting", "running", "kv_usage",
              "replica", "token_rows")  # fmt: skip

    def __init__(self):
        self.steps: list[tuple] = []
        self.requeued: dict[int, float] = {}  # preempted requests (log index) not yet scheduled again -> when

    def flush(self, log: EventLog) -> None:
        columns = dict(zip(self.FIELDS, map(list, zip(*self.steps)))) if self.steps else {f: [] for f in self.FIELDS}
        end, token_rows = columns.pop("end"), columns.pop("token_rows")
        log.extend_steps(end, columns, token_rows, self.requeued)
        self.steps.clear()  # (in place: replicas hold its append)
        self.requeued = {}


class FastReplica:
    """One replica on the fast loop, stepped from outside as ``runtime.Replica`` is: ``add`` hands
    it a request that has arrived, ``step`` takes its next step at ``now`` (the end of its last
    one). Requests are numbered locally in the order they were added: FCFS order, the running
    rows' order and the preemption order (latest arrival first) all follow that number; ``gid``
    maps it to the request's index in the shared log. What a router reads is kept as counts:
    ``num_waiting``, ``num_running``, ``used_blocks``, ``queued_tokens`` (prompts added and not yet
    scheduled) and ``num_high_priority``."""

    def __init__(self, scheduler, kv: KVConfig, cost_model, limits: RunLimits, log: EventLog,
                 recorder: StepRecorder, index: int = 0):
        self.scheduler = scheduler
        self.kv, self.limits, self.log, self.recorder, self.index = kv, limits, log, recorder, index
        self._append_step = recorder.steps.append
        self.cm = cost_model
        # The policies' step, as StepBuilder moves: vllm admits first and then runs only what it
        # admitted; sarathi and orca run the running rows and then admit; static admits a batch only
        # when nothing runs. Orca and static reserve blocks for prompt + max_new_tokens up front.
        kind = type(scheduler)
        self.admits_first = kind is VLLMScheduler
        self.admits_after = kind in (SarathiScheduler, OrcaScheduler)
        self.admits_when_idle = kind is StaticScheduler
        self.reserves_full = kind in (OrcaScheduler, StaticScheduler)
        self.budget = scheduler.chunk_size if kind is SarathiScheduler else scheduler.max_num_batched_tokens
        self.align = scheduler.chunk_align if kind is SarathiScheduler else 0  # 0: whole prompts
        self.max_seqs = scheduler.max_num_seqs
        self.watermark_blocks = int(scheduler.watermark * kv.num_blocks)  # StepBuilder._reserve
        self.bs, self.num_blocks = kv.block_size, kv.num_blocks
        self.free = kv.num_blocks

        # Per request (local number): the log's index, then counts.
        self.gid: list[int] = []
        self.same_ids = True  # gid[i] == i so far (a lone replica writing its own log)
        self.prompt: list[int] = []
        self.max_total: list[int] = []  # prompt + max_new_tokens (what orca and static reserve)
        self.max_new: list[int] = []
        self.reason: list[str] = []
        self.high_priority: list[bool] = []
        self.phase: list[int] = []
        self.nout: list[int] = []  # generated tokens (cohort rows: base_out + T)
        self.nc: list[int] = []  # explicit rows: computed tokens
        self.ntok: list[int] = []  # explicit rows: known tokens (prompt + generated)
        self.nb: list[int] = []  # explicit rows: blocks held
        self.base_nc: list[int] = []  # cohort rows: computed tokens - T
        self.base_out: list[int] = []  # cohort rows: generated tokens - T
        self.serial: list[int] = []  # times joined the cohort (stale heap entries have an older one)
        self.tracked: list[bool] = []  # cohort rows that will need blocks (the others hold every block they will)
        self.started: list[bool] = []  # scheduled at least once (its prompt left ``queued_tokens``)

        self.queue: list[int] = []  # waiting requests, a heap of their numbers (FCFS)
        self.rows: list[int] = []  # running requests, sorted
        self.row_gids: list[int] = []  # their log indices (rows' order)
        self.explicit: list[int] = []  # running requests outside the cohort, sorted
        self.T = 0  # decode steps the cohort has taken
        self.ncoh = 0
        self.sum_base = 0  # Σ base_nc over the cohort: its context is sum_base + ncoh * T
        self.by_phase = [0] * self.bs  # cohort rows by (-base_nc) % bs: they need a block when T % bs is it
        self.finish_heap: list[tuple[int, int, int]] = []  # (T at which it finishes, request, serial)
        self._rows_cache = (None, None)  # (rows version, int64 array of their log indices)
        self._cohort_cache = (None, None)
        self.rows_version = self.cohort_version = 0
        self.cohort_rows: list[int] = []  # the cohort's requests, sorted
        self.cohort_gids: list[int] = []  # their log indices (the same order)

        self.now = 0.0
        self.num_steps = 0
        self._horizon = -math.inf  # the step being taken may run on until this time (``step``)
        self.blocked = False  # the last step planned nothing: wait for new work
        self.queued_tokens = 0
        self.num_high_priority = 0

    # -- what a driver asks and does (runtime.Replica's) -----------------------------------------
    @property
    def has_unfinished(self) -> bool:
        return bool(self.rows or self.queue)

    @property
    def next_step_time(self) -> float:
        """When this replica next steps: ``now`` while it has schedulable work, else infinity."""
        return self.now if (self.rows or self.queue) and not self.blocked else math.inf

    @property
    def num_waiting(self) -> int:
        return len(self.queue)

    @property
    def num_running(self) -> int:
        return len(self.rows)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free

    def add(self, request: Request, at: Optional[float] = None) -> bool:
        """``Replica.add``: hands over a request that has arrived (``at``: when it reaches this
        replica, if later than its arrival). False if it was rejected (the log keeps why)."""
        self.now = max(self.now, request.arrival_time if at is None else at)
        self.blocked = False
        log, rid = self.log, request.request_id
        g = log.index.get(rid)
        if g is None:
            g = log.add_request(request, request.arrival_time)
        why = _rejection(self.scheduler, self.kv, self.limits, request)
        if why is not None:
            log.reject(rid, why)
            return False
        i = len(self.gid)
        self.gid.append(g)
        self.same_ids = self.same_ids and g == i
        self.prompt.append(request.prompt_len)
        self.max_total.append(request.max_total_tokens)
        # A request whose stop ids include the simulator's token stops at its first sampled token.
        stops = SIM_TOKEN_ID in request.sampling.stop_token_ids
        self.max_new.append(1 if stops else request.sampling.max_new_tokens)
        self.reason.append("stop" if stops else "length")
        self.high_priority.append(request.priority < 0)
        for column in (self.nout, self.nc, self.ntok, self.nb, self.base_nc, self.base_out, self.serial, self.phase):
            column.append(0)  # (_WAITING is 0)
        self.started.append(False)
        self.tracked.append(False)
        heapq.heappush(self.queue, i)
        self.queued_tokens += request.prompt_len
        self.num_high_priority += request.priority < 0
        return True

    # -- one step ---------------------------------------------------------------------------------
    def step(self, horizon: float = -math.inf) -> int:
        """Schedules, costs, applies and records the step at ``now``, and when it is a decode of the
        cohort alone, the like steps after it that start before ``horizon`` (the next time anything
        may reach the replica; none by default) in one go, up to the step at which rows finish or
        the blocks would run out. Returns how many steps it took: 0 if it planned nothing (the
        replica is then blocked until ``add``)."""
        self._horizon = horizon
        k = self._step()
        if k:
            self.num_steps += k
        else:
            self.blocked = True
        return k

    def _step(self) -> int:
        if self.queue and (self.admits_first or (self.admits_when_idle and not self.rows)):
            budget, new = self._admit(self.budget, len(self.rows))  # (vllm: prompts run alone when they fit)
            if new:
                self._apply(0, (), (), new, 0, ())
                return 1
        if not self.rows and not self.admits_after:
            return 0
        T, bs = self.T, self.bs
        budget, need = self.budget, self.by_phase[T % bs]
        num_decodes, decoding = self.ncoh, ()
        if self.explicit:  # explicit rows with one token left decode too (StepBuilder: remaining == 1);
            # they hold blocks for every known token (admission took the prompt's), so need none.
            nc, ntok = self.nc, self.ntok
            decoding = [i for i in self.explicit if ntok[i] - nc[i] == 1]
            num_decodes += len(decoding)
        if num_decodes > budget or need > self.free:
            return self._explicit_step()  # decodes cut by the budget, or rows to preempt
        self.free -= need
        budget -= num_decodes
        chunks = []  # (request, tokens) of the ongoing prefills, in row order
        if self.explicit:
            nc, ntok, nb = self.nc, self.ntok, self.nb
            for i in self.explicit:
                remaining = ntok[i] - nc[i]
                if remaining == 1:
                    continue
                if budget <= 0:
                    break
                n = self._chunk(remaining, budget)
                if n <= 0:
                    break
                # A prefill holds blocks for every known token since admission: it never allocates.
                assert -(-(nc[i] + n) // bs) <= nb[i], "a prefilling row must hold its prompt's blocks"
                chunks.append((i, n))
                budget -= n
        new = ()
        if self.admits_after:
            budget, new = self._admit(budget, len(self.rows))
            if not (num_decodes or chunks or new):
                return 0
        if decoding or chunks or new or self.explicit:  # (an explicit row may sit out a step: budget, alignment)
            self._apply(num_decodes, decoding, chunks, new, need, ())
        else:
            return self._decode()
        return 1

    def _decode(self) -> int:
        """``_apply`` of a step in which the cohort, every running row, decodes and nothing else
        happens (the commonest step), its blocks already taken; and of the like steps after it that
        start before the horizon: nothing can change them (no arrival reaches the replica, so the
        queue stays as it is, and a blocked head stays blocked as blocks only get fewer), so they
        run to the step at which the first rows finish, the last whose blocks fit, or the last that
        starts before the horizon. Returns how many steps it took."""
        T, n, bs = self.T, self.ncoh, self.bs
        heap, phase, serial = self.finish_heap, self.phase, self.serial
        while phase[heap[0][1]] != _COHORT or serial[heap[0][1]] != heap[0][2]:
            heapq.heappop(heap)  # (stale: a row that left the cohort)
        k = heap[0][0] - T  # the step (from 1) at which the first rows finish
        horizon, by_phase, cost = self._horizon, self.by_phase, self.cm.totals_cost
        rows, waiting, index, num_blocks = self._rows_array(), len(self.queue), self.index, self.num_blocks
        fn, context, used = float(n), self.sum_base + n * T, num_blocks - self.free
        append, end, j = self._append_step, self.now, 0
        while True:  # step j (its blocks taken) runs at counter T + j from ``end``
            start = end
            c = float(context + n * j)
            duration, energy = cost(fn, c, c + 0.5 * (fn + fn), n, n)
            end = start + duration
            j += 1
            if j == k or end >= horizon:
                break
            need = by_phase[(T + j) % bs]
            if used + need > num_blocks:
                break  # (step j would preempt: it goes through _explicit_step)
            append((end, duration, energy, n, 0, n, waiting, n, used / num_blocks, index, rows))
            used += need
        self.free = num_blocks - used
        self.T = T = T + j
        self.now = end
        finished = []
        while heap and heap[0][0] <= T:
            _, i, row_serial = heapq.heappop(heap)
            if phase[i] == _COHORT and serial[i] == row_serial:
                finished.append(i)
        self._record(start, end, duration, energy, n, n, n, rows, (), finished)
        return j

    def _chunk(self, remaining: int, budget: int) -> int:
        if remaining <= budget:
            return remaining
        return 0 if not self.align else budget - budget % self.align

    def _admit(self, budget: int, num_seqs: int) -> tuple[int, list]:
        """StepBuilder.admit_new: pops the queue's heads while they fit (token budget, batch seats,
        free blocks less the watermark); ``(budget left, [(request, tokens now, prompt tokens)])``."""
        queue, prompt, nout, bs, nb = self.queue, self.prompt, self.nout, self.bs, self.nb
        new = []
        while queue and budget > 0 and num_seqs < self.max_seqs:
            i = queue[0]
            total = prompt[i] + nout[i]
            n = self._chunk(total, budget)
            if n <= 0:
                break
            need = -(-(self.max_total[i] if self.reserves_full else total) // bs)
            if need + (self.watermark_blocks if num_seqs else 0) > self.free:
                break
            heapq.heappop(queue)
            self.free -= need
            nb[i] = need
            new.append((i, n, total))
            budget -= n
            num_seqs += 1
        return budget, new

    def _apply(self, num_decodes: int, decoding, chunks, new, need: int, preempted) -> None:
        """Costs, applies and records a step: the cohort decodes when ``num_decodes`` counts it (else
        ``num_decodes`` is 0), the explicit rows ``decoding`` decode, ``chunks`` continue prefills,
        ``new`` were admitted (their blocks taken), ``need`` blocks were taken for the decodes."""
        nc, ntok = self.nc, self.ntok
        cohort = num_decodes - len(decoding)
        context = self.sum_base + cohort * self.T if cohort else 0  # Σ n·c of the cohort's rows: n = 1
        computed, dot, squares, tokens = context, context, num_decodes, num_decodes
        samples = ones = num_decodes
        for i in decoding:
            computed += nc[i]
            dot += nc[i]
        completing = []
        for i, n in chunks:
            c = nc[i]
            computed += c
            dot += n * c
            squares += n * n
            tokens += n
            if c + n == ntok[i]:  # (n >= 2: a row one token from its end decodes instead)
                completing.append(i)
                samples += 1
        for i, n, total in new:
            squares += n * n
            tokens += n
            if n == total:
                samples += 1
                ones += n == 1
        ftokens = float(tokens)
        duration, energy = self.cm.totals_cost(ftokens, float(computed), float(dot) + 0.5 * (float(squares) + ftokens),
                                               samples, num_decodes + len(chunks) + len(new))  # fmt: skip
        start = self.now
        end = start + duration
        self.now = end

        # The token rows, in row order: every running row (the usual decode step), else the cohort
        # and the explicit rows that sample.
        sampled_explicit = decoding or completing or new
        if not sampled_explicit and cohort == len(self.rows):
            token_rows = self._rows_array()
        elif not (decoding or completing) and all(n < total for _, n, total in new):
            token_rows = self._cohort_array() if cohort else _EMPTY
        else:
            extra = list(decoding) + completing + [i for i, n, total in new if n == total]
            token_rows = self._ids_array(sorted(self.cohort_rows + extra if cohort else extra))

        # Update: the cohort advances, decodes and completed prefills sample, finished rows retire.
        if cohort:
            self.T += 1
        finished = []
        for i in decoding:
            nc[i] += 1
            self._sampled(i, finished)
        for i, n in chunks:
            nc[i] += n
            if nc[i] == ntok[i]:
                self._sampled(i, finished)
        if new:
            self._start(new, start, finished)
        if cohort:
            heap, T = self.finish_heap, self.T
            while heap and heap[0][0] <= T:
                _, i, serial = heapq.heappop(heap)
                if self.phase[i] == _COHORT and self.serial[i] == serial:
                    finished.append(i)
        self._record(start, end, duration, energy, tokens, ones, num_decodes + len(chunks) + len(new),
                     token_rows, preempted, finished)  # fmt: skip

    def _start(self, new, start: float, finished: list) -> None:
        """Admitted rows become explicit rows (first scheduled, or scheduled again after a
        preemption); those whose whole prompt ran sample."""
        phase, nc, ntok = self.phase, self.nc, self.ntok
        first, requeued, gid, started = self.log.first_scheduled, self.recorder.requeued, self.gid, self.started
        for i, n, total in new:  # (their blocks, ``nb``, were taken by _admit)
            phase[i] = _EXPLICIT
            nc[i], ntok[i] = n, total
            at = bisect.bisect_left(self.rows, i)
            self.rows.insert(at, i)
            self.row_gids.insert(at, gid[i])
            bisect.insort(self.explicit, i)
            g = gid[i]
            if g in requeued:
                self.log.rewaits.append((g, requeued.pop(g), start))
            elif g not in first:
                first[g] = start
            if not started[i]:
                started[i] = True
                self.queued_tokens -= self.prompt[i]
            if n == total:
                self._sampled(i, finished)
        self.rows_version += 1

    def _sampled(self, i: int, finished: list) -> None:
        """Explicit row ``i`` sampled a token: it finishes, or its prompt is done and it joins the cohort."""
        self.ntok[i] += 1
        self.nout[i] += 1
        if self.nout[i] >= self.max_new[i]:
            finished.append(i)
        elif self._may_join(i):
            self._join(i)

    def _may_join(self, i: int) -> bool:
        """Explicit row ``i``, one token left, holds exactly the blocks of its computed tokens (it
        needs one whenever they fill a block), or every block its last decode will need."""
        nb, bs = self.nb[i], self.bs
        return nb == -(-self.nc[i] // bs) or nb * bs >= self.prompt[i] + self.max_new[i] - 1

    def _join(self, i: int) -> None:
        """Explicit row ``i`` (``_may_join``) joins the cohort at the current decode counter."""
        T, base = self.T, self.nc[i] - self.T
        self.phase[i] = _COHORT
        self.base_nc[i] = base
        self.base_out[i] = self.nout[i] - T
        self.serial[i] += 1
        heapq.heappush(self.finish_heap, (self.max_new[i] - self.base_out[i], i, self.serial[i]))
        # The last decode computes token prompt + max_new - 2: a row holding its block needs no more.
        tracked = self.tracked[i] = self.nb[i] * self.bs < self.prompt[i] + self.max_new[i] - 1
        if tracked:
            self.by_phase[-base % self.bs] += 1
        self.sum_base += base
        self.ncoh += 1
        del self.explicit[bisect.bisect_left(self.explicit, i)]
        at = bisect.bisect_left(self.cohort_rows, i)
        self.cohort_rows.insert(at, i)
        self.cohort_gids.insert(at, self.gid[i])
        self.cohort_version += 1

    def _leave(self, i: int) -> None:
        """Cohort row ``i`` becomes an explicit row (its counts materialised)."""
        base, T = self.base_nc[i], self.T
        c = base + T
        self.phase[i] = _EXPLICIT
        self.nc[i], self.ntok[i], self.nout[i] = c, c + 1, self.base_out[i] + T
        if self.tracked[i]:  # (an untracked row's blocks never changed in the cohort)
            self.nb[i] = -(-c // self.bs)
            self.by_phase[-base % self.bs] -= 1
        self.sum_base -= base
        self.ncoh -= 1
        bisect.insort(self.explicit, i)
        at = bisect.bisect_left(self.cohort_rows, i)
        del self.cohort_rows[at]
        del self.cohort_gids[at]
        self.cohort_version += 1

    def _record(self, start, end, duration, energy, tokens, ones, num_rows, token_rows, preempted, finished) -> None:
        """Retires ``finished`` (free their blocks) and appends the step to the log's columns."""
        log, recorder, gid = self.log, self.recorder, self.gid
        if preempted:
            preemptions = log.preemptions
            for i in preempted:
                g = gid[i]
                preemptions[g] = preemptions.get(g, 0) + 1
                recorder.requeued[g] = start
        if finished:
            phase, rows = self.phase, self.rows
            done, reasons, reason = log.finished, log.finish_reasons, self.reason
            for i in finished:
                if phase[i] == _COHORT:
                    self._leave(i)
                self.free += self.nb[i]
                phase[i] = _DONE
                at = bisect.bisect_left(rows, i)
                del rows[at]
                del self.row_gids[at]
                del self.explicit[bisect.bisect_left(self.explicit, i)]
                g = gid[i]
                done[g] = end
                reasons[g] = reason[i]
                self.num_high_priority -= self.high_priority[i]
            self.rows_version += 1
        num_blocks = self.num_blocks
        self._append_step((end, duration, energy, tokens, tokens - ones, num_rows, len(self.queue), len(self.rows),
                           (num_blocks - self.free) / num_blocks, self.index, token_rows))  # fmt: skip

    # -- row orders ---------------------------------------------------------------------------------
    def _rows_array(self) -> np.ndarray:
        """Every running row's log index, in row order (rebuilt only when the rows changed)."""
        self._rows_cache = _cached_array(self._rows_cache, self.rows_version, self.row_gids)
        return self._rows_cache[1]

    def _ids_array(self, rows: list[int]) -> np.ndarray:
        """The log indices of local ``rows`` as a read-only int64 array."""
        gid = self.gid
        return _frozen(np.array(rows if self.same_ids else list(map(gid.__getitem__, rows)), np.int64))

    def _cohort_array(self) -> np.ndarray:
        """The cohort rows' log indices, in row order (rebuilt only when the cohort changed)."""
        self._cohort_cache = _cached_array(self._cohort_cache, self.cohort_version, self.cohort_gids)
        return self._cohort_cache[1]

    # -- the general step -----------------------------------------------------------------------------
    def _explicit_step(self) -> int:
        """A step the cohort cannot take in O(1): every row made explicit, then StepBuilder's
        run_running (row by row, preempting the latest arrival when blocks run out) and, unless it
        preempted, admission (sarathi); the rows that can rejoin the cohort do after it."""
        for i in list(self.cohort_rows):
            self._leave(i)
        self.finish_heap.clear()
        rows, nc, ntok, nb, bs = self.rows, self.nc, self.ntok, self.nb, self.bs
        live = len(rows)
        num_new = [0] * live
        budget = self.budget
        preempted = []

        def preempt(r: int) -> None:  # StepBuilder._preempt: the tail row's blocks freed, requeued
            nonlocal budget, live
            i = rows[r]
            budget += num_new[r]
            num_new[r] = 0
            live -= 1
            self.free += nb[i]
            self.phase[i] = _WAITING
            heapq.heappush(self.queue, i)
            preempted.append(i)

        def run_row(r: int, n: int) -> None:  # StepBuilder._run_row
            nonlocal budget
            i = rows[r]
            need = -(-(nc[i] + n) // bs) - nb[i]
            while need > self.free:
                if live - 1 == r:
                    preempt(r)
                    return
                preempt(live - 1)
            if need > 0:
                self.free -= need
                nb[i] += need
            num_new[r] = n
            budget -= n

        remaining = [ntok[i] - nc[i] for i in rows]
        decodes = [r for r, m in enumerate(remaining) if m == 1][: max(budget, 0)]
        if decodes:  # StepBuilder._run_decodes
            needs = [(nc[rows[r]] + bs) // bs - nb[rows[r]] for r in decodes]
            total = sum(m for m in needs if m > 0)
            if total > self.free:
                for r in decodes:
                    if r < live:
                        run_row(r, 1)
            else:
                self.free -= total
                for r, m in zip(decodes, needs):
                    if m > 0:
                        nb[rows[r]] += m
                    num_new[r] = 1
                budget -= len(decodes)
        for r, m in enumerate(remaining):
            if m <= 1:
                continue
            if r >= live or budget <= 0:
                break
            n = self._chunk(m, budget)
            if n <= 0:
                break
            run_row(r, n)
        new = []
        if not preempted and self.admits_after:
            budget, new = self._admit(budget, live)
        for i in preempted:
            self.phase[i] = _WAITING
        kept = rows[:live]
        for i in rows[live:]:
            del self.explicit[bisect.bisect_left(self.explicit, i)]
        self.rows[:] = kept
        del self.row_gids[live:]
        self.rows_version += 1
        if not any(num_new) and not new:
            self._regroup()
            return 0  # an empty plan (the replica waits for an arrival); its preemptions stand
        decoding = [rows[r] for r in range(live) if num_new[r] == 1 and remaining[r] == 1]
        chunks = [(rows[r], num_new[r]) for r in range(live) if num_new[r] and remaining[r] > 1]
        self._apply(len(decoding), decoding, chunks, new, 0, preempted)
        self._regroup()
        return 1

    def _regroup(self) -> None:
        """Explicit rows with one token left and exactly their computed tokens' blocks join the cohort."""
        nc, ntok = self.nc, self.ntok
        for i in [i for i in self.explicit if ntok[i] - nc[i] == 1 and self._may_join(i)]:
            self._join(i)


_EMPTY = np.zeros(0, np.int64)
_EMPTY.flags.writeable = False


def _cached_array(cache: tuple, version: int, ids: list[int]) -> tuple:
    """``cache`` (version, array) when it is of ``version``, else ``ids`` as a new read-only array."""
    return cache if cache[0] == version else (version, _frozen(np.array(ids, np.int64)))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _rejection(scheduler, kv: KVConfig, limits: RunLimits, request: Request) -> Optional[str]:
    """Why ``Replica.add`` would reject ``request`` on arrival (the same words), or None."""
    if limits.max_context is not None and request.max_total_tokens > limits.max_context:
        return f"prompt + max_new_tokens = {request.max_total_tokens} > context {limits.max_context}"
    try:
        scheduler.check_servable(request, kv)
    except ValueError as e:
        return str(e)
    return None
