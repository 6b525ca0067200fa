"""The benchmarks run end to end and print the JSON they document (smoke runs; the engine one is slow)."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_scheduler_overhead_prints_its_json_line():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scheduler_overhead.py"), "--steps", "60", "--schedulers", "vllm,sarathi", "--block", "25"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps"] == 60 and result["block"] == 25
    for name in ("vllm", "sarathi"):
        r = result["schedulers"][name]
        assert 0 < r["median_us"] <= r["p99_us"]
        assert r["running"] > 200 and r["waiting"] >= 10_000 - 256  # the batch stays full, the queue long
        kinds = r["by_step_kind"]
        assert set(kinds) <= {"decode", "decode+finish", "prefill", "prefill+finish"}
        assert abs(sum(k["share"] for k in kinds.values()) - 1) < 0.01


@pytest.mark.slow
def test_engine_cpu_quick_run_prints_its_json_line():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "engine_cpu.py"), "--quick"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["workload"]["output_tokens"] > 0 and result["jaxserve_compile"]["during_run"] == 0
    assert result["jaxserve_tok_s"] > 0 and result["transformers_tok_s"] > 0
    d = result["decode_batch1"]
    assert d["roofline_step_ms"] > 0 and d["jaxserve_step_ms"] > 0 and d["copy_bandwidth_gb_s"] > 0
    assert d["jaxserve_fraction_of_roofline"] == pytest.approx(d["roofline_step_ms"] / d["jaxserve_step_ms"], abs=2e-3)
