"""Every experiment's and benchmark's quick mode runs end to end on a fresh install (issue 15): a
smoke run each, as a subprocess from the project root, checked for the outputs it documents.

Marked ``quick_mode`` (left out of the default run, which stays fast); ``.ci/run`` runs them after
the suite: ``python -m pytest -m quick_mode tests/test_quick_modes.py``. A new script in
``experiments/`` or ``benchmarks/`` must get an entry in ``QUICK_RUNS`` (a test checks).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "traces"

def engine_cpu(result):
    assert result["workload"]["output_tokens"] > 0 and result["jaxserve_compile"]["during_run"] == 0
    assert result["jaxserve_tok_s"] > 0 and result["transformers_tok_s"] > 0
    d = result["decode_batch1"]
    assert d["roofline_step_ms"] > 0 and d["jaxserve_step_ms"] > 0 and d["copy_bandwidth_gb_s"] > 0
    assert d["jaxserve_fraction_of_roofline"] == pytest.approx(d["roofline_step_ms"] / d["jaxserve_step_ms"], abs=2e-3)
    b = result["decode_batched"]
    assert b["rows"] == 8 and b["roofline_step_ms"] > 0 and b["compute_floor_step_ms"] > 0
    assert b["step_cpu_ms"]["current"] > 0 and b["step_cpu_ms"]["single_chunk"] > 0
    assert b["fraction_of_roofline"] == pytest.approx(b["roofline_step_ms"] / b["step_wall_ms"]["current"], rel=0.05)
    assert b["compute_bound"] == (b["compute_floor_step_ms"] > b["roofline_step_ms"])
    assert b["fraction_of_compute_floor_cpu"] == pytest.approx(b["compute_floor_step_ms"] / b["step_cpu_ms"]["current"], rel=0.05, abs=0.002)


def engine_overlap(result):
    modes, ratio = result["modes"], result["ratio_to_sync"]
    assert set(modes) == set(ratio) == set(result["paired_ratio_to_sync"]) == {"sync", "async", "async_host_patch",
                                                                                "async_nano2"}
    assert result["tokens_identical"] is True and result["compilations_when_timed"] == 0
    for name, m in modes.items():
        assert m["tokens"] == result["workload"]["output_tokens"] > 0 and m["steps"] > 0
        assert m["tok_s"] == pytest.approx(m["tokens"] / m["wall_s"], rel=1e-2)
        assert ratio[name] == pytest.approx(m["tok_s"] / modes["sync"]["tok_s"], rel=1e-3)
    assert modes["sync"]["host_ms_per_step_outside_executor"] >= 0
    assert result["paired_ratio_to_sync"]["sync"] == 1.0
    for name in ("async", "async_host_patch", "async_nano2"):
        m = modes[name]
        assert 0 < m["overlapped_steps"] < m["steps"] and 0 <= m["hidden_steps"] <= m["overlapped_steps"]
        assert 0 <= m["hidden_host_ms_per_step"] <= m["schedule_pack_ms_per_step"] + m["dispatch_ms_per_step"] + 2e-3
        assert m["wait_ms_per_step"] >= 0 and m["gap_ms_per_step"] >= 0 and m["dispatch_ms_per_step"] >= 0
    assert modes["async_host_patch"]["dispatch_ms_per_step"] == 0 and modes["async"]["gap_ms_per_step"] == 0


def engine_startup(result):
    for run in ("cold", "rerun"):
        r = result["runs"][run]
        assert r["num_finished"] == r["num_requests"] == 8 and r["wall_s"] > 0 and r["num_compilations"] > 0
    assert result["rerun_speedup"] > 0


def serving_overhead(result):
    w = result["workload"]
    assert set(result["cases"]) == set(result["ratios"]) == {"tiny"}
    for name, case in result["cases"].items():
        gen, http = case["generate"], case["http"]
        assert http["num_finished"] == w["num_requests"] == 8 and http["num_failed"] == 0
        assert gen["output_tokens"] == w["num_requests"] * w["output_len"]
        assert gen["tok_s"] > 0 and http["tok_s"] > 0 and gen["compilations_when_timed"] == 0
        assert case["ratio"] == result["ratios"][name] == pytest.approx(http["tok_s"] / gen["tok_s"], rel=1e-2)
        assert {"engine_loop", "event_loop"} <= set(http["threads_cpu_s"]) and http["client_cpu_s"] > 0
        assert http["cpu_s"] == pytest.approx(sum(http["threads_cpu_s"].values()), abs=0.01)
        assert set(http["cpu_us_per_token"]) == set(http["threads_cpu_s"]) | {"client_replay"}
        assert 0 < http["client_replay_cpu_s"] <= http["client_cpu_s"] and http["timed_run_attempts"] == 1


def simulator_speed(result):
    for name, r in result["schedulers"].items():  # the fast loop ran, and wrote the general loop's log
        assert r["loop"] == "fast" and r["same_log"] is True, (name, r["loop"])
        assert r["num_requests"] == r["num_finished"] > 0


def cluster_speed(result):
    one, many = result["one_replica"], result["16_replicas"]
    assert one["num_requests"] == many["num_requests"] == one["num_finished"] == many["num_finished"] > 0
    assert one["loop"] == many["loop"] == "fast"
    assert result["ratio"] == pytest.approx(many["requests_per_wall_s"] / one["requests_per_wall_s"], rel=1e-2)


def scheduler_overhead(result):
    assert result["steps"] == 60 and result["block"] == 25
    for name in ("vllm", "sarathi"):
        r = result["schedulers"][name]
        assert 0 < r["median_us"] <= r["p99_us"]
        assert r["running"] > 200 and r["waiting"] >= 10_000 - 256  # the batch stays full, the queue long
        kinds = r["by_step_kind"]
        assert set(kinds) <= {"decode", "decode+finish", "prefill", "prefill+finish"}
        assert abs(sum(k["share"] for k in kinds.values()) - 1) < 0.01


def sim_vs_engine(out):
    text = (out / "summary.md").read_text()
    assert "poisson/sarathi" in text and "azure/vllm" in text and "MAPE raw" in text and "speed min / median" in text


def cluster_routers(out):
    import csv

    from jaxserve.workload import resolve_trace_path

    rows = list(csv.DictReader(open(out / "results.csv")))
    routers = {"round_robin", "shortest_queue", "prefix_affinity", "freeness", "least_kv", "fair"}
    mooncake = resolve_trace_path("mooncake_fast25/synthetic_trace.jsonl").exists()
    panels = {"azure", "mooncake"} if mooncake else {"azure"}
    assert {(r["panel"], r["router"]) for r in rows} == {(p, r) for p in panels for r in routers}
    assert all(int(r["num_finished"]) + int(r["num_rejected"]) == int(r["num_requests"]) > 0 for r in rows)
    # the Azure trace has lengths only: prefix affinity cannot match, so it is the shortest queue
    azure = {r["router"]: r for r in rows if r["panel"] == "azure"}
    assert float(azure["prefix_affinity"]["prefix_hit_rate"]) == 0.0
    assert azure["prefix_affinity"]["ttft_s_p99"] == azure["shortest_queue"]["ttft_s_p99"]
    assert "exactly the same run" in (out / "summary.md").read_text()


def llumnix_migration(out):
    import csv

    tail = list(csv.DictReader(open(out / "tail.csv")))
    assert {r["mode"] for r in tail} == {"off", "live", "recompute"}
    assert all(int(r["num_finished"]) + int(r["num_rejected"]) == int(r["num_requests"]) > 0 for r in tail)
    assert all(int(r["num_migrations"]) == 0 for r in tail if r["mode"] == "off")
    down = {(r["hardware"], r["mode"], int(r["length"])): r for r in csv.DictReader(open(out / "downtime.csv"))}
    assert all(r["outcome"] == "done" for r in down.values())
    # live: flat in the length; recompute: grows with it and costs more than live at 4096 tokens
    live = [float(down[("l4", "live", n)]["downtime_s"]) for n in (256, 4096)]
    rec = [float(down[("l4", "recompute", n)]["downtime_s"]) for n in (256, 4096)]
    assert live[1] < 1.5 * live[0] and rec[1] > 4 * rec[0] and rec[1] > 4 * live[1]
    prio = list(csv.DictReader(open(out / "priority.csv")))
    assert [int(r["headroom_blocks"]) for r in prio] == [0, 300] and all(int(r["high_count"]) > 0 for r in prio)
    assert "| paper | ours |" in (out / "summary.md").read_text()


def distserve_goodput(out):
    import csv

    confirmed = list(csv.DictReader(open(out / "confirmed.csv")))
    screened = list(csv.DictReader(open(out / "screen.csv")))
    assert confirmed and len(screened) >= len(confirmed) and all(int(r["simulations"]) > 0 for r in confirmed)
    rates = list(csv.DictReader(open(out / "rate.csv")))
    assert len({r["deployment"] for r in rates}) == 2
    for label in {r["deployment"] for r in rates}:  # attainment falls as the rate grows
        mine = sorted((r for r in rates if r["deployment"] == label), key=lambda r: float(r["rate"]))
        assert float(mine[0]["attainment"]) >= float(mine[-1]["attainment"])
    assert any(float(r["kv_transfer_p50_s"]) > 0 for r in rates if r["kv_transfer_p50_s"])
    text = (out / "summary.md").read_text()
    assert "| paper (DistServe" in text and "placements screened" in text


def splitwise_designs(out):
    import csv

    designs = list(csv.DictReader(open(out / "designs.csv")))
    assert {r["budget"] for r in designs} == {"iso-cost", "iso-power"}
    for budget, measure in (("iso-cost", "usd_per_hour"), ("iso-power", "kw")):
        mine = {r["design"]: r for r in designs if r["budget"] == budget}
        base = mine["Baseline-A100"]  # the budget is its cost / power: no design exceeds it
        assert float(base["throughput_req_s"]) > 0 and float(base["throughput_vs_A100"]) == 1.0
        assert all(float(r[measure]) <= float(base[measure]) * (1 + 1e-6) for r in mine.values())
        assert {"Splitwise-AA", "Splitwise-HA"} <= set(mine)
    runs = list(csv.DictReader(open(out / "runs.csv")))
    passed = [r for r in runs if r["passed"] == "True"]
    assert passed and len(passed) < len(runs)  # the searches found both sides of every throughput
    factors = {"ttft": (2, 3, 6), "tbt": (1.25, 1.5, 5), "e2e": (1.25, 1.5, 5)}  # Splitwise's SLOs
    for r in passed:
        assert r["num_finished"] == r["num_requests"]
        assert all(float(r[f"{m}_{p}_slowdown"]) <= f for m, fs in factors.items() for p, f in zip(("p50", "p90", "p99"), fs))
    assert any(float(r["kv_transfer_p50_s"]) > 0 for r in runs if r["design"].startswith("Splitwise") and r["kv_transfer_p50_s"])
    text = (out / "summary.md").read_text()
    assert "| paper (Splitwise abstract)" in text and "## Iso-power" in text


def dynamollm_energy(out):
    import csv

    rows = list(csv.DictReader(open(out / "epochs.csv")))
    systems = ("baseline", "dynamollm", "oracle")
    assert {r["system"] for r in rows} == set(systems)
    keys = {s: {(r["epoch"], r["pool"]) for r in rows if r["system"] == s} for s in systems}
    assert keys["baseline"] == keys["dynamollm"] == keys["oracle"] and len(keys["baseline"]) == 6 * 4
    served = {s: sum(int(r["num_requests"]) for r in rows if r["system"] == s) for s in systems}
    assert served["baseline"] == served["dynamollm"] == served["oracle"] > 0  # every system serves the same day
    assert all(int(r["num_rejected"] or 0) == 0 for r in rows)
    base = {(r["epoch"], r["pool"]): r for r in rows if r["system"] == "baseline"}
    for pool in {p for _, p in base}:  # static: one config all day, at the top clock, no reconfiguration
        configs = {(r["instances"], r["tp"], r["frequency_mhz"]) for (_, p), r in base.items() if p == pool}
        assert len(configs) == 1 and next(iter(configs))[2] == "1980"
    for r in rows:
        if r["system"] != "baseline":  # within the GPUs the baseline gives the pool
            assert int(r["gpus"]) <= int(base[(r["epoch"], r["pool"])]["gpus"])
        else:
            assert float(r["transition_kwh"]) == 0.0
        assert float(r["energy_kwh"]) > 0 and float(r["cost_usd"]) > 0
    text = (out / "summary.md").read_text()
    assert "| paper (DynamoLLM, HPCA'25) |" in text and "forecast = true load" in text


def loongserve_long_context(out):
    import csv

    runs = list(csv.DictReader(open(out / "runs.csv")))
    assert {r["workload"] for r in runs} == {"mooncake", "mixed", "sharegpt"}
    assert {r["kind"] for r in runs} == {"loongserve", "chunked prefill", "disaggregation"}
    assert all(int(r["num_finished"]) + int(r["num_rejected"]) == int(r["num_requests"]) > 0 for r in runs)
    assert all(int(r["num_rejected"]) == 0 for r in runs if r["kind"] == "loongserve")  # the node holds every prompt
    heads = list(csv.DictReader(open(out / "headline.csv")))
    assert len(heads) == 6 and all(float(h["gain"]) > 0 for h in heads)
    assert "3.85x" in (out / "summary.md").read_text()


def nanoflow_throughput(out):
    import csv

    rows = list(csv.DictReader(open(out / "throughput.csv")))
    systems = ("vLLM", "Sarathi-Serve", "NanoFlow batch", "NanoFlow", "NanoFlow + async")
    assert {r["system"] for r in rows} == set(systems) and len(rows) == 5 * len({r["workload"] for r in rows})
    assert all(int(r["num_finished"]) == int(r["num_requests"]) > 0 for r in rows)
    assert all(0 < float(r["of_optimal"]) < 0.6 for r in rows)  # the GEMMs' mfu caps every system
    for w in {r["workload"] for r in rows}:  # the same batches: overlap and async only ever shorten a step
        tok = {r["system"]: float(r["tok_s_gpu"]) for r in rows if r["workload"] == w}
        assert tok["NanoFlow + async"] >= tok["NanoFlow"] >= tok["NanoFlow batch"]
    assert all(int(r["candidates"]) > 100 for r in csv.DictReader(open(out / "schedules.csv")))
    assert "| paper (NanoFlow, arXiv:2408.12757) | ours |" in (out / "summary.md").read_text()


# script -> (arguments, "json": checks of the JSON line it prints last | files it writes under --out
# and checks of that folder)
QUICK_RUNS = {
    "experiments/vllm_normalized_latency.py": (["--quick"], ("summary.md",), None),
    "experiments/sarathi_capacity.py": (["--quick"], ("summary.md",), None),
    "experiments/vtc_fairness.py": (["--quick"], ("summary.md",), None),
    "experiments/sim_vs_engine.py": (["--quick"], ("steps.csv", "probes.csv", "requests.csv", "latency.csv",
                                                   "step_times.png", "latency_cdfs.png", "machine_speed.png",
                                                   "summary.md", "profile.json"), sim_vs_engine),
    "experiments/custom_scheduler.py": ([], (), None),
    "experiments/cluster_routers.py": (["--quick"], ("results.csv", "replicas.csv", "routers.png", "summary.md"),
                                       cluster_routers),
    "experiments/llumnix_migration.py": (["--quick"], ("tail.csv", "downtime.csv", "priority.csv", "headline.csv",
                                                        "tail_latency.png", "ttft_cdf.png", "downtime.png",
                                                        "priority.png", "summary.md"), llumnix_migration),
    "experiments/distserve_goodput.py": (["--quick"], ("screen.csv", "confirmed.csv", "rate.csv", "slo_scale.csv",
                                                        "goodput.png", "summary.md"), distserve_goodput),
    "experiments/splitwise_designs.py": (["--quick"], ("designs.csv", "runs.csv", "designs.png", "summary.md"),
                                         splitwise_designs),
    "experiments/dynamollm_energy.py": (["--quick"], ("pools.csv", "profiles.csv", "epochs.csv", "day.csv", "totals.csv",
                                                      "headline.csv", "dynamollm_day.png", "summary.md"), dynamollm_energy),
    "experiments/loongserve_long_context.py": (["--quick"], ("runs.csv", "headline.csv", "loongserve.png", "summary.md"),
                                               loongserve_long_context),
    "experiments/nanoflow_throughput.py": (["--quick"], ("throughput.csv", "schedules.csv", "throughput.png", "summary.md"),
                                           nanoflow_throughput),
    "experiments/scheduler_demo.py": (["--num_requests", "60"], (), None),
    "benchmarks/simulator_speed.py": (["--duration_s", "60", "--reference"], "json", simulator_speed),
    "benchmarks/cluster_speed.py": (["--duration_s", "60"], "json", cluster_speed),
    "benchmarks/scheduler_overhead.py": (["--steps", "60", "--schedulers", "vllm,sarathi", "--block", "25"], "json", scheduler_overhead),
    "benchmarks/attention_kernels.py": (["--batch", "2", "--context", "256", "--iters", "2"], "json", None),
    "benchmarks/engine_cpu.py": (["--quick"], "json", engine_cpu),
    "benchmarks/engine_overlap.py": (["--quick"], "json", engine_overlap),
    "benchmarks/engine_startup.py": (["--quick"], "json", engine_startup),
    "benchmarks/serving_overhead.py": (["--quick"], "json", serving_overhead),
}
NEEDS_TRACES = {"experiments/vllm_normalized_latency.py", "experiments/sarathi_capacity.py", "experiments/nanoflow_throughput.py",
                "experiments/loongserve_long_context.py",
                "experiments/sim_vs_engine.py", "benchmarks/simulator_speed.py", "benchmarks/cluster_speed.py"}  # fmt: skip


def scripts() -> set[str]:
    return {f"{d}/{p.name}" for d in ("experiments", "benchmarks") for p in (ROOT / d).glob("*.py")
            if not p.name.startswith("_")}  # fmt: skip


def test_every_script_has_a_quick_run():
    assert scripts() == set(QUICK_RUNS)


def run_script(script: str, args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    cmd = [sys.executable, str(ROOT / script), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.quick_mode
@pytest.mark.parametrize("script", sorted(QUICK_RUNS))
def test_quick_mode(script, tmp_path):
    if script in NEEDS_TRACES and not TRACES.exists():
        pytest.skip("needs ../shared/traces")
    args, expect, check = QUICK_RUNS[script]
    out = tmp_path / "out"
    if isinstance(expect, tuple) and expect:
        args = [*args, "--out", str(out)]
    proc = run_script(script, args, tmp_path)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    if expect == "json":
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result, script
        if check:
            check(result)
    else:
        for name in expect:
            assert (out / name).stat().st_size > 0, f"{script} did not write {name}"
        assert proc.stdout.strip(), f"{script} printed nothing"
        if check:
            check(out)
