"""The scheduler protocol, the scheduler state, and the lifecycle every batching policy shares.

A policy is a frozen dataclass of options whose ``schedule`` composes StepBuilder moves; requests'
arrival, abort and post-step bookkeeping are the same for all policies and live here.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Optional, Protocol, runtime_checkable

from jaxserve.kv.config import KVConfig
from jaxserve.kv.prefix_hash import prompt_block_hashes
from jaxserve.kv.state import KVState
from jaxserve.persistent import EMPTY_MAP, KeyedQueue, evolve
from jaxserve.plan import BatchPlan, StepOutput
from jaxserve.request import Request, RequestStatus
from jaxserve.scheduler.queues import FCFS, QueueOrder
from jaxserve.scheduler.running import RunningBatch
from jaxserve.scheduler.seq import FinishedRequest, SeqState
from jaxserve.scheduler.step import Inflight
from jaxserve.scheduler.token_buffer import TokenBuffer
from jaxserve.scheduler.update import apply_step_output


@dataclasses.dataclass(frozen=True)
class SchedulerState:
    """Everything a scheduler knows, as one immutable value."""

    kv: KVState
    waiting: Any  # the queue value of the policy's QueueOrder
    running: RunningBatch
    swapped: KeyedQueue  # SeqStates with host blocks, by arrival
    outputs: TokenBuffer  # generated ids of the running requests (RunningBatch.slot)
    step: int = 0  # number of schedule() calls so far
    next_seq_no: int = 0
    inflight: Optional[Inflight] = None  # set by schedule(), cleared by update()
    finished: tuple[FinishedRequest, ...] = ()  # requests that finished in the last update()
    # Live migration (scheduler/migration.py): device blocks held outside any block table, by
    # request id: reserved here for a request migrating in (each also holds a batch seat), or
    # kept by a request migrating out until its last copy is done.
    incoming: Any = EMPTY_MAP  # immutables.Map[str, tuple[int, ...]]
    outgoing: Any = EMPTY_MAP  # immutables.Map[str, tuple[int, ...]]

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.num_waiting or self.num_running or self.num_swapped)

    def running_outputs(self) -> tuple[tuple[int, ...], ...]:
        """The generated ids of each running row so far (inspection: O(tokens))."""
        run = self.running
        return tuple(self.outputs.read(s, n) for s, n in zip(run.slot.tolist(), run.num_output.tolist()))


@runtime_checkable
class Scheduler(Protocol):
    """Pure: no I/O, clocks or hidden randomness; inputs are never mutated."""

    def init(self, kv: KVConfig) -> SchedulerState: ...

    def add_request(self, state: SchedulerState, request: Request, now: float) -> SchedulerState: ...

    def abort(self, state: SchedulerState, request_id: str, now: float) -> SchedulerState: ...

    def schedule(self, state: SchedulerState, now: float) -> tuple[SchedulerState, BatchPlan]: ...

    def update(
        self, state: SchedulerState, plan: BatchPlan, out: StepOutput, now: float
    ) -> SchedulerState: ...


def same_rank(request: Request) -> int:
    """Every request is equally preemptible: victims go by arrival alone."""
    return 0


def _check_option(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"scheduler option {name} must be an int >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class BatchingScheduler(abc.ABC):
    """Options every policy shares, and the protocol methods apart from ``schedule``.

    * ``max_num_seqs``: most requests in the running batch.
    * ``order``: waiting-queue order (FCFS, priority, VTC fair queueing, ...).
    * ``enable_prefix_caching``: reuse cached full blocks across requests.
    * ``preemption_mode``: "recompute" (free the victim's blocks; it recomputes prompt + output
      later) or "swap" (copy its KV to host blocks; falls back to recompute when the host is full).
    * ``watermark``: fraction of device blocks admission keeps free, to avoid immediate preemption.
    * ``preempt_rank``: Request -> int; when blocks run out, the running request with the highest
      rank is preempted first, the latest arrival among equals (default: all 0, vLLM's rule).
    """

    max_num_seqs: int = 256
    order: QueueOrder = FCFS
    enable_prefix_caching: bool = False
    preemption_mode: str = "recompute"
    watermark: float = 0.01
    preempt_rank: Callable[[Request], int] = same_rank

    def __post_init__(self):
        _check_option("max_num_seqs", self.max_num_seqs, 1)
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(
                f"scheduler option preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}"
            )
        if not isinstance(self.watermark, (int, float)) or not 0 <= self.watermark < 1:
            raise ValueError(f"scheduler option watermark must be in [0, 1), got {self.watermark!r}")
        if not callable(self.preempt_rank):
            raise ValueError(f"scheduler option preempt_rank must be a function Request -> int, got {self.preempt_rank!r}")
        missing = [m for m in ("empty", "push", "peek", "pop", "remove", "contains", "size", "items") if not hasattr(self.order, m)]
        if missing:
            raise ValueError(
                f"scheduler option order must be a queue order (KeyedOrder, FairOrder, ...); "
                f"{self.order!r} lacks {', '.join(missing)}"
            )
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(
                f"scheduler option enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}"
            )

    # -- protocol ------------------------------------------------------------------------------
    def init(self, kv: KVConfig) -> SchedulerState:
        if not isinstance(kv, KVConfig):
            raise ValueError(f"init() needs a KVConfig, got {type(kv).__name__}")
        return SchedulerState(
            kv=KVState.create(kv, self.enable_prefix_caching),
            waiting=self.order.empty(),
            running=RunningBatch.empty(),
            swapped=KeyedQueue(),
            outputs=TokenBuffer(),
        )

    def add_request(self, state: SchedulerState, request: Request, now: float) -> SchedulerState:
        if not isinstance(request, Request):
            raise ValueError(f"add_request() needs a Request, got {type(request).__name__}")
        cfg = state.kv.config
        rid = request.request_id
        self.check_servable(request, cfg)
        if self.status(state, rid) is not None:
            raise ValueError(f"request {rid!r} is already in the scheduler")
        # The per-request O(prompt) work happens once, here: hash chain and id array.
        hashes = prompt_block_hashes(request, cfg.block_size) if self.enable_prefix_caching else ()
        if request.has_real_tokens:
            _ = request.prompt_array  # built now, once, rather than in the first step that needs it
        seq = SeqState(request, state.next_seq_no, block_hashes=hashes)
        return evolve(
            state,
            waiting=self.order.push(state.waiting, seq, is_arrival=True),
            next_seq_no=state.next_seq_no + 1,
        )

    def abort(self, state: SchedulerState, request_id: str, now: float) -> SchedulerState:
        run = state.running
        r = run.row_index(request_id)
        if r is not None:
            pool = state.kv.device.free(reversed(run.block_tables[r]))
            inflight = state.inflight
            if inflight is not None:
                keep = inflight.rows != r
                rows = inflight.rows[keep]
                inflight = Inflight(inflight.step, rows - (rows > r), inflight.entries[keep])
            return evolve(
                state,
                kv=evolve(state.kv, device=pool),
                running=run.drop([r]),
                outputs=state.outputs.release([int(run.slot[r])]),
                inflight=inflight,
            )
        if self.order.contains(state.waiting, request_id):
            return evolve(state, waiting=self.order.remove(state.waiting, request_id))
        if request_id in state.swapped:
            seq = state.swapped.get(request_id)
            return evolve(
                state,
                kv=evolve(state.kv, host=state.kv.host.free(seq.host_blocks)),
                swapped=state.swapped.remove(request_id),
            )
        return state

    @abc.abstractmethod
    def schedule(self, state: SchedulerState, now: float) -> tuple[SchedulerState, BatchPlan]:
        """Plans one step; each policy composes it from StepBuilder moves."""

    def update(self, state: SchedulerState, plan: BatchPlan, out: StepOutput, now: float) -> SchedulerState:
        return apply_step_output(self, state, plan, out)

    # -- helpers for policies and callers -------------------------------------------------------
    def check_servable(self, request: Request, cfg: KVConfig) -> None:
        """Raises ValueError naming the problem when ``request`` could never finish on a KV cache
        of ``cfg`` under this policy, whatever else is queued (``add_request`` rejects it)."""
        if request.max_total_tokens > cfg.capacity_tokens:
            raise ValueError(
                f"request {request.request_id!r}: prompt ({request.prompt_len}) + max_new_tokens "
                f"({request.sampling.max_new_tokens}) = {request.max_total_tokens} tokens exceed the "
                f"whole KV cache ({cfg.num_blocks} blocks x {cfg.block_size} = {cfg.capacity_tokens} "
                f"tokens): it could never finish"
            )
        self.check_admissible(request)

    def check_admissible(self, request: Request) -> None:
        """Raises ValueError when this policy could never run ``request`` (beyond KV capacity)."""

    def status(self, state: SchedulerState, request_id: str) -> Optional[RequestStatus]:
        """Where ``request_id`` is, or None when the scheduler does not hold it."""
        if state.running.row_index(request_id) is not None:
            return RequestStatus.RUNNING
        if self.order.contains(state.waiting, request_id):
            return RequestStatus.WAITING
        if request_id in state.swapped:
            return RequestStatus.SWAPPED
        return None

    def waiting_requests(self, state: SchedulerState) -> list[SeqState]:
        """The waiting queue in the order it would be served now (O(n log n): inspection)."""
        return self.order.items(state.waiting)


@dataclasses.dataclass(frozen=True)
class WholePromptScheduler(BatchingScheduler):
    """Policies that never split a prefill: a prompt (or a recompute of prompt + output) must fit
    ``max_num_batched_tokens`` in one step, so longer requests are rejected at ``add_request``."""

    max_num_batched_tokens: int = 8192

    def __post_init__(self):
        super().__post_init__()
        _check_option("max_num_batched_tokens", self.max_num_batched_tokens, 1)

    def longest_prefill(self, request: Request) -> int:
        """The most tokens one prefill of ``request`` may need."""
        return request.prompt_len

    def check_admissible(self, request: Request) -> None:
        need = self.longest_prefill(request)
        if need > self.max_num_batched_tokens:
            raise ValueError(
                f"request {request.request_id!r} needs a {need}-token prefill but "
                f"{type(self).__name__} computes whole prefills and max_num_batched_tokens is "
                f"{self.max_num_batched_tokens}; raise it or use a chunked-prefill policy (sarathi)"
            )
