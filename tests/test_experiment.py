"""The experiment CLI end to end: outputs on success, one clear message on a bad config."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "traces"


def run_cli(*args, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "jaxserve.experiment", *args, f"--config.output_dir={tmp_path}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not TRACES.exists(), reason="needs ../shared/traces")
def test_sarathi_config_runs_and_writes_outputs(tmp_path):
    proc = run_cli("--config=configs/sarathi.py", "--config.workload.duration_s=30", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("num_requests", "num_finished", "ttft_s", "tbt_s", "tpot_s", "e2e_s", "normalized_latency_s",
                "throughput_req_s", "throughput_tok_s", "slo_attainment", "num_rejected", "energy_j_per_token"):
        assert key in metrics, key
    assert metrics["num_finished"] > 0 and metrics["ttft_s"]["p50"] > 0
    for name in ("requests.csv", "latency_cdf.png", "latency_over_time.png", "queue_and_kv.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "ttft_s" in proc.stdout  # the summary table


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--config.scheduler.chunksize=3"], "chunksize"),  # unknown key
        (["--config.kv.block_size=abc"], "block_size"),  # ill-typed
        (["--config.workload.trace_path=no/such/trace.csv"], "no/such/trace.csv"),  # missing file
        (["--config.scheduler.chunk_size=0"], "chunk_size"),  # bad value
        (["--config.model.name=gpt-9"], "model.name"),
        (["--config.hardware.name=tpu-v9"], "hardware.name"),
        (["--config.workload.kind=foo"], "workload.kind"),
        (["--config.backend=gpu"], "backend"),
    ],
)
def test_bad_config_gives_one_clear_message(args, needle, tmp_path):
    proc = run_cli("--config=configs/sarathi.py", *args, tmp_path=tmp_path)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert needle in err
    assert "Traceback" not in err
