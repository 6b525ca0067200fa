"""The experiment CLI end to end: outputs on success, one clear message on a bad config."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from jaxserve.config import SEE_ALL_KEYS

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


@pytest.mark.skipif(not TRACES.exists(), reason="needs ../shared/traces")
def test_loongserve_config_runs_its_node_not_a_replica(tmp_path):
    proc = run_cli("--config=configs/loongserve.py", "--config.workload.duration_s=20", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_instances"] == 8 and metrics["num_finished"] == metrics["num_requests"] > 0
    assert "loongserve" in metrics  # the scaling plan's counters: only the node writes them
    assert "loongserve (elastic SP)" in proc.stdout


SMALL = ["--config.workload.kind=poisson", "--config.workload.qps=20", "--config.workload.num_requests=20",
         "--config.workload.lengths.kind=fixed"]  # fmt: skip
TOP_LEVEL = "(top-level keys: backend, cluster, engine, hardware, kv, model, output_dir, parallel, scheduler, seed, sim, slo, workload)"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.nosuch.key=1"], f"unknown config key 'nosuch.key' {TOP_LEVEL}"),
        (["--config.foo=1"], f"unknown config key 'foo' {TOP_LEVEL}"),
        (["--config.workload.qsp=4"], "unknown config key 'workload.qsp' (did you mean 'workload.qps'?)"),
        (["--config.scheduler.chunksize=3"], "unknown config key 'scheduler.chunksize' (did you mean 'scheduler.chunk_size'?)"),
        (["--config.workload.qps=abc"], "workload.qps must be a float or None, got 'abc'"),
        (["--config.kv.block_size=abc"], "kv.block_size must be an int, got 'abc'"),
        (["--config.kv.block_size"], "--config.kv.block_size: kv.block_size is not a bool; give a value"),
        (["--config.workload.trace_path=no/such/trace.csv"], "workload.trace_path: trace file not found:"),
        (["--config.scheduler.chunk_size=0"], "scheduler.chunk_size: scheduler option chunk_size must be an int >= 1"),
        (["--config.scheduler.name=vllm", "--config.scheduler.chunk_size=64"],
         "scheduler.chunk_size=64 does not apply to scheduler 'vllm' (it is an option of sarathi;"),
        (["--config.scheduler.name=nosuch"], "scheduler.name: unknown scheduler 'nosuch'; available: orca,"),
        ([*SMALL, "--config.workload.qps=-1"], "workload.qps must be a finite number > 0, got -1.0"),
        ([*SMALL, "--config.workload.num_requests=0"], "workload.num_requests must be >= 1 for kind='poisson', got 0"),
        (["--config.model.name=gpt-9"], "model.name"),
        (["--config.hardware.name=tpu-v9"], "hardware.name"),
        (["--config.workload.kind=foo"], "workload.kind must be one of"),
        (["--config.backend=gpu"], "backend must be one of ('sim', 'engine'), got 'gpu'"),
    ],
)
def test_bad_config_gives_one_clear_line_and_exit_2(args, message, tmp_path):
    proc = run_cli("--config=configs/sarathi.py", *args, tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("config error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr
    if "unknown config key" in message:  # points to where every key is listed
        assert "configs/default.py, or --config_help" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_every_option_of_the_chosen_scheduler_is_settable(tmp_path):
    for config, option in (("vllm", "--config.scheduler.enable_prefix_caching=True"),
                           ("sarathi", "--config.scheduler.chunk_size=64"),
                           ("vtc", "--config.scheduler.base=sarathi")):
        proc = run_cli(f"--config=configs/{config}.py", *SMALL, option, "--config.scheduler.watermark=0.05",
                       tmp_path=tmp_path / config)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads((tmp_path / config / "metrics.json").read_text())["num_finished"] == 20
    # Bool keys also take the bare form, and `none` unsets an optional key.
    proc = run_cli("--config=configs/vllm.py", *SMALL, "--config.scheduler.enable_prefix_caching",
                   "--config.workload.duration_s=none", tmp_path=tmp_path / "bare")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_config_help_lists_every_key_with_its_default(tmp_path):
    sys.path.insert(0, str(ROOT))
    try:
        from configs import default
        from jaxserve.config import leaf_keys
    finally:
        sys.path.remove(str(ROOT))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "jaxserve.experiment", "--config_help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()[2:] if line.strip()}
    assert set(lines) == set(leaf_keys(default.get_config()))
    assert lines["scheduler.chunk_size"].split()[1] == "512" and "[sarathi, vtc via base]" in lines["scheduler.chunk_size"]
    assert "unset (float)" in lines["workload.qps"] and "arrival rate" in lines["workload.qps"]
    assert all(len(line.split()) >= 3 for line in lines.values()), "every key has a meaning"
    proc = run_cli("--config=configs/sarathi.py", "--config.scheduler.chunk_size=256", "--config_help",
                   tmp_path=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "configs/sarathi.py" in proc.stdout.splitlines()[0]
    shown = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines()[2:] if line.strip()}
    assert shown["scheduler.name"] == "'sarathi'" and shown["scheduler.chunk_size"] == "256"
    help_text = subprocess.run([sys.executable, "-m", "jaxserve.experiment", "--help"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=300).stdout  # fmt: skip
    assert "--config_help" in help_text


def test_a_config_file_with_a_misspelt_key_is_refused(tmp_path):
    (tmp_path / "typo.py").write_text(
        "from configs import default\n\ndef get_config():\n    c = default.get_config()\n    c.workload.qsp = 4.0\n    return c\n"
    )
    proc = run_cli(f"--config={tmp_path / 'typo.py'}", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "config error: unknown config key 'workload.qsp' (did you mean 'workload.qps'?). " + SEE_ALL_KEYS + "\n"


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
    assert set(metrics) - set(sim_metrics) == {"num_compilations", "num_compiled_shapes", "compile_s", "num_compile_evictions"}


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
    assert proc.returncode == 2
    assert proc.stderr.startswith("config error: ") and needle in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_configs_import_their_base_from_any_working_directory(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "jaxserve.experiment", f"--config={ROOT / 'configs' / 'vllm.py'}",
           "--config.workload.kind=poisson", "--config.workload.num_requests=20", "--config.workload.qps=2",
           "--config.workload.lengths.kind=fixed", f"--config.output_dir={tmp_path / 'out'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["num_finished"] == 20


def run_experiment(name: str, out, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(ROOT / "experiments" / f"{name}.py"), "--quick", "--jobs", "2", "--out", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_vtc_fairness_quick_run_writes_its_outputs(tmp_path):
    proc = run_experiment("vtc_fairness", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("service.csv", "clients.csv", "service.png", "difference.png", "summary.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "final service ratio A/B" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not TRACES.exists(), reason="needs ../shared/traces")
@pytest.mark.parametrize("name, outputs", [
    ("sarathi_capacity", ("capacity.csv", "evaluations.csv", "stall.csv", "capacity.png", "stall.png", "summary.md")),
    ("vllm_normalized_latency", ("sweep.csv", "search.csv", "normalized_latency.png", "summary.md")),
])  # fmt: skip
def test_paper_experiment_quick_runs_write_their_outputs(name, outputs, tmp_path):
    proc = run_experiment(name, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for output in outputs:
        assert (tmp_path / output).stat().st_size > 0, output


def test_vtc_config_shows_equal_service_where_vllm_follows_the_rates(tmp_path):
    shares = {}
    for name in ("vtc", "vllm"):
        proc = run_cli("--config=configs/vtc.py", f"--config.scheduler.name={name}", tmp_path=tmp_path / name)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "per client" in proc.stdout
        clients = json.loads((tmp_path / name / "metrics.json").read_text())["clients"]
        shares[name] = clients["B"]["service"] / clients["A"]["service"]
    assert shares["vtc"] < 1.15 and shares["vllm"] > 1.7, shares  # B sends twice A's rate


def test_the_summary_names_rejection_reasons_and_warns(tmp_path):
    proc = run_cli("--config=configs/sarathi.py", *SMALL, "--config.kv.num_blocks=8",
                   "--config.workload.lengths.prompt_len=512", tmp_path=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = " ".join(proc.stdout.split())
    assert "rejected 20 of 20 (100.0%):" in out
    assert "warning: no request finished" in out
    rows = (tmp_path / "requests.csv").read_text().splitlines()
    assert all(",rejected: " in row for row in rows[1:])
