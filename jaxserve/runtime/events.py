"""The event log every executor loop writes (simulator and engine alike); metrics read only this.

Per step it records when the step ended, how long it took, its energy, its shape, the queue and KV
state after it, and which requests received a token. Per request it records arrival, rejection
(with its reason), first scheduling, finish (with the scheduler's reason: ``stop`` or ``length``). Everything is appended as plain numbers; ``freeze()`` turns the log
into numpy arrays for vectorized metrics.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from jaxserve.plan import BatchPlan


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False  # shared by every step that records it
    return a


@dataclasses.dataclass(frozen=True)
class RequestInfo:
    request_id: str
    client_id: str
    arrival_s: float
    prompt_len: int
    max_new_tokens: int


class EventLog:
    """Append-only record of one run. Request indices are the order of ``add_request`` calls."""

    def __init__(self):
        self.requests: list[RequestInfo] = []
        self.index: dict[str, int] = {}
        self.rejected: dict[int, str] = {}  # request index -> reason
        self.first_scheduled: dict[int, float] = {}
        self.finished: dict[int, float] = {}
        self.finish_reasons: dict[int, str] = {}  # request index -> "stop" | "length"
        self.preemptions: dict[int, int] = {}
        self._requeued_at: dict[int, float] = {}  # preempted, waiting to run again since then
        self.rewaits: list[tuple[int, float, float]] = []  # (request, preempted at, resumed at)
        self._step_end: list[float] = []
        self._step_duration: list[float] = []
        self._step_energy: list[float] = []
        self._step_tokens: list[int] = []
        self._step_prefill_tokens: list[int] = []
        self._step_seqs: list[int] = []
        self._step_waiting: list[int] = []
        self._step_running: list[int] = []
        self._step_kv_usage: list[float] = []
        self._token_req: list[np.ndarray] = []  # per step: indices of requests that got a token
        self._step_replica: list[int] = []
        self.retries: dict[int, int] = {}  # request index -> times re-dispatched after a replica failed
        self.failed: dict[int, str] = {}  # request index -> why it could not be served (a cluster gave up)
        self.lost_tokens = 0  # tokens whose KV a failed replica took with it (recomputed elsewhere)
        self._rows_cache: dict = {}  # replica -> (request ids, their indices as a list, as an array): see _rows

    # -- writing ---------------------------------------------------------------------------------
    def add_request(self, request, now: float) -> int:
        i = len(self.requests)
        self.requests.append(
            RequestInfo(request.request_id, request.client_id, float(now), request.prompt_len, request.sampling.max_new_tokens)
        )
        self.index[request.request_id] = i
        return i

    def reject(self, request_id: str, reason: str) -> None:
        self.rejected[self.index[request_id]] = reason

    def retry(self, request_id: str, lost_tokens: int) -> None:
        """The request's replica failed; it goes on elsewhere, its ``lost_tokens`` of KV recomputed."""
        i = self.index[request_id]
        self.retries[i] = self.retries.get(i, 0) + 1
        self.lost_tokens += lost_tokens

    def fail(self, request_id: str, reason: str) -> None:
        self.failed[self.index[request_id]] = reason

    def token_rows_since(self, cursor: int) -> tuple[list[np.ndarray], int]:
        """Per step recorded since step ``cursor`` (in recording order): the indices of the requests
        that got a token; and the new cursor. For readers that follow a run as it goes."""
        return self._token_req[cursor:], len(self._token_req)

    def tokens_per_request(self) -> np.ndarray:
        """Tokens each request (by index) has received so far; O(tokens): for rare events such as a fault."""
        rows = np.concatenate(self._token_req) if self._token_req else np.zeros(0, np.int64)
        return np.bincount(rows, minlength=len(self.requests))

    def step(self, plan: BatchPlan, start_s: float, duration_s: float, energy_j: float, state, finished,
             replica: int = 0) -> None:
        """Records a step that replica ``replica`` ran: ``plan`` from ``start_s`` for ``duration_s``,
        leaving ``state``; ``finished`` are the requests it finished (``FinishedRequest``s)."""
        self.record(plan, start_s, duration_s, energy_j, state.num_waiting, state.num_running, state.kv.usage,
                    finished, replica)  # fmt: skip

    def record(self, plan: BatchPlan, start_s: float, duration_s: float, energy_j: float, num_waiting: int,
               num_running: int, kv_usage: float, finished, replica: int = 0) -> None:
        """``step`` with the queue and KV state after the step given as numbers (a closed-form run
        has no state after each of its steps)."""
        end = start_s + duration_s
        index = self.index
        for rid in plan.preempted + plan.swapped_out:
            i = index[rid]
            self.preemptions[i] = self.preemptions.get(i, 0) + 1
            self._requeued_at[i] = start_s
        rows, row_array = self._rows(plan.request_ids, replica)
        first, requeued = self.first_scheduled, self._requeued_at
        if requeued:  # preempted rows scheduled again (a row scheduled for the first time is not one)
            for i in [i for i in rows if i in requeued and i in first]:
                self.rewaits.append((i, requeued.pop(i), start_s))
        for i in [i for i in rows if i not in first]:
            first[i] = start_s
        samples = plan.samples_token
        if np.count_nonzero(samples) == len(rows):
            self._token_req.append(row_array)
        else:
            sampled = list(itertools.compress(rows, samples.tolist()))
            self._token_req.append(np.array(sampled, np.int64))
        self._finish(finished, end)
        self._step_end.append(end)
        self._step_duration.append(duration_s)
        self._step_energy.append(energy_j)
        self._step_tokens.append(plan.num_tokens)
        self._step_prefill_tokens.append(plan.num_prefill_tokens)
        self._step_seqs.append(plan.num_seqs)
        self._step_waiting.append(num_waiting)
        self._step_running.append(num_running)
        self._step_kv_usage.append(kv_usage)
        self._step_replica.append(replica)

    def decode_run(self, request_ids, ends, durations, energies, state, kv_usage, replica: int = 0,
                   finished=(), waiting=None) -> None:
        """Records k decode steps of the same requests at once (the same as k calls of ``step``):
        their end times ``ends`` (floats, summed in order from the first step's start, as ``step``
        sums), ``durations``, ``energies`` and ``kv_usage`` (float arrays [k]), leaving ``state``;
        ``finished`` are the requests the last of them finished (``FinishedRequest``s; they count
        as running until then). ``waiting``: the queue after each step when requests joined it
        during the run (a list [k]); else the state's."""
        k = len(ends)
        n = len(request_ids)
        rows = self._rows(request_ids, replica)[1]
        self._token_req.extend([rows] * k)
        self._step_end.extend(ends)
        self._step_duration.extend(durations.tolist())
        self._step_energy.extend(energies.tolist())
        self._step_tokens.extend([n] * k)
        self._step_prefill_tokens.extend([0] * k)
        self._step_seqs.extend([n] * k)
        self._step_waiting.extend([state.num_waiting] * k if waiting is None else waiting)
        running = state.num_running
        self._step_running.extend([running + len(finished)] * (k - 1) + [running])
        self._step_kv_usage.extend(kv_usage.tolist())
        self._finish(finished, ends[-1])
        self._step_replica.extend([replica] * k)

    def prefill_run(self, request_ids, row: int, chunks, completes: bool, start: float, ends, costs, num_waiting: int,
                    num_running: int, kv_usage, finished=(), replica: int = 0) -> None:
        """Records k steps of a prefill run at once (the same as ``record`` of each of their plans):
        every request decodes but the one at ``row``, which computes ``chunks[j]`` prompt tokens at
        step j and samples only at the last one when it ``completes``; the first starts at ``start``
        and step j ends at ``ends[j]`` (summed in order); ``costs`` are their (duration, energy) and
        ``kv_usage`` their KV usage after each; ``finished`` the requests the last step finished
        (they count as running until then); the queue is ``num_waiting`` throughout."""
        k, n = len(ends), len(request_ids)
        rows, row_array = self._rows(request_ids, replica)
        first, requeued = self.first_scheduled, self._requeued_at
        if requeued:  # (as ``record`` of the first step: the later ones schedule the same rows)
            for i in [i for i in rows if i in requeued and i in first]:
                self.rewaits.append((i, requeued.pop(i), start))
        for i in [i for i in rows if i not in first]:
            first[i] = start
        decoders = _frozen(np.delete(row_array, row)) if n > 1 else row_array[:0]  # the rows that sample
        self._token_req.extend([decoders] * (k - completes))
        if completes:
            self._token_req.append(row_array)
        durations, energies = zip(*costs)
        self._step_end.extend(ends)
        self._step_duration.extend(durations)
        self._step_energy.extend(energies)
        self._step_tokens.extend([n - 1 + c for c in chunks])
        self._step_prefill_tokens.extend(chunks)
        self._step_seqs.extend([n] * k)
        self._step_waiting.extend([num_waiting] * k)
        self._step_running.extend([num_running] * (k - 1) + [num_running - len(finished)])
        self._step_kv_usage.extend(kv_usage)
        self._finish(finished, ends[-1])
        self._step_replica.extend([replica] * k)

    def extend_steps(self, end: list, columns: dict, token_rows: list, requeued_at: dict) -> None:
        """Appends steps recorded elsewhere in this log's own terms (the simulator's fast loop,
        ``jaxserve.sim.fast_loop``): their end times, ``columns`` (a list per name of
        ``_STEP_COLUMNS``: duration, energy, tokens, ...), the request indices that got a token
        at each (int64 arrays) and the preempted requests not yet scheduled again (index -> when
        they were preempted, in preemption order). Requests, first scheduling, finishes,
        preemptions and rewaits are written to their public fields directly."""
        if set(columns) != set(_STEP_COLUMNS):
            raise ValueError(f"extend_steps needs the columns {sorted(_STEP_COLUMNS)}, got {sorted(columns)}")
        k = len(end)
        if len(token_rows) != k or any(len(c) != k for c in columns.values()):
            raise ValueError("extend_steps: every column and token_rows need one entry per step")
        self._step_end.extend(end)
        for name, values in columns.items():
            getattr(self, "_step_" + name).extend(values)
        self._token_req.extend(token_rows)
        self._requeued_at.update(requeued_at)

    def _finish(self, finished, end: float) -> None:
        """Marks the requests of ``finished`` (``FinishedRequest``s) done at ``end`` with their reasons."""
        for f in finished:
            i = self.index[f.request_id]
            self.finished[i] = end
            self.finish_reasons[i] = f.finish_reason

    def _rows(self, request_ids: tuple, replica: int = 0) -> tuple[list[int], np.ndarray]:
        """The requests' indices, as a list and as an int64 array (kept for the last ids each
        replica asked for: a running batch keeps its ids tuple from step to step until it changes,
        and a cluster's replicas take turns)."""
        cached = self._rows_cache.get(replica)
        if cached is not None and cached[0] is request_ids:
            return cached[1], cached[2]
        rows = list(map(self.index.__getitem__, request_ids))
        array = np.array(rows, np.int64)
        array.flags.writeable = False  # shared by every step that records it
        self._rows_cache[replica] = (request_ids, rows, array)
        return rows, array

    # -- reading ---------------------------------------------------------------------------------
    def _finish_reason(self, i: int) -> str:
        if i in self.rejected:
            return f"rejected: {self.rejected[i]}"
        if i in self.failed:
            return f"failed: {self.failed[i]}"
        return self.finish_reasons.get(i, "unfinished")  # unfinished: the run stopped first

    def freeze(self) -> "FrozenLog":
        """The log as arrays, steps in order of their end time (replicas of a cluster append their
        steps as they are driven, not in time order; a stable sort keeps one replica's order)."""
        n = len(self.requests)
        ends = np.asarray(self._step_end, np.float64)
        steps = {field: np.asarray(getattr(self, "_step_" + name), dtype) for name, (field, dtype) in _STEP_COLUMNS.items()}
        token_req = self._token_req
        if len(ends) > 1 and np.any(np.diff(ends) < 0):
            order = np.argsort(ends, kind="stable")
            ends = ends[order]
            steps = {name: column[order] for name, column in steps.items()}
            token_req = [token_req[i] for i in order.tolist()]
        counts = np.fromiter((len(t) for t in token_req), np.int64, len(token_req))

        def per_request(d: dict, fill) -> np.ndarray:
            out = np.full(n, fill, np.float64)
            if d:
                keys = np.fromiter(d.keys(), np.int64, len(d))
                out[keys] = np.fromiter(d.values(), np.float64, len(d))
            return out

        return FrozenLog(
            requests=tuple(self.requests),
            arrival_s=np.array([r.arrival_s for r in self.requests], np.float64),
            prompt_len=np.array([r.prompt_len for r in self.requests], np.int64),
            client_id=np.array([r.client_id for r in self.requests], object),
            finish_reason=tuple(self._finish_reason(i) for i in range(n)),
            rejected=np.isin(np.arange(n), np.fromiter(self.rejected.keys(), np.int64, len(self.rejected))),
            first_scheduled_s=per_request(self.first_scheduled, np.nan),
            finish_s=per_request(self.finished, np.nan),
            preemptions=per_request(self.preemptions, 0).astype(np.int64),
            rewaits=np.array(
                self.rewaits + [(i, t, np.inf) for i, t in self._requeued_at.items()], np.float64
            ).reshape(-1, 3),
            token_req=np.concatenate(token_req) if token_req else np.zeros(0, np.int64),
            token_time_s=np.repeat(ends, counts),
            step_end_s=ends,
            **steps,
            retries=per_request(self.retries, 0).astype(np.int64),
            failed=np.isin(np.arange(n), np.fromiter(self.failed.keys(), np.int64, len(self.failed))),
            lost_tokens=self.lost_tokens,
        )


# EventLog's per-step lists (``_step_<name>``) -> FrozenLog fields, with their dtypes.
_STEP_COLUMNS = {
    "duration": ("step_duration_s", np.float64), "energy": ("step_energy_j", np.float64),
    "tokens": ("step_tokens", np.int64), "prefill_tokens": ("step_prefill_tokens", np.int64),
    "seqs": ("step_seqs", np.int64), "waiting": ("step_waiting", np.int64), "running": ("step_running", np.int64),
    "kv_usage": ("step_kv_usage", np.float64), "replica": ("step_replica", np.int64),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class FrozenLog:
    """The log as arrays. ``token_req[k]`` got a token at ``token_time_s[k]`` (time order)."""

    requests: tuple[RequestInfo, ...]
    arrival_s: np.ndarray
    prompt_len: np.ndarray
    client_id: np.ndarray
    finish_reason: tuple[str, ...]  # "stop" | "length" | "rejected: <why>" | "failed: <why>" | "unfinished"
    rejected: np.ndarray
    first_scheduled_s: np.ndarray
    finish_s: np.ndarray
    preemptions: np.ndarray
    rewaits: np.ndarray  # [n, 3]: request index, preempted at, scheduled again at (inf: never)
    token_req: np.ndarray
    token_time_s: np.ndarray
    step_end_s: np.ndarray
    step_duration_s: np.ndarray
    step_energy_j: np.ndarray
    step_tokens: np.ndarray
    step_prefill_tokens: np.ndarray
    step_seqs: np.ndarray
    step_waiting: np.ndarray
    step_running: np.ndarray
    step_kv_usage: np.ndarray
    step_replica: np.ndarray  # which replica ran the step (0 on a single replica)
    retries: np.ndarray  # per request: re-dispatches after a replica failed
    failed: np.ndarray  # per request: a cluster could not serve it (finish_reason says why)
    lost_tokens: int  # tokens of KV lost with failed replicas

    @property
    def num_requests(self) -> int:
        return len(self.requests)

    def request_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """(request index, token time) pairs sorted by request then time (read-only arrays, computed
        once per log)."""
        cached = self.__dict__.get("_request_tokens")
        if cached is None:
            order = self.request_token_order()
            cached = (self.token_req[order], self.token_time_s[order])
            for array in cached:
                array.flags.writeable = False
            object.__setattr__(self, "_request_tokens", cached)  # frozen: a private cache
        return cached

    def request_token_order(self) -> np.ndarray:
        """The permutation of the tokens that sorts them by request, then time (then log order);
        computed once per log (metrics read it twice)."""
        order = self.__dict__.get("_request_token_order")
        if order is None:
            times = self.token_time_s
            if len(times) < 2 or np.all(times[1:] >= times[:-1]):  # time order (freeze's): sort by request alone
                order = np.argsort(self.token_req, kind="stable")
            else:
                order = np.lexsort((times, self.token_req))
            order.flags.writeable = False
            object.__setattr__(self, "_request_token_order", order)  # frozen: a private cache
        return order

