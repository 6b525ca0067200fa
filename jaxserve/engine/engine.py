"""Engine: the serving loop on a real model, shared with the simulator.

It runs ``sim.simulator.run_replica`` (add arrivals -> schedule -> execute -> update -> log) with the
ModelRunner as the executor, so the engine and the simulator write the same event log and
metrics. Time is a *measured-time clock*: each step advances it by the step's measured wall time
(packing + device step + sampling + host transfer) and an idle engine jumps to the next arrival
instead of sleeping, so a trace replays as fast as the hardware allows while every latency is
what a server running those steps back to back would show (scheduler time is not counted).

With ``async_scheduling`` the loop is ``runtime.pipelined.run_pipelined`` instead: the host
schedules and packs step N+1 while the device runs step N (the same tokens; a step's time is then
the interval between successive steps' tokens, which includes any host time the device did not hide).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from jaxserve.engine.model_runner import ModelRunner
from jaxserve.runtime.events import EventLog
from jaxserve.kv.config import KVConfig
from jaxserve.plan import BatchPlan, StepOutput
from jaxserve.request import Request
from jaxserve.scheduler.seq import FinishedRequest
from jaxserve.runtime import ProgressHook, RunLimits, run_replica
from jaxserve.runtime.pipelined import INPUTS, OverlapStats, PipelinedReplica, run_pipelined


@dataclasses.dataclass
class EngineRun:
    log: EventLog
    finished: dict[str, FinishedRequest]  # request id -> outputs, for every request that finished


class Engine:
    """A scheduler driving a ModelRunner over a KV pool of ``kv`` (the runner's cache shape);
    ``async_scheduling``: schedule each step while the previous one runs (module docstring), the
    next step's decode inputs gathered on the device (``async_inputs="device"``) or patched on the
    host (``"host"``: ``runtime.pipelined.PipelinedReplica``). After an async ``serve``,
    ``overlap`` holds its host timings (``runtime.pipelined.OverlapStats``)."""

    def __init__(self, runner: ModelRunner, scheduler, kv: KVConfig, *, async_scheduling: bool = False,
                 async_inputs: str = "device"):  # fmt: skip
        if (kv.num_blocks, kv.block_size) != (runner.kv.num_blocks, runner.kv.block_size):
            raise ValueError(f"scheduler KV {kv} does not match the runner's cache {runner.kv}")
        if kv.num_host_blocks > runner.kv.num_host_blocks:  # swap-outs would have nowhere to go
            raise ValueError(f"scheduler KV {kv} has more host blocks than the runner's host pool {runner.kv}")
        if not isinstance(async_scheduling, bool):
            raise ValueError(f"async_scheduling must be a bool, got {async_scheduling!r}")
        if async_scheduling and type(runner)._pack is not ModelRunner._pack:
            # (ESP's runner repacks rows per device: launch() would patch the wrong ones)
            raise ValueError(f"async_scheduling runs on a plain ModelRunner, not a {type(runner).__name__}")
        self.runner = runner
        self.scheduler = scheduler
        self.kv = kv
        if async_inputs not in INPUTS:
            raise ValueError(f"async_inputs must be one of {INPUTS}, got {async_inputs!r}")
        self.async_scheduling = async_scheduling
        self.async_inputs = async_inputs
        self.overlap: OverlapStats | None = None

    def serve(
        self,
        requests: Sequence[Request],
        *,
        limits: RunLimits | None = None,
        on_progress: ProgressHook | None = None,
        progress_every: int = 50,
        on_step: Callable[[BatchPlan, StepOutput], None] | None = None,
    ) -> EngineRun:
        """Serves ``requests`` by arrival time; rejected requests are in the log with a reason.
        Request ids must be unique (a duplicate would re-register, and so re-parameterize, the
        running request of that id; the log keys requests by id too). ``on_step(plan, output)`` is
        called after every executed step (e.g. to record measured step times)."""
        seen: set[str] = set()
        for r in requests:
            if r.request_id in seen:
                raise ValueError(f"request id {r.request_id!r} appears more than once")
            seen.add(r.request_id)
        finished: dict[str, FinishedRequest] = {}
        runner = self.runner

        def after_step(plan, out, state):
            if on_step is not None:
                on_step(plan, out)
            for f in state.finished:
                finished[f.request_id] = f
                runner.release(f.request_id)

        limits = limits or RunLimits(max_context=runner.max_model_len)
        try:
            if self.async_scheduling:
                replica = PipelinedReplica(self.scheduler, self.kv, runner, limits=limits, admit=runner.register,
                                           on_step=after_step, inputs=self.async_inputs)  # fmt: skip
                log = run_pipelined(self.scheduler, self.kv, runner, requests, limits=limits, on_progress=on_progress,
                                    progress_every=progress_every, replica=replica)  # fmt: skip
                self.overlap = replica.stats
                return EngineRun(log, finished)
            log = run_replica(
                self.scheduler,
                self.kv,
                runner,
                requests,
                limits=limits,
                fast_forward=False,
                admit=runner.register,
                on_step=after_step,
                on_progress=on_progress,
                progress_every=progress_every,
            )
        finally:
            for r in requests:
                runner.release(r.request_id)
        return EngineRun(log, finished)
