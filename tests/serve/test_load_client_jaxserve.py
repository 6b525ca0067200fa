"""bench_serving against jaxserve's own server (the tiny checkpoint of conftest.py, over real HTTP on
127.0.0.1): every request gets exactly the trace's lengths (the server's token counters agree with
what the client sent, so token-id prompts and ``ignore_eos`` went through), the stream's tokens are
all counted, and --compare-sim produces its table from a profile."""

from __future__ import annotations

import csv
import json

from conftest import LLM_OPTIONS, VOCAB
from test_load_client import write_profile
from test_server import metric_values

from jaxserve import bench_serving
from jaxserve.serve.testing import running_server


def test_replay_against_the_jaxserve_server(llm, tmp_path):
    trace = tmp_path / "trace.csv"
    lengths = [(5, 6), (12, 3), (3, 9), (8, 4), (20, 7), (2, 5)]  # (prompt, output)
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n" + "".join(
        f"{0.01 * i},{p},{o}\n" for i, (p, o) in enumerate(lengths)))  # fmt: skip
    out = tmp_path / "out"
    kv = LLM_OPTIONS["num_blocks"], LLM_OPTIONS["block_size"]
    with running_server(llm, model_name="tiny") as url:
        before = metric_values(url)
        code = bench_serving.main([
            "--base-url", url, "--trace", str(trace), "--vocab-size", str(VOCAB), "--out", str(out), "--quiet",
            "--compare-sim", "--profile", str(write_profile(tmp_path / "p.json")), "--sim-set", "scheduler.name=sarathi",
            "--sim-set", "scheduler.chunk_size=16", "--sim-set", f"kv.num_blocks={kv[0]}", "--sim-set", f"kv.block_size={kv[1]}",
        ])  # fmt: skip
        after = metric_values(url)
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["num_requests"], m["num_finished"], m["num_failed"], m["num_rejected"]) == (6, 6, 0, 0)
    assert m["load_client"]["prompt_mode"] == "ids" and m["load_client"]["num_short"] == 0
    assert m["load_client"]["num_usage_mismatch"] == 0 and m["load_client"]["max_model_len"] == llm.max_model_len
    # every request got exactly the trace's output length, and the client counted every token
    rows = {r["request_id"]: r for r in csv.DictReader(open(out / "requests.csv"))}
    assert [int(rows[f"default-{i}"]["num_output"]) for i in range(len(lengths))] == [o for _, o in lengths]
    assert [int(rows[f"default-{i}"]["prompt_len"]) for i in range(len(lengths))] == [p for p, _ in lengths]
    # the server counted the trace's prompt and output tokens, plus the client's 4-token, 1-token probe
    grew = {k: after[k] - before.get(k, 0.0) for k in ("jaxserve:prompt_tokens_total", "jaxserve:generation_tokens_total")}
    assert grew["jaxserve:prompt_tokens_total"] == sum(p for p, _ in lengths) + 4
    assert grew["jaxserve:generation_tokens_total"] == sum(o for _, o in lengths) + 1
    assert m["ttft_s"]["p50"] > 0 and m["tbt_s"]["p50"] is not None
    compared = {r["metric"]: r for r in m["compare_sim"]["rows"]}
    assert compared["e2e_s.p50"]["sim"] > 0 and m["compare_sim"]["num_kv_blocks"] == kv[0]
