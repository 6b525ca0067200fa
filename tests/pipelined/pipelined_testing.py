"""A model-free executor for the asynchronous loop's tests, and drivers for both loops.

``ContextHashExecutor`` keeps a token-id "KV cache" (one id per block slot): a step writes each
row's input ids at their positions through the row's block table, and a sampling row's token is a
hash of every id its context holds, read back through the table. So a token depends on exactly
what the real model's would (the inputs, placed in the right blocks, and nothing overwritten
since), and a wrong input id, a block written by someone else or a stale prefix-cache hit changes
it. Launch order is device order, as under JAX (every step chains on the cache).
"""

from __future__ import annotations

import time
import zlib
from typing import NamedTuple

import numpy as np

from jaxserve.plan import BatchPlan, StepOutput
from jaxserve.runtime.executor import Executor
from jaxserve.runtime.pipelined import PipelinedReplica
from jaxserve.runtime.replica import Replica

EMPTY = -1  # a never-written slot


class Prepared(NamedTuple):
    plan: BatchPlan
    start: float
    compile_s: float = 0.0


class Launched(NamedTuple):
    plan: BatchPlan
    tokens: np.ndarray
    compile_s: float = 0.0


class ContextHashExecutor(Executor):
    """See the module docstring. ``vocab``: token ids are in ``[0, vocab)``."""

    def __init__(self, num_blocks: int, block_size: int, num_host_blocks: int = 0, vocab: int = 16):
        self.kv = np.full((num_blocks, block_size), EMPTY, np.int64)
        self.host = np.full((max(num_host_blocks, 1), block_size), EMPTY, np.int64)
        self.block_size, self.vocab = block_size, vocab
        self.launches = 0

    def prepare(self, plan: BatchPlan) -> Prepared:
        for d, h in plan.swap_out_blocks:
            self.host[h] = self.kv[d]
        for h, d in plan.swap_in_blocks:
            self.kv[d] = self.host[h]
        for s, d in plan.copy_blocks:
            self.kv[d] = self.kv[s]
        return Prepared(plan, time.perf_counter())

    def launch(self, prepared: Prepared, patch=None, after=None) -> Launched:
        plan, bs = prepared.plan, self.block_size
        ids = plan.token_ids.astype(np.int64)
        cu = plan.cu_q_lens
        if patch is not None and len(patch[0]):
            ids[cu[patch[0]]] = patch[1]
        if after is not None and len(after[0]):  # ("on the device": the earlier launch's tokens)
            ids[cu[after[0]]] = after[2].tokens[after[1]]
        tokens = []
        for i, (nc, n, table) in enumerate(zip(plan.num_computed_tokens.tolist(), plan.num_new_tokens.tolist(),
                                               plan.block_tables)):  # fmt: skip
            for j, pos in enumerate(range(nc, nc + n)):
                self.kv[table[pos // bs], pos % bs] = ids[cu[i] + j]
            if plan.samples_token[i]:
                context = np.array([self.kv[table[p // bs], p % bs] for p in range(nc + n)], np.int64)
                assert (context != EMPTY).all(), f"{plan.request_ids[i]} reads a never-written KV slot"
                tokens.append(zlib.crc32(context.tobytes()) % self.vocab)
        self.launches += 1
        return Launched(plan, np.array(tokens, np.int64))

    def is_done(self, launched: Launched) -> bool:
        return True

    def collect(self, launched: Launched):
        return StepOutput.for_plan(launched.plan, launched.tokens, duration_s=1e-3), {}

    def execute(self, plan: BatchPlan) -> StepOutput:
        return self.collect(self.launch(self.prepare(plan)))[0]


def drive(replica, requests, arrival_steps, aborts=(), max_steps: int = 500) -> dict:
    """Steps ``replica`` (a ``Replica`` or ``PipelinedReplica``); ``requests[i]`` is added before
    step ``arrival_steps[i]``, ``aborts`` are ``(step, request id)`` applied before that step.
    Returns request id -> FinishedRequest. Every request is finished or aborted at the end.
    ``replica.aborted_running_in_flight`` counts aborts of a running request while a step ran."""
    finished = {}
    replica.aborted_running_in_flight = 0
    replica._on_finished = lambda fs: finished.update((f.request_id, f) for f in fs)
    pending = sorted(range(len(requests)), key=lambda i: (arrival_steps[i], i))
    aborts = sorted(aborts)
    nxt = k = calls = 0
    while calls < max_steps:
        while nxt < len(pending) and arrival_steps[pending[nxt]] <= calls:
            replica.add(requests[pending[nxt]])
            nxt += 1
        while k < len(aborts) and aborts[k][0] <= calls:
            abort(replica, aborts[k][1])
            k += 1
        calls += 1
        if replica.next_event_time == float("inf"):
            if nxt == len(pending) and k == len(aborts):
                break
            continue
        replica.step()
    if isinstance(replica, PipelinedReplica):
        replica.drain()
    assert calls < max_steps, "the run did not end"
    return finished


def abort(replica, request_id: str) -> None:
    """Aborts ``request_id`` between steps (the synchronous ``Replica`` has no abort of its own)."""
    if isinstance(replica, PipelinedReplica):
        running = replica.state.running.row_index(request_id) is not None
        replica.aborted_running_in_flight += replica.in_flight and running
        replica.abort(request_id)
    else:
        replica.state = replica.scheduler.abort(replica.state, request_id, replica.now)


def assert_no_leaks(state) -> None:
    """Nothing held: every device block free or evictable, no host block used, no output slot taken."""
    assert not state.has_unfinished
    assert state.kv.device.num_used == 0, f"{state.kv.device.num_used} device blocks still held"
    assert state.kv.device.num_free == state.kv.config.num_blocks
    assert state.kv.host.num_used == 0
    assert state.outputs.num_stacked == state.outputs.next_fresh, "output slots not given back"
    assert not state.incoming and not state.outgoing


__all__ = ["ContextHashExecutor", "PipelinedReplica", "Replica", "abort", "assert_no_leaks", "drive"]
