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


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    hf_checkpoints = pytest.importorskip("hf_checkpoints")
    directory = tmp_path_factory.mktemp("tiny-llama")
    hf_checkpoints.make_checkpoint(str(directory), "llama")
    return directory


ENGINE_WORKLOAD = [
    "--config.workload.kind=poisson", "--config.workload.qps=50", "--config.workload.num_requests=10",
    "--config.workload.lengths.kind=fixed", "--config.workload.lengths.prompt_len=40",
    "--config.workload.lengths.output_len=6", "--config.scheduler.chunk_size=32", "--config.scheduler.max_num_seqs=4",
    "--config.kv.block_size=8", "--config.engine.warmup=False",
]  # fmt: skip


def test_engine_backend_writes_the_same_metrics_as_the_simulator(tiny_llama, tmp_path):
    engine_dir, sim_dir = tmp_path / "engine", tmp_path / "sim"
    proc = run_cli(
        "--config=configs/sarathi.py", "--config.backend=engine", f"--config.model.path={tiny_llama}",
        *ENGINE_WORKLOAD, tmp_path=engine_dir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((engine_dir / "metrics.json").read_text())
    assert metrics["num_requests"] == metrics["num_finished"] == 10
    # 40-token prompts in 32-token chunks: every request needs two prefill steps, so TTFT > one step.
    assert metrics["ttft_s"]["p50"] > metrics["tbt_s"]["p50"] > 0
    assert metrics["throughput_tok_s"] > 0 and metrics["num_compilations"] >= 1
    rows = (engine_dir / "requests.csv").read_text().splitlines()
    assert len(rows) == 11
    for name in ("latency_cdf.png", "latency_over_time.png", "queue_and_kv.png"):
        assert (engine_dir / name).stat().st_size > 0
    assert "(engine)" in proc.stdout

    proc = run_cli("--config=configs/sarathi.py", *ENGINE_WORKLOAD, tmp_path=sim_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sim_metrics = json.loads((sim_dir / "metrics.json").read_text())
    # Energy and cost exist only where a cost model provides them; the engine measures no power.
    modelled_only = {"energy_j", "energy_j_per_token", "cost_usd_per_mtok"}
    assert set(sim_metrics) - modelled_only <= set(metrics)
    assert set(metrics) - set(sim_metrics) == {"num_compilations"}


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--config.backend=engine"], "model.path"),  # no model
        (["--config.backend=engine", "--config.model.path=/no/such/model"], "/no/such/model"),
        (["--config.backend=engine", "--config.engine.dtype=int3"], "engine.dtype"),
    ],
)
def test_bad_engine_config_gives_one_clear_message(args, needle, tiny_llama, tmp_path):
    if "--config.model.path" not in " ".join(args) and "dtype" in needle:
        args = [*args, f"--config.model.path={tiny_llama}"]
    proc = run_cli("--config=configs/sarathi.py", *args, *ENGINE_WORKLOAD, tmp_path=tmp_path)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert needle in err and "Traceback" not in err


def test_configs_import_their_base_from_any_working_directory(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "jaxserve.experiment", f"--config={ROOT / 'configs' / 'vllm.py'}",
           "--config.workload.kind=poisson", "--config.workload.num_requests=20", "--config.workload.qps=2",
           "--config.workload.lengths.kind=fixed", f"--config.output_dir={tmp_path / 'out'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["num_finished"] == 20
