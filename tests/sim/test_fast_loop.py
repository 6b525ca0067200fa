"""The simulator's fast loop (``jaxserve.sim.fast_loop``) writes exactly the reference loop's EventLog.

``run_fast`` re-implements ``run_replica`` over a ``SimExecutor`` for the common case (vllm or
sarathi, FCFS, recompute preemption, no prefix caching, roofline costs, one replica) with block
counts and mutable state. Every test compares ``run_fast(...).freeze()`` with the reference's field
by field, bit for bit (``fast_loop_testing.assert_logs_equal`` names the first differing field and
index, and prints the case as a reproducer).

The property tests prove what they cover: each runs its own hypothesis exploration, then asserts
that the workloads took every path listed in ``REQUIRED`` (preemption and re-admission, each kind
of rejection, idle gaps, tied arrivals, full batches, same-step finishes, aligned chunks, stop
tokens), so it is meaningful alone and in any order; the exhaustive run also requires the ``RARE``
ones (preemption mid-prefill, ...), which the default run reaches by construction. Options whose
effect random workloads cannot be shown to reach (the watermark, a seat limit, chunk alignment, the
token budget) get dedicated examples that check the option changes the reference log before
comparing. Arrivals exactly at step ends, cost-model shapes and options, the Azure sample and
``why_not_fast``'s reasons have their own tests.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import jaxserve
from config_defaults import default_config
from fast_loop_testing import (
    Case, assert_logs_equal, cases, cost_model, log_difference, paths, req,
)
from jaxserve.calibration.fit import FEATURES, StepTimeModel
from jaxserve.kv import KVConfig
from jaxserve.runtime import RunLimits, run_replica
from jaxserve.runtime.step_geometry import StepGeometry
from jaxserve.scheduler.base import BatchingScheduler
from jaxserve.scheduler.chunking import Chunked
from jaxserve.scheduler.queues import KeyedOrder, priority_key
from jaxserve.scheduler.sarathi import SarathiScheduler
from jaxserve.scheduler.step import StepBuilder
from jaxserve.scheduler.vllm import VLLMScheduler
from jaxserve.sim import NanoSchedule, OverlapCostModel, get_hardware, get_model
from jaxserve.sim.fast_loop import run_fast, why_not_fast
from jaxserve.sim.executor import SimExecutor
from jaxserve.sim.profiled_cost_model import ProfiledCostModel
from jaxserve.sim.simulate import build_sim

NAMES = ("vllm", "sarathi")
COMMON = {"preempt", "preempt-decoding", "readmit", "reject-capacity", "idle-gap", "tied-arrivals",
          "finish-same-step", "stop-token"}  # fmt: skip
REQUIRED = {
    # vllm rejects requests whose recompute could not fit max_num_batched_tokens; its whole-prompt
    # prefills sample, so a preempted row always decodes.
    "vllm": COMMON,
    "sarathi": COMMON | {"aligned-chunks", "reject-context", "max-num-seqs-full"},
}
# Paths that some seeds reach in under 3 of the default run's 90 examples (hypothesis's examples
# change with the modules a session imports, so its seed is not fixed): required of the exhaustive
# run, and reached by construction in the default one (test_preemption_mid_prefill,
# test_max_num_seqs_binding, test_edge_cases["all rejected"], test_prefill_budget_rejection).
RARE = {"vllm": {"reject-context", "max-num-seqs-full", "reject-prefill-budget"}, "sarathi": {"preempt-mid-prefill"}}


def check(case: Case) -> set[str]:
    """The fast loop's log equals the reference's; returns the paths the run took."""
    expected = case.reference()
    assert_logs_equal(expected, case.fast(), case)
    return paths(case, expected)


def check_drawn(case: Case) -> set[str]:
    """``check`` of a case hypothesis drew; its statistics count the paths taken."""
    taken = check(case)
    for path in sorted(taken):
        event(path)
    return taken


def explore(name: str, max_examples: int, derandomize: bool) -> collections.Counter:
    """Runs ``max_examples`` random cases of ``name`` through ``check``; per path, how many took it."""
    hits = collections.Counter()

    @settings(max_examples=max_examples, deadline=None, derandomize=derandomize, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=cases(name))
    def one(case):
        hits.update(check_drawn(case))

    one()
    return hits


@pytest.mark.parametrize("name", NAMES)
def test_fast_loop_equals_reference_on_random_workloads(name):
    hits = explore(name, max_examples=90, derandomize=True)
    missing = sorted(REQUIRED[name] - set(hits))
    assert not missing, f"{name}: random workloads never reached {missing}; reached {dict(hits)}"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_fast_loop_equals_reference_on_random_workloads_exhaustive(name):
    hits = explore(name, max_examples=2000, derandomize=False)
    missing = sorted((REQUIRED[name] | RARE[name]) - set(hits))
    assert not missing, f"{name}: random workloads never reached {missing}; reached {dict(hits)}"


def test_log_difference_names_the_first_differing_field_and_index():
    log = Case(jaxserve.scheduler.make("vllm"), KVConfig(100, 4), (), (req("a", 0.0, 30, 5), req("b", 0.1, 20, 3))).reference()
    assert log_difference(log, log) is None
    ends = log.step_end_s.copy()
    ends[3] = np.nextafter(ends[3], 1.0)  # one ulp
    assert log_difference(log, dataclasses.replace(log, step_end_s=ends)).startswith("step_end_s: index 3:")
    assert log_difference(log, dataclasses.replace(log, finish_reason=("length", "stop"))).startswith("finish_reason: index 1:")
    assert log_difference(log, dataclasses.replace(log, rewaits=np.zeros((1, 3)))).startswith("rewaits: shape (0, 3)")
    assert log_difference(log, dataclasses.replace(log, lost_tokens=1)).startswith("lost_tokens: 0 != 1")


# -- arrivals exactly at step boundaries ----------------------------------------------------------
@st.composite
def boundary_cases(draw) -> tuple[Case, list]:
    """A case, and requests to add as (fraction of the reference run's steps, prompt, max_new)."""
    case = draw(st.sampled_from(NAMES).flatmap(lambda name: cases(name, max_requests=15)))
    extra = draw(st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 120), st.integers(1, 30)), min_size=1, max_size=4))
    return case, extra


@settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(drawn=boundary_cases())
def test_arrivals_exactly_at_step_ends(drawn):
    """Requests that arrive exactly when a step ends (the reference adds them before the next
    schedule: ``arrival <= now``; its closed-form runs sum their ends as the steps would). The
    steps before the earliest added arrival are unchanged, so it lands on a step end of the new
    run too."""
    case, extra = drawn
    ends = case.reference().step_end_s
    if not len(ends):
        return
    added = tuple(req(f"x{j}", float(ends[min(int(f * len(ends)), len(ends) - 1)]), p, n)
                  for j, (f, p, n) in enumerate(extra))  # fmt: skip
    check_drawn(dataclasses.replace(case, requests=case.requests + added))


# -- options that must bind: shown on the reference, then compared ------------------------------
def crowd(n: int, prompt: int, new: int, gap: float = 0.0) -> tuple:
    return tuple(req(f"r{i}", i * gap, prompt, new) for i in range(n))


def assert_option_binds(name: str, option: str, values: tuple, kv: KVConfig, requests: tuple, **opts) -> None:
    """Each value of ``option`` gives a different reference log (the option decides something in
    this workload), and the fast loop's equals the reference's for every value."""
    logs = []
    for value in values:
        case = Case(jaxserve.scheduler.make(name, **{option: value}, **opts), kv, (), requests)
        logs.append(case.reference())
        assert_logs_equal(logs[-1], case.fast(), case)
    for a, b in zip(logs, logs[1:]):
        assert log_difference(a, b) is not None, f"{name}.{option} in {values} changes nothing here"


@pytest.mark.parametrize("name", NAMES)
def test_watermark_binding(name):
    """100 one-token blocks; the second request (45 tokens) fits the 49 left after the first's
    51, but not above a 10-block watermark: it waits for the first to finish."""
    requests = (req("a", 0.0, 50, 40), req("b", 0.001, 45, 10))
    assert_option_binds(name, "watermark", (0.0, 0.1), KVConfig(100, 1), requests)


@pytest.mark.parametrize("name", NAMES)
def test_watermark_spares_an_empty_batch(name):
    """With nothing running, admission ignores the watermark: a request needing 95 of 100 blocks
    (above a 10-block watermark) starts at once, and so does the one queued behind it later."""
    requests = (req("big", 0.0, 95, 5), req("next", 0.0, 92, 3))
    case = Case(jaxserve.scheduler.make(name, watermark=0.1), KVConfig(100, 1), (), requests)
    assert "preempt" not in check(case)
    assert case.reference().finish_reason == ("length", "length")


@pytest.mark.parametrize("name", NAMES)
def test_max_num_seqs_binding(name):
    assert_option_binds(name, "max_num_seqs", (1, 3, 256), KVConfig(4000, 16), crowd(8, 40, 12))


def test_chunk_align_binding():
    """Chunks of 50 budget tokens cut down to a multiple of 16 (48), unless they end the prompt."""
    assert_option_binds("sarathi", "chunk_align", (1, 16), KVConfig(4000, 16), crowd(6, 130, 8, gap=0.002),
                        chunk_size=50)


def test_max_num_batched_tokens_binding():
    assert_option_binds("vllm", "max_num_batched_tokens", (120, 8192), KVConfig(4000, 16), crowd(6, 50, 8))


def test_decodes_cut_by_the_token_budget():
    """vllm admits two 2-token prompts a step within 4 batched tokens, so 8 rows come to decode
    under a 4-token budget: the first 4 decode, the rest wait. (Sarathi admits a row only with
    budget left after the decodes, so its decodes always fit.)"""
    case = Case(jaxserve.scheduler.make("vllm", max_num_batched_tokens=4), KVConfig(200, 2), (), crowd(8, 2, 3))
    check(case)
    log = case.reference()
    decode_only = log.step_prefill_tokens == 0
    assert np.any(decode_only & (log.step_running > log.step_seqs)), "no decode step left a running row out"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("block_size", [1, 7, 16])
def test_preemption_storm(name, block_size):
    """Many long-decoding requests in a pool that holds about three: preemption, re-admission and
    recompute again and again (sarathi with 16-token chunks)."""
    kv = KVConfig(600 // block_size, block_size)
    opts = {"chunk_size": 16} if name == "sarathi" else {}
    case = Case(jaxserve.scheduler.make(name, watermark=0.0, **opts), kv, (), crowd(12, 120, 60, gap=0.003))
    assert {"preempt", "readmit"} <= check(case)


@pytest.mark.parametrize("block_size", [1, 4])
def test_preemption_mid_prefill(block_size):
    """A 140-token prompt prefilled in chunks of 15 beside a decode: the decode's second block
    does not fit, and the latest arrival, still mid-prefill, is preempted and recomputed."""
    case = Case(jaxserve.scheduler.make("sarathi", chunk_size=16, watermark=0.0), KVConfig(160 // block_size, block_size),
                (), (req("a", 0.0, 16, 100), req("b", 0.001, 140, 5)))  # fmt: skip
    assert {"preempt-mid-prefill", "readmit"} <= check(case)


# -- edge cases -----------------------------------------------------------------------------------
EDGES = {
    "no requests": ((), RunLimits()),
    "one token": ((req("a", 0.0, 1, 1),), RunLimits()),
    "all rejected": ((req("a", 0.0, 100, 10), req("b", 0.0, 5000, 1)), RunLimits(max_context=64)),
    "stop at first token": ((req("a", 0.0, 30, 50, stop=(1,)), req("b", 0.0, 30, 5)), RunLimits()),
    "rejected after the last finish": ((req("a", 0.0, 30, 5), req("b", 50.0, 60, 5)), RunLimits(max_context=64)),
    "handed over unsorted": ((req("b", 1.0, 30, 5), req("a", 0.5, 30, 5), req("c", 0.5, 20, 3)), RunLimits()),
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("edge", sorted(EDGES))
def test_edge_cases(name, edge):
    requests, limits = EDGES[edge]
    check(Case(jaxserve.scheduler.make(name), KVConfig(64, 16), (), requests, limits))


def test_prefill_budget_rejection():
    """vllm rejects a request whose recompute (prompt + max_new - 1 tokens) exceeds
    max_num_batched_tokens, and serves the others around it."""
    requests = (req("a", 0.0, 20, 5), req("b", 0.0, 40, 20), req("c", 0.01, 30, 4))
    taken = check(Case(jaxserve.scheduler.make("vllm", max_num_batched_tokens=50), KVConfig(64, 16), (), requests))
    assert "reject-prefill-budget" in taken


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("cost", [(True,), (False, 210), (False, None, 150.0), (True, 1005, 250.0, 2e-4)])
def test_cost_model_options(name, cost):
    """Asynchronous scheduling (a busy period's first step is charged differently), a lower
    clock, a power cap, per-row host time: each changes step costs, and both loops agree."""
    case = Case(jaxserve.scheduler.make(name), KVConfig(300, 4), cost,
                crowd(10, 90, 30, gap=0.02) + (req("late", 30.0, 40, 4),))  # fmt: skip
    check(case)
    assert log_difference(case.reference(), dataclasses.replace(case, cost=()).reference()) is not None


SHAPES = [  # RooflineCostModel's other options: each changes a term of the step's totals
    {"parallel": (2, 1)},
    {"parallel": (1, 4)},
    {"parallel": (8, 2), "model": "llama-3-8b"},  # 8 KV heads: one per device
    {"parallel": (8, 1), "model": "falcon-180b"},  # parallel attention+MLP: one all-reduce a layer
    {"model": "opt-13b", "dtype": "int8", "kv_dtype": "fp16"},
    {"dtype": "fp32", "mfu": 0.3, "mbu": 0.6, "step_overhead_s": 0.0},
    {"hardware": "h100-sxm", "parallel": (2, 2), "link_efficiency": 0.5, "collective_latency_s": 1e-4},
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_cost_model_shapes(name, shape):
    """Tensor and pipeline parallelism, other models, dtypes, efficiencies, hardware: the fast
    loop's step totals cost what the plans cost."""
    cost = cost_model(async_scheduling=name == "sarathi", **shape)
    check(Case(jaxserve.scheduler.make(name, chunk_size=64) if name == "sarathi" else jaxserve.scheduler.make(name),
               KVConfig(300, 4), cost, crowd(10, 90, 30, gap=0.02) + (req("late", 30.0, 40, 4),)))  # fmt: skip


def test_progress_hook_ends_where_the_reference_does():
    """``on_progress`` is last called with the reference's last ``Progress`` (clock, steps,
    requests done), here with the clock moved to a late rejected arrival."""
    case = Case(jaxserve.scheduler.make("vllm"), KVConfig(300, 4), (),
                crowd(10, 90, 30, gap=0.02) + (req("x", 0.0, 9000, 1), req("late", 100.0, 9000, 1)))  # fmt: skip
    fast, reference = [], []
    run_fast(case.scheduler, case.kv, case.cost_model, list(case.requests), on_progress=fast.append)
    run_replica(case.scheduler, case.kv, SimExecutor(case.cost_model), list(case.requests), on_progress=reference.append)
    assert fast and fast[-1] == reference[-1]


# -- the packaged Azure sample ------------------------------------------------------------------
def azure_case(name: str, num_blocks: int = 0, max_requests: int | None = None) -> Case:
    """configs/default.py's workload (the first 10 minutes of the Azure conversation trace) and
    model (llama-3-8b on an A100) with scheduler ``name``; ``num_blocks`` > 0 shrinks the KV pool
    (0: sized from memory, as the default config does)."""
    config = default_config()
    config.scheduler.name = name
    config.kv.num_blocks = num_blocks
    config.workload.max_requests = max_requests
    run = build_sim(config)
    assert type(run.cost_model) is jaxserve.sim.RooflineCostModel
    return Case(run.scheduler, run.kv, run.cost_model, run.requests, run.limits)


def check_azure(name: str, num_blocks: int, max_requests: int | None) -> set[str]:
    case = azure_case(name, num_blocks, max_requests)
    expected = case.reference()
    diff = log_difference(expected, case.fast())
    assert diff is None, f"{name}, Azure sample ({max_requests or 'all'} requests, {case.kv}): {diff}"
    return paths(case, expected)


@pytest.mark.parametrize("name", NAMES)
def test_azure_sample_slice(name):
    """The first 300 requests, on the memory-sized pool and on a 400-block one (preemptions)."""
    check_azure(name, 0, 300)
    assert "preempt" in check_azure(name, 400, 300)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_blocks", [0, 2000])
def test_azure_sample_whole(name, num_blocks):
    check_azure(name, num_blocks, None)


# -- what the fast loop does not take -----------------------------------------------------------
LLAMA, A100 = get_model("llama-2-7b"), get_hardware("a100-80gb")
KV = KVConfig(1000, 16)


class TweakedVLLM(VLLMScheduler):
    """A subclass may override any step of the policy: the fast loop does not know its rules."""


@dataclasses.dataclass(frozen=True)
class ChunkedFirstComeOnly(BatchingScheduler):
    """A policy written outside the fast loop (sarathi's moves, 64-token steps): not one it ports."""

    def schedule(self, state, now):
        step = StepBuilder(self, state, 64)
        step.run_running(Chunked(1))
        step.admit_waiting(Chunked(1))
        return step.build()


def profiled() -> ProfiledCostModel:
    step_time = StepTimeModel((1e-4,) * len(FEATURES))  # any fitted model: its kind is what is refused
    return ProfiledCostModel(step_time, StepGeometry(attention="ragged", page_size=16), LLAMA, "test machine", None)


# (what, scheduler, kv, cost model, words one of which the reason must contain)
UNSUPPORTED = [
    ("prefix caching", VLLMScheduler(enable_prefix_caching=True), KV, None, ("prefix",)),
    ("swap with a host pool", VLLMScheduler(preemption_mode="swap"), KVConfig(1000, 16, 500), None, ("swap",)),
    ("vtc order", jaxserve.scheduler.make("vtc"), KV, None, ("order", "fcfs", "vtc", "fair")),
    ("vtc on sarathi", jaxserve.scheduler.make("vtc", base="sarathi"), KV, None, ("order", "fcfs", "vtc", "fair")),
    ("priority order", SarathiScheduler(order=KeyedOrder(priority_key)), KV, None, ("order", "fcfs", "priority")),
    ("a subclass", TweakedVLLM(), KV, None, ("tweakedvllm", "subclass", "class")),
    ("another policy", ChunkedFirstComeOnly(), KV, None, ("chunkedfirstcomeonly", "polic", "scheduler")),
    ("profiled cost model", VLLMScheduler(), KV, "profiled", ("profiled", "cost model", "roofline")),
    ("overlap cost model", VLLMScheduler(), KV, "overlap", ("overlap", "nano", "cost model", "roofline")),
    ("a preemption rank", SarathiScheduler(preempt_rank=lambda r: r.priority), KV, None, ("preempt_rank", "rank")),
]  # fmt: skip


def _cost(kind):
    if kind == "profiled":
        return profiled()
    if kind == "overlap":
        return OverlapCostModel(LLAMA, A100, schedule=NanoSchedule(2, 0.1, 0.0))
    return cost_model()


@pytest.mark.parametrize("what, scheduler, kv, cost, words", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_why_not_fast_names_the_reason(what, scheduler, kv, cost, words):
    reason = why_not_fast(scheduler, kv, _cost(cost), RunLimits())
    assert isinstance(reason, str) and reason, f"{what}: why_not_fast returned {reason!r}"
    assert any(w in reason.lower() for w in words), f"{what}: the reason {reason!r} names none of {words}"
    with pytest.raises(ValueError, match="run_fast"):
        run_fast(scheduler, kv, _cost(cost), [req("a", 0.0, 10, 2)])


LIMITS = [
    ("time limit", RunLimits(max_sim_time_s=0.05), ("max_time", "time")),
    ("step limit", RunLimits(max_steps=3), ("max_steps", "step")),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("what, limits, words", LIMITS, ids=[x[0] for x in LIMITS])
def test_run_limits_are_refused_or_kept(name, what, limits, words):
    """A run cut by a limit: the fast loop names the limit it cannot keep, or keeps it exactly."""
    case = Case(jaxserve.scheduler.make(name), KVConfig(300, 4), (), crowd(10, 90, 30, gap=0.02), limits)
    reason = why_not_fast(case.scheduler, case.kv, case.cost_model, limits)
    if reason is None:
        check(case)
    else:
        assert any(w in reason.lower() for w in words), reason


def test_duplicate_request_ids_are_refused():
    requests = [req("a", 0.0, 10, 2), req("a", 1.0, 10, 2)]
    reason = why_not_fast(VLLMScheduler(), KV, cost_model(), RunLimits(), requests)
    assert reason is not None and "duplicate" in reason.lower()
    with pytest.raises(ValueError, match="duplicate"):
        run_fast(VLLMScheduler(), KV, cost_model(), requests)


SUPPORTED = [
    ("vllm", VLLMScheduler(), cost_model()),
    ("sarathi", SarathiScheduler(chunk_size=64, chunk_align=8, max_num_seqs=4, watermark=0.0), cost_model()),
    ("vllm via the registry", jaxserve.scheduler.make("vllm", max_num_batched_tokens=512), cost_model(True, 1005, 250.0)),
    ("swap mode without a host pool", VLLMScheduler(preemption_mode="swap"), cost_model()),
]  # fmt: skip


@pytest.mark.parametrize("what, scheduler, cost", SUPPORTED, ids=[s[0] for s in SUPPORTED])
def test_why_not_fast_accepts_the_common_case(what, scheduler, cost):
    limits = RunLimits(max_context=4096)
    assert why_not_fast(scheduler, KV, cost, limits) is None
    check(Case(scheduler, KVConfig(200, 4), cost, crowd(10, 90, 30, gap=0.02), limits))
