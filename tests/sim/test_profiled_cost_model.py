"""The profiled cost model: fitting, the profile file format, use in the simulator, and a real
(tiny) profile of the engine."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import pathlib

import numpy as np
import pytest

import jaxserve
from jaxserve.kv import KVConfig
from jaxserve.model.config import ModelConfig
from jaxserve.profile import Profile, grid_points, load_profile, save_profile
from jaxserve.sim import ConfigError, get_hardware, simulate
from jaxserve.sim.profiled_cost_model import FEATURES, ProfiledCostModel, fit, nnls, point_features
from jaxserve.sim.simulator import SimExecutor, run_replica
from sim_testing import assert_same_log

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Seconds per unit of FEATURES; each term is a sizable share of some default-grid point's time.
TRUE = (2e-3, 5e-6, 1e-9, 2e-8, 1e-4, 3e-4)
LLAMA_7B_SHAPE = ModelConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
    num_kv_heads=32, head_dim=128, max_position_embeddings=4096, dtype="bfloat16",
)  # fmt: skip


def synthetic_points(coefficients=TRUE, noise=0.0, seed=0, repeats=3):
    """The default grid's shapes timed by a known linear model, with multiplicative noise."""
    rng = np.random.default_rng(seed)
    points = []
    for spec in grid_points("default"):
        exact = float(point_features(spec.point([1.0])) @ np.array(coefficients))
        points.append(spec.point(exact * (1 + noise * rng.standard_normal(repeats)) if noise else [exact] * repeats))
    return points


def synthetic_profile(**kw) -> Profile:
    return Profile(
        model=json.loads(json.dumps(dataclasses.asdict(LLAMA_7B_SHAPE))), dtype="bfloat16",
        device={"backend": "gpu", "kind": "synthetic"}, block_size=16, points=tuple(synthetic_points(**kw)),
        engine={"attention": "ragged", "block_rows": 32}, model_name="llama-7b-shape", grid="default",
    )  # fmt: skip


# -- fitting ------------------------------------------------------------------------------------------


def test_fit_recovers_known_coefficients_exactly_without_noise():
    model, report = fit(synthetic_points(), holdout_fraction=0.0)
    np.testing.assert_allclose(model.coefficients, TRUE, rtol=1e-6)
    assert report.train_mape < 1e-9 and report.num_holdout == 0 and np.isnan(report.holdout_mape)


def test_fit_with_noise_recovers_coefficients_and_reports_holdout_error():
    points = synthetic_points(noise=0.01, seed=1)
    model, report = fit(points, holdout_fraction=0.2, seed=0)
    np.testing.assert_allclose(model.coefficients, TRUE, rtol=0.1)
    assert report.num_holdout == round(0.2 * len(points)) and report.num_train == len(points) - report.num_holdout
    assert 0 < report.train_mape < 0.02 and 0 < report.holdout_mape < 0.03  # medians of 3 samples at 1% noise
    assert report.holdout_max_ape >= report.holdout_mape and not report.unidentified
    assert "held-out MAPE" in report.summary()


def test_fit_keeps_coefficients_non_negative():
    # No per-prefill-row cost in truth, and noise: unconstrained least squares would go negative.
    truth = TRUE[:5] + (0.0,)
    model, _ = fit(synthetic_points(truth, noise=0.02, seed=3), holdout_fraction=0.0)
    assert min(model.coefficients) >= 0.0
    assert model.coefficients[5] < 0.1 * TRUE[5]


def test_fit_names_features_the_profile_does_not_exercise():
    decode_only = [p for p in synthetic_points() if not p.prefill_chunk_lens]
    model, report = fit(decode_only, holdout_fraction=0.0)
    assert set(report.unidentified) == {"prefill_tokens", "prefill_attention_pairs", "num_prefill_seqs"}
    assert model.coefficients[1] == model.coefficients[2] == model.coefficients[5] == 0.0


def test_nnls_matches_scipy():
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.standard_normal((30, 6)) * rng.uniform(0.1, 10, 6)
        b = rng.standard_normal(30)
        ours, ref = nnls(a, b), optimize.nnls(a, b)[0]
        assert np.linalg.norm(a @ ours - b) == pytest.approx(np.linalg.norm(a @ ref - b), rel=1e-9, abs=1e-12)
        assert (ours >= 0).all()


def test_fit_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        fit([])
    with pytest.raises(ValueError, match="holdout_fraction"):
        fit(synthetic_points(), holdout_fraction=1.0)


# -- the file format ----------------------------------------------------------------------------------


def test_profile_round_trips(tmp_path):
    profile = synthetic_profile(noise=0.01)
    path = str(tmp_path / "p.json")
    save_profile(profile, path)
    assert load_profile(path) == profile
    raw = json.loads(pathlib.Path(path).read_text())
    assert raw["format"] == 1 and set(raw["points"][0]) >= {
        "num_prefill_tokens", "prefill_context", "num_decodes", "decode_context_tokens", "num_seqs", "times_s", "median_s"}
    assert load_profile(path).model_config() == LLAMA_7B_SHAPE
    assert not list(tmp_path.glob(".profile-*"))  # the atomic write left no temporary behind


def _drop(key):
    return lambda d: d.pop(key)


def _set(path, value):
    def edit(d):
        *parents, last = path
        for p in parents:
            d = d[p]
        d[last] = value

    return edit


@pytest.mark.parametrize("edit, needle", [
    (_drop("points"), "missing key 'points'"),
    (_set(["format"], 2), "format 2 is not supported"),
    (_set(["points"], []), "points is empty"),
    (_set(["points"], {"a": 1}), "points must be a list"),
    (_set(["points", 0, "times_s"], "fast"), r"points\[0\].times_s"),
    (_set(["points", 0, "times_s"], [0.1, -1.0]), r"points\[0\].times_s\[1\]"),
    (lambda d: d["points"][1].pop("median_s"), r"points\[1\] is missing key 'median_s'"),
    (_set(["points", 0, "num_decodes"], -1), r"points\[0\].num_decodes must be an int >= 0"),
    (_set(["points", 0, "num_decodes"], 1.5), r"points\[0\].num_decodes"),
    (_set(["points", 0, "median_s"], 123.0), r"points\[0\].median_s .* not the median"),
    (_set(["points", 0, "num_prefill_tokens"], 7), r"points\[0\].num_prefill_tokens = 7 disagrees"),
    (_set(["points", 0, "prefill_context"], [0, 0]), r"points\[0\]: prefill_context has 2 entries"),
    (_set(["points", 2], None), r"points\[2\] must be an object"),
    (lambda d: d["points"].append(copy.deepcopy(d["points"][0])), "same shape as points"),
    (_drop("dtype"), "missing key 'dtype'"),
    (_set(["dtype"], "int4"), "dtype must be"),
    (_set(["block_size"], 0), "block_size must be an int >= 1"),
    (_set(["device"], "gpu"), "device must be an object"),
    (lambda d: d["model"].pop("hidden_size"), "model"),
    (_set(["model", "num_layers"], "many"), "model.*num_layers"),
    (_set(["model", "colour"], "red"), "model.*colour"),
])  # fmt: skip
def test_bad_profile_files_name_the_problem(tmp_path, edit, needle):
    raw = synthetic_profile().to_json()
    edit(raw)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=needle) as info:
        load_profile(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text, needle", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object")])
def test_unreadable_profile_files(tmp_path, text, needle):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=needle):
        load_profile(str(path))


# -- the cost model -----------------------------------------------------------------------------------


def cost_model(hardware="a100-80gb") -> ProfiledCostModel:
    return ProfiledCostModel.from_profile(synthetic_profile(), get_hardware(hardware))


def plan(computed, new, block_size=16, **ops):
    computed, new = np.asarray(computed, np.int64), np.asarray(new, np.int64)
    return jaxserve.BatchPlan(
        tuple(f"r{i}" for i in range(len(new))), computed, new, np.ones(len(new), bool),
        tuple(tuple(range(-(-int(c + n) // block_size))) for c, n in zip(computed, new)),
        np.zeros(int(new.sum()), np.int32), block_size, **ops,
    )  # fmt: skip


def test_step_is_the_fitted_expression():
    cm = cost_model()
    # 3 decodes with 100, 200, 300 tokens in KV; chunks of 64 after 128 and of 32 from the start.
    cost = cm.step(plan([100, 200, 300, 128, 0], [1, 1, 1, 64, 32]))
    pairs = 64 * (128 + 65 / 2) + 32 * (33 / 2)
    expected = float(np.dot(TRUE, [1, 96, pairs, 600, 3, 2]))
    assert cost.duration_s == pytest.approx(expected, rel=1e-9)
    assert cost.energy_j > cm.idle_power_w() * cost.duration_s  # idle plus some dynamic energy
    assert cm.step(jaxserve.BatchPlan.empty(16)).duration_s == 0.0


def test_delegated_queries_use_the_profiled_model_on_the_hardware():
    cm = cost_model()
    assert cm.model.max_position_embeddings == 4096 and cm.model.num_layers == 32
    assert cm.kv_capacity_blocks(16) == cm.roofline.kv_capacity_blocks(16) > 1000
    assert cm.cost_usd_per_hour() == get_hardware("a100-80gb").price_per_hour_usd
    assert not cost_model("cpu").models_energy and cost_model("cpu").step(plan([5], [1])).energy_j == 0.0


@pytest.mark.parametrize("hardware", ["a100-80gb", "cpu"])
def test_decode_run_is_bitwise_step(hardware):
    cm = cost_model(hardware)
    rows, ctx = 37, 5000
    durations, energies = cm.decode_run(rows, ctx, 50)
    for j in (0, 1, 17, 49):
        c = np.full(rows, (ctx + rows * j) // rows, np.int64)
        c[: (ctx + rows * j) % rows] += 1
        cost = cm.step(plan(c, np.ones(rows, np.int64)))
        assert cost.duration_s == durations[j] and cost.energy_j == energies[j]


class CountingExecutor(SimExecutor):
    runs = 0

    def decode_run(self, num_rows, context_tokens, k):
        self.runs += 1
        return super().decode_run(num_rows, context_tokens, k)


@pytest.mark.parametrize("name, opts", [("vllm", {}), ("sarathi", {"chunk_size": 256})])
def test_fast_forward_equals_step_by_step(name, opts):
    rng = np.random.default_rng(7)
    times = np.cumsum(rng.exponential(1 / 20, 40))
    requests = [
        jaxserve.Request(f"r{i}", prompt_len=int(rng.integers(1, 300)),
                         sampling=jaxserve.SamplingParams(int(rng.integers(1, 200))), arrival_time=float(t))
        for i, t in enumerate(times)
    ]  # fmt: skip
    executor = CountingExecutor(cost_model())
    logs = [
        run_replica(jaxserve.scheduler.make(name, **opts), KVConfig(300, 16), executor, requests, fast_forward=ff).freeze()
        for ff in (False, True)
    ]
    assert executor.runs > 0  # the fast path ran (only with fast_forward=True)
    assert_same_log(*logs)
    assert np.isfinite(logs[0].finish_s).all()


# -- through simulate(config) -------------------------------------------------------------------------


def default_config():
    spec = importlib.util.spec_from_file_location("jaxserve_default_config", ROOT / "configs" / "default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def profiled_config(profile_path):
    c = default_config()
    c.sim.cost_model = "profiled"
    c.sim.profile = str(profile_path)
    c.workload.kind = "poisson"
    c.workload.qps = 20.0
    c.workload.num_requests = 30
    c.workload.lengths.kind = "fixed"
    c.workload.lengths.prompt_len = 200
    c.workload.lengths.output_len = 40
    return c


def test_simulate_with_a_profiled_cost_model(tmp_path):
    path = tmp_path / "profile.json"
    save_profile(synthetic_profile(), str(path))
    results = simulate(profiled_config(path))
    m = results.metrics
    assert m["num_finished"] == 30 and m["num_rejected"] == 0
    assert m["ttft_s"]["mean"] > 0 and m["energy_j"] > 0
    assert results.kv.num_blocks == cost_model().kv_capacity_blocks(16)
    # The first step prefills the first request alone: 200 prompt tokens, from an empty cache.
    first = float(np.dot(TRUE, [1, 200, 200 * 201 / 2, 0, 0, 1]))
    assert results.log.step_duration_s[0] == pytest.approx(first, rel=1e-9)


@pytest.mark.parametrize("change, needle", [
    (lambda c, p: setattr(c.sim, "profile", None), "sim.profile"),
    (lambda c, p: setattr(c.sim, "profile", str(p) + ".missing"), "sim.profile"),
    (lambda c, p: p.write_text('{"format": 1}'), "sim.profile.*missing key"),
    (lambda c, p: setattr(c.sim, "cost_model", "magic"), "sim.cost_model"),
    (lambda c, p: setattr(c.hardware, "tp", 2), "hardware.tp"),
])  # fmt: skip
def test_bad_profiled_configs(tmp_path, change, needle):
    path = tmp_path / "profile.json"
    save_profile(synthetic_profile(), str(path))
    config = profiled_config(path)
    change(config, path)
    with pytest.raises(ConfigError, match=needle):
        simulate(config)


# -- a real (tiny) profile ----------------------------------------------------------------------------


def test_tiny_real_profile_runs_and_resumes(tmp_path):
    from hf_checkpoints import make_checkpoint

    from jaxserve.profile import main, profile_model

    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    make_checkpoint(str(model_dir), "llama")
    out = str(tmp_path / "profile.json")
    args = ["--model", str(model_dir), "--out", out, "--grid", "small", "--repeats", "2", "--warmup", "1",
            "--dtype", "float32", "--quiet"]  # fmt: skip
    assert main(args) == 0
    profile = load_profile(out)
    assert len(profile.points) == len(grid_points("small"))
    assert profile.dtype == "float32" and profile.device["backend"] == "cpu" and profile.block_size == 16
    assert all(len(p.times_s) == 2 and p.median_s > 0 for p in profile.points)
    kinds = {(bool(p.prefill_chunk_lens), bool(p.num_decodes)) for p in profile.points}
    assert kinds == {(True, False), (False, True), (True, True)}  # prefill-only, decode-only, mixed
    before = pathlib.Path(out).read_text()

    resumed = profile_model(str(model_dir), out, dtype="float32", repeats=2, warmup=1, grid="small", progress=False)
    assert (resumed.measured, resumed.already) == (0, len(profile.points))
    assert pathlib.Path(out).read_text() == before
    with pytest.raises(ValueError, match="another dtype"):
        profile_model(str(model_dir), out, dtype="bfloat16", grid="small", progress=False)
    other = tmp_path / "other"
    other.mkdir()
    make_checkpoint(str(other), "qwen2")
    with pytest.raises(ValueError, match="another model"):
        profile_model(str(other), out, dtype="float32", grid="small", progress=False)
    assert main(["--model", str(other), "--out", out, "--dtype", "float32", "--quiet"]) == 1  # one message, no traceback
    assert pathlib.Path(out).read_text() == before

    _, report = fit(profile.points)
    assert np.isfinite(report.train_mape) and np.isfinite(report.holdout_mape)
    assert len(FEATURES) == len(report.coefficients)
