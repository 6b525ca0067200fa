"""scheduler_overhead's JSON line holds what it documents (every benchmark's smoke run: tests/test_quick_modes.py)."""

import json
import pathlib
import subprocess
import sys

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
