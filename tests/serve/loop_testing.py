"""Helpers of the serving tests: a fake executor whose tokens are predictable, and a sink that
collects a request's outputs."""

from __future__ import annotations

import threading
import time

import numpy as np

from jaxserve.plan import StepOutput
from jaxserve.request import Request, SamplingParams
from jaxserve.runtime import Executor

VOCAB = 50


class CountingExecutor(Executor):
    """Samples ``(last token of the row + 1) % VOCAB`` for every sampling row, so a prompt ending
    in ``t`` generates ``t+1, t+2, ...``; refuses ids outside ``[0, VOCAB)`` at ``register`` and
    raises in ``execute`` when a row holds ``poison`` (an exception attributable to a request).
    Each step sleeps ``step_s`` so that requests overlap as on a real engine."""

    def __init__(self, step_s: float = 0.002, poison: int | None = None):
        self.step_s = step_s
        self.poison = poison
        self.registered: set[str] = set()
        self.num_steps = 0

    def register(self, request: Request) -> None:
        bad = [t for t in request.prompt_token_ids if not 0 <= t < VOCAB]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {VOCAB})")
        self.registered.add(request.request_id)

    def release(self, request_id: str) -> None:
        self.registered.discard(request_id)

    def execute(self, plan) -> StepOutput:
        t0 = time.perf_counter()
        if self.poison is not None and self.poison in plan.token_ids.tolist():
            raise FloatingPointError("NaN logits")
        time.sleep(self.step_s)
        last = plan.token_ids[plan.cu_q_lens[1:] - 1]
        tokens = ((last + 1) % VOCAB)[plan.samples_token]
        self.num_steps += 1
        return StepOutput.for_plan(plan, np.asarray(tokens, np.int64), time.perf_counter() - t0)


def expected(prompt: list[int], n: int) -> list[int]:
    return [(prompt[-1] + 1 + i) % VOCAB for i in range(n)]


def request(rid: str, prompt: list[int], n: int, **sampling) -> Request:
    return Request(rid, prompt_token_ids=prompt, sampling=SamplingParams(max_new_tokens=n, temperature=0.0, **sampling))


class Collector:
    """A sink: keeps every output of one request; ``wait()`` until its last one."""

    def __init__(self):
        self.outputs = []
        self.done = threading.Event()

    def __call__(self, out) -> None:
        assert not self.done.is_set(), f"output after the last one: {out}"
        self.outputs.append(out)
        if out.finished:
            self.done.set()

    def wait(self, timeout: float = 30.0):
        assert self.done.wait(timeout), f"no last output within {timeout} s: {self.outputs}"
        return self

    @property
    def tokens(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def last(self):
        return self.outputs[-1]
