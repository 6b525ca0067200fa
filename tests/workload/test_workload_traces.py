"""Trace readers: the real shared traces, exact timestamps, format detection, malformed input."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jaxserve.workload.traces import (
    FORMATS,
    Trace,
    TraceFormatError,
    detect_format,
    project_root,
    read_trace,
    resolve_trace_path,
    sample_traces,
    traces_dir,
)

AZURE = "azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
SPLITWISE = "vidur_processed/splitwise_conv.csv"
MOONCAKE = "mooncake_fast25/synthetic_trace.jsonl"
SHAREGPT = "vidur_processed/sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
ARXIV = "vidur_processed/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"
BWB = "vidur_processed/bwb_stats_llama2_tokenizer_filtered_v2.csv"

needs_traces = pytest.mark.skipif(not traces_dir().is_dir(), reason="shared traces folder not present")


def shared(rel: str) -> Trace:
    return read_trace(resolve_trace_path(rel))


def write(tmp_path, text: str, name: str = "trace.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- the real traces (statistics from shared/traces/README.md) ----------------------------------


@needs_traces
def test_azure_conv():
    start = time.perf_counter()
    trace = shared(AZURE)
    assert time.perf_counter() - start < 1.0  # ~50 ms here; a pure-Python datetime loop is ~10x
    assert trace.format == "azure" and len(trace) == 19_366
    assert trace.arrival_s.dtype == np.float64 and trace.prompt_len.dtype == np.int64
    assert trace.arrival_s[0] == 0.0
    assert trace.arrival_s[1] == 4.314579  # 18:15:50.9951690 - 18:15:46.6805900, to the 100 ns tick
    assert trace.arrival_s[-1] == pytest.approx(3501.7, abs=0.05)
    assert (len(trace) - 1) / trace.arrival_s[-1] == pytest.approx(5.53, abs=0.005)
    assert trace.prompt_len.mean() == pytest.approx(1154.7, abs=0.05)
    assert trace.output_len.mean() == pytest.approx(211.1, abs=0.05)
    assert np.percentile(trace.prompt_len, 90) == pytest.approx(2734.5)
    assert trace.prompt_len.min() == 2 and trace.output_len.min() == 7
    assert trace.prompt_len.max() == 14_050 and trace.output_len.max() == 1000
    assert trace.hash_ids is None


@needs_traces
def test_splitwise_equals_azure_up_to_rebasing():
    azure, splitwise = shared(AZURE), shared(SPLITWISE)
    assert splitwise.format == "vidur"
    np.testing.assert_array_equal(azure.prompt_len, splitwise.prompt_len)
    np.testing.assert_array_equal(azure.output_len, splitwise.output_len)
    # Splitwise keeps microseconds, Azure 100 ns ticks.
    np.testing.assert_allclose(azure.arrival_s, splitwise.arrival_s, rtol=0, atol=1e-6)


@needs_traces
def test_mooncake_synthetic():
    trace = shared(MOONCAKE)
    assert trace.format == "mooncake" and len(trace) == 3_993
    assert trace.arrival_s[-1] == pytest.approx(1022.0, abs=0.05)
    assert len(np.unique(trace.arrival_s)) == 3_982
    assert trace.prompt_len.mean() == pytest.approx(15_325.5, abs=0.05)
    assert trace.output_len.mean() == pytest.approx(149.1, abs=0.05)
    assert trace.hash_block_size == 512
    assert trace.hash_ids[0][:3] == (0, 1, 2)
    blocks = np.array([len(h) for h in trace.hash_ids])
    assert blocks.mean() == pytest.approx(30.5, abs=0.05)
    assert (blocks * 512 >= trace.prompt_len).all()
    refs = [h for ids in trace.hash_ids for h in ids]
    assert len(refs) == 121_877 and len(set(refs)) == 43_924


@needs_traces
@pytest.mark.parametrize(
    "rel, rows, input_mean, output_mean",
    [(SHAREGPT, 30_731, 2340.0, 438.7), (ARXIV, 28_257, 2588.1, 291.4), (BWB, 33_768, 1067.2, 1612.8)],
)
def test_length_only_files(rel, rows, input_mean, output_mean):
    trace = shared(rel)
    assert trace.format == "lengths" and len(trace) == rows
    assert trace.arrival_s is None and trace.hash_ids is None
    assert trace.prompt_len.mean() == pytest.approx(input_mean, abs=0.05)
    assert trace.output_len.mean() == pytest.approx(output_mean, abs=0.05)


@needs_traces
def test_a_vidur_file_can_be_read_for_its_lengths_only():
    trace = read_trace(resolve_trace_path(SPLITWISE), format="lengths")
    assert trace.arrival_s is None and len(trace) == 19_366


def test_traces_are_immutable_values():
    trace = Trace([0.0, 1.0], [3, 4], [5, 6])
    with pytest.raises(ValueError):
        trace.prompt_len[0] = 9
    sub = trace.take([1])
    assert sub.prompt_len.tolist() == [4] and sub.arrival_s.tolist() == [1.0]
    with pytest.raises(ValueError, match="non-decreasing"):
        Trace([1.0, 0.0], [3, 4], [5, 6])
    with pytest.raises(ValueError, match="prompt_len"):
        Trace(None, [0], [1])


# --- paths --------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSERVE_TRACES", str(tmp_path))
    assert resolve_trace_path("a/b.csv") == tmp_path / "a" / "b.csv"
    assert resolve_trace_path(tmp_path / "x.csv") == tmp_path / "x.csv"


def test_relative_paths_default_to_shared_traces_beside_the_project(monkeypatch):
    monkeypatch.delenv("JAXSERVE_TRACES", raising=False)
    root = project_root()
    assert (root / "pyproject.toml").is_file() and (root / "jaxserve").is_dir()
    assert traces_dir() == root.parent / "shared" / "traces"
    assert resolve_trace_path(AZURE) == traces_dir() / AZURE


@needs_traces
def test_the_shipped_sample_is_the_first_ten_minutes_of_the_shared_azure_trace():
    sample, full = shared("sample:azure_conv_2023_first_10min.csv"), shared(AZURE)
    assert sample.format == "azure" and len(sample) == 2867 == int(np.sum(full.arrival_s < 600.0))
    for column in ("arrival_s", "prompt_len", "output_len"):
        np.testing.assert_array_equal(getattr(sample, column), getattr(full, column)[: len(sample)])


def test_sample_paths_resolve_into_the_package_whatever_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSERVE_TRACES", str(tmp_path))  # no traces here: samples do not need them
    assert "azure_conv_2023_first_10min.csv" in sample_traces()
    path = resolve_trace_path("sample:azure_conv_2023_first_10min.csv")
    assert path.is_file() and path.parent.name == "samples" and len(read_trace(path)) == 2867
    with pytest.raises(FileNotFoundError, match=r"no sample trace 'nope.csv'; the samples are \['azure_conv"):
        resolve_trace_path("sample:nope.csv")


# --- parsing details ----------------------------------------------------------------------------


def test_azure_timestamps_are_exact_and_rebased(tmp_path):
    path = write(
        tmp_path,
        "TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
        "2023-11-16 23:59:59.9999999,10,1\r\n"
        "2023-11-17 00:00:00.0000000,20,2\r\n"
        "2023-11-17 00:00:00.0000001,30,3\r\n"
        "2023-11-17 00:00:02,40,4",  # no fraction, no final newline
    )
    trace = read_trace(path)
    assert trace.format == "azure"
    assert trace.arrival_s.tolist() == [0.0, 1e-7, 2e-7, 2.0000001]
    assert trace.prompt_len.tolist() == [10, 20, 30, 40]


def test_tolerates_bom_blank_lines_extra_and_reordered_columns(tmp_path):
    path = write(tmp_path, "\ufeffnum_decode_tokens,extra,arrived_at,num_prefill_tokens\n\n5,x,1.5,7\n6,y,2.5,8.0\n\n")
    trace = read_trace(path)
    assert trace.format == "vidur"
    assert trace.arrival_s.tolist() == [0.0, 1.0]
    assert trace.prompt_len.tolist() == [7, 8] and trace.output_len.tolist() == [5, 6]


def test_mooncake_without_hash_ids_and_equal_timestamps(tmp_path):
    path = write(
        tmp_path,
        '{"timestamp": 100, "input_length": 5, "output_length": 1}\n'
        '{"timestamp": 100, "input_length": 6, "output_length": 2}\n'
        '{"timestamp": 1600.5, "input_length": 7, "output_length": 3}\n',
        "t.jsonl",
    )
    trace = read_trace(path)
    assert trace.hash_ids is None and trace.arrival_s.tolist() == [0.0, 0.0, 1.5005]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.tuples(st.floats(0, 1e4, allow_nan=False), st.integers(1, 10**6), st.integers(1, 10**5)),
        min_size=1,
        max_size=40,
    )
)
def test_vidur_csv_round_trip(tmp_path, rows):
    rows = sorted(rows)
    lines = ["arrived_at,num_prefill_tokens,num_decode_tokens"] + [f"{t!r},{p},{o}" for t, p, o in rows]
    trace = read_trace(write(tmp_path, "\n".join(lines) + "\n"))
    times = np.array([r[0] for r in rows])
    np.testing.assert_array_equal(trace.arrival_s, times - times[0])
    assert trace.prompt_len.tolist() == [r[1] for r in rows]
    assert trace.output_len.tolist() == [r[2] for r in rows]


# --- errors -------------------------------------------------------------------------------------

AZ = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"
VI = "arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,374,44\n"
LE = "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n374,44,418,8.5\n"
MC = '{"timestamp": 0, "input_length": 40, "output_length": 6, "hash_ids": [0]}\n'


@pytest.mark.parametrize(
    "name, text, line, match",
    [
        ("a.csv", AZ + "2023-11-16 18:15:47.0,abc,5\n", 3, "bad number 'abc' in column 'ContextTokens'"),
        ("a.csv", AZ + "2023-11-16 18:15:47.0,12.5,5\n", 3, "not an integer"),
        ("a.csv", (AZ + "2023-11-16 18:15:47.0,7,x\n").replace("\n", "\r\n"), 3, "bad number 'x'"),
        ("a.csv", AZ + "2023-11-16 18:15:47.0,12\n", 3, "missing column 'GeneratedTokens'"),
        ("a.csv", AZ + "2023-11-16 18:15:47.0,0,5\n", 3, "zero length"),
        ("a.csv", AZ + "2023-11-16 18:15:47.0,5,-3\n", 3, "negative length -3 in column 'GeneratedTokens'"),
        ("a.csv", AZ + "2023-11-16 18:15:47.0,5,3\n2023-11-16 18:15:46.0,5,3\n", 4, "timestamps go backwards"),
        ("a.csv", AZ + "now,5,3\n", 3, "bad timestamp 'now'"),
        ("a.csv", AZ + "2023-11-16 18:15:47.1234567890,5,3\n", 3, "bad timestamp"),
        ("a.csv", AZ + "2023-02-30 18:15:47.0,5,3\n", 3, "no such time"),
        ("v.csv", VI + "1.0,5,3\n\n0.5,5,3\n", 5, "timestamps go backwards in column 'arrived_at'"),
        ("v.csv", VI + "nan,5,3\n", 3, "bad number 'nan'"),
        ("v.csv", VI + "x1,5,3\n", 3, "bad number 'x1' in column 'arrived_at'"),
        ("v.csv", "arrived_at,num_prefill_tokens\n0.0,5\n", 1, "missing column 'num_decode_tokens'"),
        ("l.csv", LE + "\n\n12,0,12,inf\n", 5, "zero length 0 in column 'num_decode_tokens'"),
        ("l.csv", "num_prefill_tokens,num_decode_tokens\n", 1, "no data rows"),
        ("m.jsonl", MC + '{"timestamp": 1, "input_length": 4\n', 2, "bad JSON"),
        ("m.jsonl", MC + '{"timestamp": 1, "output_length": 4, "hash_ids": []}\n', 2, "missing key 'input_length'"),
        ("m.jsonl", MC + '{"timestamp": 1, "input_length": 4, "output_length": 1}\n', 2, "missing key 'hash_ids'"),
        ("m.jsonl", MC + '{"timestamp": 1, "input_length": 0, "output_length": 1, "hash_ids": []}\n', 2, "zero length"),
        ("m.jsonl", MC + '{"timestamp": 1, "input_length": 3, "output_length": -2, "hash_ids": []}\n', 2, "negative"),
        ("m.jsonl", MC + '{"timestamp": 1, "input_length": 4.5, "output_length": 1, "hash_ids": []}\n', 2, "bad number"),
        ("m.jsonl", MC + '{"timestamp": "1", "input_length": 4, "output_length": 1, "hash_ids": []}\n', 2, "bad number"),
        ("m.jsonl", MC + '{"timestamp": 1, "input_length": 4, "output_length": 1, "hash_ids": ["a"]}\n', 2, "hash_ids"),
        ("m.jsonl", MC + "\n" + '{"timestamp": -5, "input_length": 4, "output_length": 1, "hash_ids": []}\n', 3, "backwards"),
        ("m.jsonl", MC + "[1, 2]\n", 2, "expected a JSON object"),
    ],
)
def test_malformed_input_names_file_line_and_problem(tmp_path, name, text, line, match):
    path = write(tmp_path, text, name)
    with pytest.raises(TraceFormatError, match=match) as info:
        read_trace(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.line == line and str(err).startswith(f"{path}, line {line}: ")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err)


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(VI.encode() + b"0.5,5,\xff\n")
    with pytest.raises(TraceFormatError, match="not UTF-8") as info:
        read_trace(path)
    assert info.value.line == 3


def test_undetectable_format_lists_the_known_formats(tmp_path):
    path = write(tmp_path, "\n\ntime,prompt,output\n1,2,3\n")
    with pytest.raises(TraceFormatError, match="cannot detect the trace format") as info:
        detect_format(path)
    assert info.value.line == 3
    for name in FORMATS:
        assert name in str(info.value)
    assert "TIMESTAMP,ContextTokens,GeneratedTokens" in str(info.value)
    with pytest.raises(TraceFormatError, match="empty file"):
        read_trace(write(tmp_path, "\n  \n", "empty.csv"))


def test_an_explicit_format_that_does_not_fit_names_the_missing_column(tmp_path):
    with pytest.raises(TraceFormatError, match="missing column 'arrived_at'") as info:
        read_trace(write(tmp_path, LE), format="vidur")
    assert info.value.line == 1
    with pytest.raises(TraceFormatError, match="bad JSON"):
        read_trace(write(tmp_path, VI), format="mooncake")
    with pytest.raises(ValueError, match="format must be 'auto' or one of"):
        read_trace(write(tmp_path, VI), format="parquet")


def test_missing_file_and_directory_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "trace.csv"
    with pytest.raises(FileNotFoundError, match="trace file not found: .*nope/trace.csv"):
        read_trace(missing)
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        read_trace(tmp_path)


def test_csv_syntax_errors_name_the_line(tmp_path):
    with pytest.raises(TraceFormatError, match="bad CSV") as info:
        read_trace(write(tmp_path, VI + '0.5,5,3\n1.0,"' + "9" * 200_000 + '",3\n'))  # over csv's field limit
    assert info.value.line == 4


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 30),
    data=st.data(),
    blank=st.booleans(),
    bad=st.sampled_from(["x", "0", "-1", "1.5", ""]),
)
def test_the_reported_line_is_the_bad_row(tmp_path, n, data, blank, bad):
    rows = [f"{i},{i + 1},{i + 2}" for i in range(n)]
    k = data.draw(st.integers(0, n - 1))
    rows[k] = f"{k},{bad},3"
    lines = ["arrived_at,num_prefill_tokens,num_decode_tokens"] + (["", "  "] if blank else []) + rows
    with pytest.raises(TraceFormatError) as info:
        read_trace(write(tmp_path, "\n".join(lines)))
    assert info.value.line == 2 + (2 if blank else 0) + k
