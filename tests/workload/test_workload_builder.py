"""build_requests and workload_from_config: replay, rescaling, windowing, synthetic workloads."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxserve import Request, SamplingParams
from jaxserve.workload import (
    ArrivalProcess,
    Empirical,
    Fixed,
    Pair,
    Trace,
    Uniform,
    build_requests,
    merge_workloads,
    read_trace,
    resolve_trace_path,
    traces_dir,
    workload_from_config,
)

needs_traces = pytest.mark.skipif(not traces_dir().is_dir(), reason="shared traces folder not present")

TRACE = Trace(
    arrival_s=[0.0, 1.0, 2.0, 4.0, 8.0],
    prompt_len=[10, 20, 30, 40, 50],
    output_len=[1, 2, 3, 4, 5],
    hash_ids=((1,), (1, 2), (3,), (4,), (5,)),
)


def times(requests):
    return [r.arrival_time for r in requests]


def synthetic(**kw):
    kw.setdefault("arrivals", ArrivalProcess("poisson", 2.0))
    kw.setdefault("lengths", Pair(Uniform(1, 100), Uniform(1, 50)))
    kw.setdefault("num_requests", 200)
    return build_requests(**kw)


def test_replay_maps_every_column():
    reqs = build_requests(TRACE, client_id="alice")
    assert all(isinstance(r, Request) for r in reqs)
    assert [r.request_id for r in reqs] == [f"alice-{i}" for i in range(5)]
    assert times(reqs) == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert [r.prompt_len for r in reqs] == [10, 20, 30, 40, 50]
    assert [r.sampling.max_new_tokens for r in reqs] == [1, 2, 3, 4, 5]
    assert not reqs[0].has_real_tokens and all(r.client_id == "alice" for r in reqs)
    assert reqs[1].prefix_block_hashes == (1, 2) and reqs[1].prefix_hash_block_size == 512


def test_sampling_template_keeps_its_other_fields():
    reqs = build_requests(TRACE, sampling=SamplingParams(max_new_tokens=1, temperature=0.0), id_prefix="r")
    assert reqs[4].request_id == "r4"
    assert reqs[4].sampling == SamplingParams(max_new_tokens=5, temperature=0.0)


def test_time_scale_multiplies_gaps():
    assert times(build_requests(TRACE, time_scale=0.5)) == [0.0, 0.5, 1.0, 2.0, 4.0]


def test_qps_rescales_to_the_exact_mean_rate():
    reqs = build_requests(TRACE, qps=2.0)
    t = times(reqs)
    assert (len(t) - 1) / t[-1] == pytest.approx(2.0)
    assert t == pytest.approx([0.0, 0.25, 0.5, 1.0, 2.0])
    with pytest.raises(ValueError, match="time_scale or qps"):
        build_requests(TRACE, qps=2.0, time_scale=0.5)
    with pytest.raises(ValueError, match="arrive at once"):
        build_requests(Trace([0.0, 0.0], [1, 1], [1, 1]), qps=1.0)


def test_window_is_in_source_seconds_and_rebased():
    reqs = build_requests(TRACE, start_s=1.0, duration_s=3.0)
    assert [r.request_id for r in reqs] == ["default-1", "default-2"]
    assert times(reqs) == [0.0, 1.0]
    reqs = build_requests(TRACE, start_s=1.5, max_requests=2, qps=1.0)
    assert [r.request_id for r in reqs] == ["default-2", "default-3"]
    assert times(reqs) == [0.0, 1.0]
    assert build_requests(TRACE, start_s=100.0) == []
    assert build_requests(TRACE, max_requests=0) == []


@settings(max_examples=80, deadline=None)
@given(
    start=st.floats(0, 10),
    duration=st.one_of(st.none(), st.floats(0.01, 10)),
    cap=st.one_of(st.none(), st.integers(0, 6)),
    scale=st.floats(0.1, 10),
)
def test_window_property(start, duration, cap, scale):
    reqs = build_requests(TRACE, start_s=start, duration_s=duration, max_requests=cap, time_scale=scale)
    source = np.asarray(TRACE.arrival_s)
    inside = (source >= start) & (source < start + duration if duration is not None else True)
    expected = np.flatnonzero(inside)[:cap]
    assert [r.request_id for r in reqs] == [f"default-{i}" for i in expected]
    if len(expected):
        assert times(reqs) == pytest.approx(((source[expected] - source[expected[0]]) * scale).tolist())


def test_synthetic_is_deterministic_for_a_seed():
    a, b, c = synthetic(seed=3), synthetic(seed=3), synthetic(seed=4)
    assert a == b and a != c
    assert len(a) == 200 and a[0].arrival_time == 0.0
    assert all(1 <= r.prompt_len <= 100 and 1 <= r.sampling.max_new_tokens <= 50 for r in a)


def test_arrivals_and_lengths_use_independent_streams():
    a = synthetic(seed=3)
    b = synthetic(seed=3, lengths=Pair(Fixed(7), Fixed(9)))
    assert times(a) == times(b)
    c = synthetic(seed=3, arrivals=ArrivalProcess("gamma", 2.0, cv=3.0))
    assert [r.prompt_len for r in a] == [r.prompt_len for r in c]


def test_explicit_arrival_times_and_replaced_trace_columns():
    reqs = build_requests(lengths=Pair(Fixed(5), Fixed(6)), arrivals=np.array([0.0, 0.5, 3.0]), num_requests=3)
    assert times(reqs) == [0.0, 0.5, 3.0]
    # Trace arrivals with sampled lengths: the prefix hashes no longer describe the prompts.
    reqs = build_requests(TRACE, lengths=Pair(Fixed(5), Fixed(6)))
    assert times(reqs) == times(build_requests(TRACE))
    assert all(r.prompt_len == 5 and r.prefix_block_hashes is None for r in reqs)
    # A length-only trace in file order, under a synthetic arrival process.
    lengths_only = Trace(None, [3, 4, 5], [1, 1, 1])
    reqs = build_requests(lengths_only, arrivals=ArrivalProcess("fixed", 2.0))
    assert times(reqs) == [0.0, 0.5, 1.0] and [r.prompt_len for r in reqs] == [3, 4, 5]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(trace=Trace(None, [3], [1])), "no timestamps"),
        (dict(trace=TRACE, num_requests=3), "max_requests"),
        (dict(lengths=Pair(Fixed(1), Fixed(1))), "num_requests"),
        (dict(lengths=Pair(Fixed(1), Fixed(1)), num_requests=3), "needs arrivals"),
        (dict(arrivals=ArrivalProcess("fixed", 1.0), num_requests=3), "needs lengths"),
        (dict(trace=TRACE, arrivals=np.array([0.0, 1.0])), "arrivals must be 5"),
        (dict(trace=TRACE, qps=0.0), "qps must"),
        (dict(trace=TRACE, start_s=-1.0), "start_s must"),
        (dict(trace=TRACE, duration_s=0.0), "duration_s must"),
        (dict(trace=TRACE, max_requests=-1), "max_requests must"),
        (dict(trace=TRACE, client_id=""), "client_id must"),
        (dict(trace=TRACE, seed=-1), "seed must"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_requests(**kwargs)


def test_does_not_reject_long_requests():
    # Fitting a request to a model's context or KV cache is the simulator's job.
    reqs = build_requests(Trace([0.0], [10**6], [10**5]))
    assert reqs[0].max_total_tokens == 1_100_000


def test_merge_workloads_orders_clients_by_arrival():
    a = build_requests(TRACE, client_id="a")
    b = build_requests(TRACE, client_id="b", time_scale=0.5)
    merged = merge_workloads(a, b)
    assert len(merged) == 10
    assert times(merged) == sorted(times(merged))
    assert [r.request_id for r in merged[:2]] == ["a-0", "b-0"]  # ties keep argument order
    with pytest.raises(ValueError, match="duplicate request_id 'a-0'"):
        merge_workloads(a, a)


# --- configs ------------------------------------------------------------------------------------


def config(**kw) -> ml_collections.ConfigDict:
    base = dict(
        kind="poisson",
        qps=4.0,
        cv=None,
        num_requests=100,
        seed=0,
        trace_path=None,
        trace_format="auto",
        lengths=dict(kind="fixed", prompt_len=128, output_len=32, low=None, high=None, a=None, path=None),
        time_scale=1.0,
        start_s=0.0,
        duration_s=None,
        max_requests=None,
        client_id="default",
    )
    lengths = kw.pop("lengths", {})
    base.update(kw)
    if lengths is None:
        base["lengths"] = None
    else:
        base["lengths"].update(lengths)
    return ml_collections.ConfigDict(base)


def test_config_synthetic_kinds():
    reqs = workload_from_config(config())
    assert len(reqs) == 100 and all(r.prompt_len == 128 and r.sampling.max_new_tokens == 32 for r in reqs)
    assert reqs == workload_from_config(config())
    fixed = workload_from_config(config(kind="fixed", num_requests=3))
    assert times(fixed) == [0.0, 0.25, 0.5]
    gamma = workload_from_config(config(kind="gamma", cv=2.0, num_requests=20_000, seed=1))
    gaps = np.diff(times(gamma))
    assert 1 / gaps.mean() == pytest.approx(4.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.05)


def test_config_length_kinds():
    uni = workload_from_config(config(lengths=dict(kind="uniform", low=(10, 1), high=(20, 2))))
    assert {r.prompt_len for r in uni} == set(range(10, 21))
    assert {r.sampling.max_new_tokens for r in uni} == {1, 2}
    zipf = workload_from_config(config(lengths=dict(kind="zipf", a=1.0, low=5, high=50)))
    assert all(5 <= r.prompt_len <= 50 and 5 <= r.sampling.max_new_tokens <= 50 for r in zipf)


def test_config_accepts_plain_mappings_and_attribute_objects():
    as_dict = config().to_dict()
    assert workload_from_config(as_dict) == workload_from_config(config())

    class Attrs:
        kind = "fixed"
        qps = 1.0
        num_requests = 2
        lengths = {"kind": "fixed", "prompt_len": 3, "output_len": 4}

    assert times(workload_from_config(Attrs())) == [0.0, 1.0]


def test_config_trace_paths_resolve_against_the_environment(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "t.csv").write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,5,1\n2,6,2\n4,7,3\n")
    monkeypatch.setenv("JAXSERVE_TRACES", str(tmp_path))
    cfg = config(kind="trace", trace_path="mine/t.csv", qps=None, lengths=None, client_id="c")
    reqs = workload_from_config(cfg)
    assert times(reqs) == [0.0, 2.0, 4.0] and [r.request_id for r in reqs] == ["c-0", "c-1", "c-2"]
    assert times(workload_from_config(config(kind="trace", trace_path="mine/t.csv", qps=1.0, lengths=None))) == [0, 1, 2]
    # lengths.kind="trace" without a path keeps the trace's own lengths.
    own = workload_from_config(config(kind="trace", trace_path="mine/t.csv", qps=None, lengths=dict(kind="trace")))
    assert [r.prompt_len for r in own] == [5, 6, 7]
    other = workload_from_config(config(kind="trace", trace_path="mine/t.csv", qps=None))
    assert [r.prompt_len for r in other] == [128] * 3
    with pytest.raises(FileNotFoundError, match=r"workload.trace_path: trace file not found: .*mine/missing.csv"):
        workload_from_config(config(kind="trace", trace_path="mine/missing.csv"))
    with pytest.raises(ValueError, match="workload: no requests in the window"):
        workload_from_config(config(kind="trace", trace_path="mine/t.csv", qps=None, start_s=10.0))


@needs_traces
def test_config_replays_shared_traces():
    cfg = config(
        kind="trace",
        trace_path="azure_llm_2023/AzureLLMInferenceTrace_conv.csv",
        qps=10.0,
        lengths=None,
        max_requests=1000,
    )
    reqs = workload_from_config(cfg)
    assert len(reqs) == 1000 and 999 / reqs[-1].arrival_time == pytest.approx(10.0)
    mooncake = workload_from_config(
        config(kind="trace", trace_path="mooncake_fast25/synthetic_trace.jsonl", qps=None, lengths=None)
    )
    assert len(mooncake) == 3_993 and mooncake[0].prefix_block_hashes[:3] == (0, 1, 2)
    assert mooncake[-1].arrival_time == pytest.approx(1022.0, abs=0.05)


@needs_traces
def test_config_samples_lengths_from_a_length_file():
    path = "vidur_processed/sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
    reqs = workload_from_config(config(num_requests=500, lengths=dict(kind="trace", path=path)))
    source = read_trace(resolve_trace_path(path))
    pairs = set(zip(source.prompt_len.tolist(), source.output_len.tolist()))
    assert all((r.prompt_len, r.sampling.max_new_tokens) in pairs for r in reqs)
    assert Empirical.from_csv(resolve_trace_path(path)).prompt_lens.shape == (30_731,)
    with pytest.raises(ValueError, match="lengths only, no timestamps"):
        workload_from_config(config(kind="trace", trace_path=path, lengths=None, qps=None))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(kind="weibull"), r"workload.kind must be one of \('poisson', 'gamma', 'fixed', 'trace'\)"),
        (dict(kind=None), "workload.kind must be one of"),
        (dict(qps=None), "workload.qps is required"),
        (dict(qps=-1.0), "workload.qps must"),
        (dict(kind="gamma"), "workload.cv is required for kind='gamma'"),
        (dict(kind="gamma", cv=0.0), "workload.cv must"),
        (dict(num_requests=None), "workload.num_requests is required"),
        (dict(num_requests=1.5), "workload.num_requests must"),
        (dict(time_scale=0.0), "workload.time_scale must"),
        (dict(start_s=-2.0), "workload.start_s must"),
        (dict(duration_s=-2.0), "workload.duration_s must"),
        (dict(max_requests=-2), "workload.max_requests must"),
        (dict(seed=-1), "workload.seed must"),
        (dict(client_id=""), "workload.client_id must"),
        (dict(lengths=None), "workload.lengths is required"),
        (dict(lengths=dict(kind="lognormal")), r"workload.lengths.kind must be one of \('fixed', 'uniform'"),
        (dict(lengths=dict(prompt_len=None)), "workload.lengths.prompt_len is required"),
        (dict(lengths=dict(output_len=0)), r"workload.lengths \(output_len\): Fixed.value"),
        (dict(lengths=dict(kind="uniform", low=5)), "workload.lengths.high is required"),
        (dict(lengths=dict(kind="uniform", low=5, high=(9, 4))), r"workload.lengths \(output side\): Uniform.high"),
        (dict(lengths=dict(kind="uniform", low=(1, 2, 3), high=9)), "must be one value or a"),
        (dict(lengths=dict(kind="zipf", low=1, high=9)), "workload.lengths.a is required"),
        (dict(lengths=dict(kind="trace")), "workload.lengths.path is required"),
        (dict(kind="trace", trace_path=None), "workload.trace_path is required"),
        (dict(kind="trace", trace_path="/x.csv", trace_format="xls"), "workload.trace_path: trace file not found"),
    ],
)
def test_config_errors_name_the_key(kw, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        workload_from_config(config(**kw))


def test_config_rejects_an_unknown_trace_format(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,5,1\n")
    with pytest.raises(ValueError, match="workload.trace_format must be 'auto' or one of"):
        workload_from_config(config(kind="trace", trace_path=str(path), trace_format="xls"))
    with pytest.raises(ValueError, match="workload.time_scale or workload.qps"):
        workload_from_config(config(kind="trace", trace_path=str(path), time_scale=2.0))
