"""Cases, generators and an exact log comparison for the fast-loop equivalence tests
(tests/sim/test_fast_loop.py): the fast loop (``jaxserve.sim.fast_loop.run_fast``) must write the
same EventLog as the reference loop (``run_replica`` over a ``SimExecutor``), field by field, bit
for bit.

A ``Case`` is one run's inputs; ``cases(name)`` draws random ones (hypothesis) built to reach the
paths where two implementations of the loop can drift apart: preemption by recompute (of a decoding
row and of a row mid-prefill), re-admission, rejection (context, KV capacity, prefill budget),
idle gaps, tied and burst arrivals, batch-seat and token-budget limits, aligned chunks, stop tokens,
limits on the context. ``paths(case, log)`` names the ones a run took, read from the
reference log.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import numpy as np
from hypothesis import strategies as st

import jaxserve
from jaxserve.kv import KVConfig
from jaxserve.runtime import RunLimits, run_replica
from jaxserve.runtime.events import FrozenLog
from jaxserve.sim import RooflineCostModel, get_hardware, get_model
from jaxserve.sim.executor import SIM_TOKEN_ID, SimExecutor

MODEL, HARDWARE = "llama-2-7b", "a100-80gb"  # a small model on the default accelerator


# -- comparing logs ------------------------------------------------------------------------------
def _first_unequal(x: np.ndarray, y: np.ndarray) -> Optional[str]:
    """Where two arrays first differ (``None``: same shape and values, NaN equal to NaN)."""
    if x.shape != y.shape:
        return f"shape {x.shape} != {y.shape}"
    if x.dtype != y.dtype:
        return f"dtype {x.dtype} != {y.dtype}"
    if x.dtype == object:
        same = np.array([a == b for a, b in zip(x.ravel().tolist(), y.ravel().tolist())], bool).reshape(x.shape)
    elif x.dtype.kind == "f":
        same = (x == y) | (np.isnan(x) & np.isnan(y))
    else:
        same = x == y
    if same.all():
        return None
    at = tuple(int(i) for i in np.argwhere(~same)[0])
    index = at[0] if len(at) == 1 else at
    if x.dtype.kind == "f":
        return f"index {index}: {float(x[at])!r} != {float(y[at])!r} (difference {float(x[at]) - float(y[at]):.3g})"
    return f"index {index}: {x[at]!r} != {y[at]!r}"


def log_difference(expected: FrozenLog, actual: FrozenLog) -> Optional[str]:
    """The first field (in FrozenLog's order) and index where ``actual`` differs from ``expected``,
    as a sentence; ``None`` when they are equal field by field (arrays exactly, NaN = NaN)."""
    for f in dataclasses.fields(FrozenLog):
        x, y = getattr(expected, f.name), getattr(actual, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            where = _first_unequal(np.asarray(x), np.asarray(y))
        elif isinstance(x, tuple) and isinstance(y, tuple):
            where = next((f"index {i}: {a!r} != {b!r}" for i, (a, b) in enumerate(zip(x, y)) if a != b), None)
            if where is None and len(x) != len(y):
                where = f"length {len(x)} != {len(y)}"
        else:
            where = None if type(x) is type(y) and x == y else f"{x!r} != {y!r}"
        if where is not None:
            return f"{f.name}: {where} (expected: reference loop, actual: fast loop)"
    return None


def assert_logs_equal(expected: FrozenLog, actual: FrozenLog, case: Optional["Case"] = None) -> None:
    """``log_difference`` is None; the failure names the field and index, and the case."""
    diff = log_difference(expected, actual)
    if diff is not None:
        raise AssertionError(diff + ("" if case is None else "\n" + case.describe()))


# -- cases ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def cost_model(async_scheduling: bool = False, frequency_mhz: Optional[int] = None, power_cap_w: Optional[float] = None,
               per_seq_overhead_s: float = 0.0, parallel: tuple[int, int] = (1, 1), model: str = MODEL,
               hardware: str = HARDWARE, **options) -> RooflineCostModel:
    """The roofline model of ``model`` on ``parallel`` = (tp, pp) devices of ``hardware`` with these
    options (``options``: RooflineCostModel's others), built once per options."""
    tp, pp = parallel
    return RooflineCostModel(get_model(model), get_hardware(hardware), tp=tp, pp=pp, async_scheduling=async_scheduling,
                             frequency_mhz=frequency_mhz, power_cap_w=power_cap_w,
                             per_seq_overhead_s=per_seq_overhead_s, **options)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Case:
    """One run's inputs: a scheduler, its KV, a cost model (or the options of ``cost_model``),
    requests (in the order handed over, not necessarily by arrival) and limits."""

    scheduler: object
    kv: KVConfig
    cost: object  # a cost model, or a tuple: cost_model(*cost)
    requests: tuple
    limits: RunLimits = RunLimits()

    @property
    def cost_model(self) -> RooflineCostModel:
        return cost_model(*self.cost) if isinstance(self.cost, tuple) else self.cost

    def reference(self) -> FrozenLog:
        """The reference loop's log."""
        return run_replica(self.scheduler, self.kv, SimExecutor(self.cost_model), list(self.requests),
                           limits=self.limits).freeze()  # fmt: skip

    def fast(self) -> FrozenLog:
        """The fast loop's log."""
        from jaxserve.sim.fast_loop import run_fast

        return run_fast(self.scheduler, self.kv, self.cost_model, list(self.requests), limits=self.limits).freeze()

    def describe(self) -> str:
        """A reproducer: every input as Python source."""
        rows = "\n".join(
            f"    req({r.request_id!r}, {r.arrival_time!r}, {r.prompt_len}, {r.sampling.max_new_tokens}"
            + (f", stop={r.sampling.stop_token_ids!r}" if r.sampling.stop_token_ids else "") + "),"
            for r in self.requests
        )
        cost = f"cost_model(*{self.cost!r})" if isinstance(self.cost, tuple) else repr(self.cost)
        return (f"scheduler = {self.scheduler!r}\nkv = {self.kv!r}\ncost_model = {cost}\n"
                f"limits = {self.limits!r}\nrequests = [\n{rows}\n]")  # fmt: skip


def req(rid: str, t: float, prompt_len: int, max_new_tokens: int, stop: tuple = (), client: str = "default",
        priority: int = 0) -> jaxserve.Request:
    """A length-only request arriving at ``t`` seconds; ``stop``: its stop token ids."""
    return jaxserve.Request(rid, prompt_len=prompt_len, arrival_time=t, client_id=client, priority=priority,
                            sampling=jaxserve.SamplingParams(max_new_tokens, stop_token_ids=stop))  # fmt: skip


# Inter-arrival gaps (s): a step of the small model takes ~5-40 ms here, so ties and bursts land
# inside one step, short gaps across a few, and long ones empty the replica (idle gaps).
_GAPS = st.sampled_from(["tie", "burst", "burst", "burst", "short", "short", "short", "short", "idle"]).flatmap(lambda kind: {
    "tie": st.just(0.0),
    "burst": st.floats(0.0, 0.01, allow_nan=False),
    "short": st.floats(0.01, 0.3, allow_nan=False),
    "idle": st.floats(1.0, 30.0, allow_nan=False),
}[kind])
_CROWD = st.one_of(st.just(0.0), st.floats(0.0, 0.01, allow_nan=False))
# SIM_TOKEN_ID is what the simulator samples: a request stopping on it finishes at its first token.
_STOPS = st.sampled_from([()] * 10 + [(SIM_TOKEN_ID,), (SIM_TOKEN_ID + 6,)])


@st.composite
def workloads(draw, max_requests: int = 40, capacity: int = 10**9, max_prompt: int = 300, max_new: int = 60,
              gaps=None) -> tuple:
    """Requests with random gaps, lengths, stop tokens, clients and priorities (FCFS ignores both),
    handed over in arrival order or reversed. Most prompts fit in 2/3 of ``capacity`` (KV tokens),
    so that several requests share the pool and preempt each other; one in eight is drawn up to
    ``max_prompt`` regardless (some exceed the pool). ``gaps``: the inter-arrival gaps (s), by
    default a mix of ties, bursts, short gaps and idle ones."""
    fitting = max(1, min(max_prompt, capacity * 2 // 3))
    prompts = st.one_of(*[st.integers(1, fitting)] * 7, st.integers(1, max_prompt))
    n = draw(st.integers(1, max_requests))
    news = st.one_of(st.integers(1, max_new), st.sampled_from([1, 2, 8]))  # repeats: rows finishing together
    rows = draw(st.lists(st.tuples(_GAPS if gaps is None else gaps, prompts, news, _STOPS, st.sampled_from(["a", "b"]),
                                   st.integers(0, 2)), min_size=n, max_size=n))  # fmt: skip
    t, requests = draw(st.floats(0.0, 2.0, allow_nan=False)), []
    for i, (gap, prompt, new, stop, client, priority) in enumerate(rows):
        t += gap
        requests.append(req(f"r{i}", t, prompt, new, stop, client, priority))
    return tuple(reversed(requests)) if draw(st.booleans()) else tuple(requests)


@st.composite
def kv_configs(draw) -> KVConfig:
    """Small device pools (24..1500 tokens) so that preemption is common and long requests exceed
    the whole cache; no host pool."""
    block_size = draw(st.integers(1, 16))
    return KVConfig(max(1, draw(st.integers(24, 1500)) // block_size), block_size)


@st.composite
def schedulers(draw, name: str):
    """``vllm`` (max_num_seqs, max_num_batched_tokens) or ``sarathi`` (chunk_size, chunk_align,
    max_num_seqs) with FCFS, recompute preemption and a watermark in [0, 0.1]."""
    opts = {
        "max_num_seqs": draw(st.sampled_from([256, 1, 2, 3, 4, 6, 8, 12])),
        "watermark": draw(st.one_of(st.just(0.0), st.just(0.01), st.floats(0.0, 0.1, allow_nan=False))),
    }
    if name == "vllm":
        opts["max_num_batched_tokens"] = draw(st.one_of(st.integers(1, 700), st.just(8192)))
    else:
        align = draw(st.one_of(st.just(1), st.integers(2, 32)))
        small = draw(st.sampled_from([True, True, False]))  # small chunks: long prefills, often preempted mid-way
        opts["chunk_size"] = draw(st.integers(align, 64) if small else st.integers(align, 600))
        opts["chunk_align"] = align
    return jaxserve.scheduler.make(name, **opts)


_COSTS = st.tuples(
    st.booleans(),  # async_scheduling
    st.sampled_from([None, None, 1005, 210]),  # frequency_mhz: the top clock, a mid and the lowest A100 clock
    st.sampled_from([None, None, 150.0, 250.0]),  # power_cap_w (A100 80GB: 100..400 W)
    st.sampled_from([0.0, 0.0, 2e-4]),  # per_seq_overhead_s
    st.sampled_from([(1, 1)] * 4 + [(2, 1), (1, 2), (2, 2)]),  # (tp, pp): collectives and stage sends
)


@st.composite
def limits(draw) -> RunLimits:
    """No limit mostly, else a context limit of 32..400 tokens. (The fast loop serves every
    request: it refuses simulated-time and step limits, ``why_not_fast``.)"""
    kind = draw(st.sampled_from(["none"] * 5 + ["context"] * 3))
    return RunLimits(max_context=draw(st.integers(32, 400)) if kind == "context" else None)


@st.composite
def cases(draw, name: str, max_requests: int = 40) -> Case:
    """A random case of policy ``name``; half of them a crowd (every gap under 10 ms), in which
    requests preempt each other more often."""
    kv = draw(kv_configs())
    gaps = _CROWD if draw(st.booleans()) else _GAPS
    return Case(draw(schedulers(name)), kv, draw(_COSTS), draw(workloads(max_requests, kv.capacity_tokens, gaps=gaps)),
                draw(limits()))  # fmt: skip


# -- which paths a run took ----------------------------------------------------------------------
CONTEXT_REJECTION = "rejected: prompt + max_new_tokens ="  # Replica.add
CAPACITY_REJECTION = "exceed the whole KV cache"  # BatchingScheduler.add_request
BUDGET_REJECTION = "-token prefill but"  # WholePromptScheduler.check_admissible


def paths(case: Case, log: FrozenLog) -> set[str]:
    """The paths the reference run of ``case`` took, read from its log ``log``."""
    out = set()
    reasons = log.finish_reason
    for path, text in (("reject-context", CONTEXT_REJECTION), ("reject-capacity", CAPACITY_REJECTION),
                       ("reject-prefill-budget", BUDGET_REJECTION)):  # fmt: skip
        if any(text in r for r in reasons):
            out.add(path)
    if "stop" in reasons:
        out.add("stop-token")
    if "unfinished" in reasons:
        out.add("stopped-by-limit")
    # A preempted row that got no token since it was (re)admitted was mid-prefill (a whole-prompt
    # prefill samples, so only a chunked one leaves a running row without a token).
    rewaits = log.rewaits
    if len(rewaits):
        out.add("preempt")
        admitted = {}  # request -> when it was last scheduled after (re)admission
        for i, t, back in zip(rewaits[:, 0].astype(int).tolist(), rewaits[:, 1].tolist(), rewaits[:, 2].tolist()):
            since = admitted.get(i, log.first_scheduled_s[i])
            mine = log.token_req == i
            got = np.count_nonzero(mine & (log.token_time_s > since) & (log.token_time_s <= t))
            out.add("preempt-decoding" if got else "preempt-mid-prefill")
            admitted[i] = back
        if np.isfinite(rewaits[:, 2]).any():
            out.add("readmit")
    ends, starts = log.step_end_s, log.step_end_s - log.step_duration_s
    if len(ends) > 1 and np.any(starts[1:] > ends[:-1] + 1e-9):
        out.add("idle-gap")
    finished = log.finish_s[np.isfinite(log.finish_s)]
    if len(np.unique(finished)) < len(finished):
        out.add("finish-same-step")
    if len(np.unique(log.arrival_s)) < len(log.arrival_s):
        out.add("tied-arrivals")
    sched = case.scheduler
    if np.any((log.step_running >= sched.max_num_seqs) & (log.step_waiting > 0)):
        out.add("max-num-seqs-full")
    if getattr(sched, "chunk_align", 1) > 1 and _has_chunked_prefill(log):
        out.add("aligned-chunks")
    return out


def _has_chunked_prefill(log: FrozenLog) -> bool:
    """Some request's first prefill spanned several steps: its first token came after the end of
    the step that first scheduled it."""
    req, times = log.request_tokens()
    if not len(req):
        return False
    first = np.unique(req, return_index=True)
    rows, first_token = first[0], times[first[1]]
    started = log.first_scheduled_s[rows]
    first_end = log.step_end_s[np.minimum(np.searchsorted(log.step_end_s, started, side="right"), len(log.step_end_s) - 1)]
    return bool(np.any(first_token > first_end))
