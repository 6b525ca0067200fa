"""The profiled cost model: fitting, the profile file format, use in the simulator, and a real
(tiny) profile of the engine."""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib

import numpy as np
import pytest

from config_defaults import default_config
import jaxserve
from jaxserve.runtime.step_geometry import StepGeometry
from jaxserve.kv import KVConfig
from jaxserve.model.config import ModelConfig
from jaxserve.calibration.fit import FEATURES, ROW_SEGMENTS, fit, nnls, point_features, work_features
from jaxserve.calibration.grid import grid_points
from jaxserve.calibration.jitter import StepJitter
from jaxserve.calibration.profile_format import Profile, load_profile, save_profile
from jaxserve.sim import ConfigError, get_hardware, simulate
from jaxserve.sim.hardware import hardware_for_device
from jaxserve.sim.profiled_cost_model import ProfiledCostModel
from jaxserve.runtime import run_replica
from jaxserve.sim.executor import SimExecutor
from log_testing import assert_same_log

# Seconds per unit of FEATURES; each term is a sizable share of some default-grid point's time.
# Per-row slopes fall then rise with the step's rows; the default grid's largest step has 2048 rows,
# so the last three segments are extrapolated from the one below them (equal slopes here).
ROW_SLOPES = (2e-4, 1e-4, 5e-5, 2e-5, 1e-5, 5e-6, 5e-6, 5e-6, 6e-6, 8e-6, 1e-5, 1e-5, 1e-5)
TRUE = (2e-3,) + ROW_SLOPES + (2e-5, 2e-8, 1e-8, 1e-9, 2e-9, 3e-5)
assert len(TRUE) == len(FEATURES)
RAGGED = StepGeometry(attention="ragged", page_size=16)
GROUPED = StepGeometry(attention="grouped", page_size=16)
LLAMA_7B_SHAPE = ModelConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
    num_kv_heads=32, head_dim=128, max_position_embeddings=4096, dtype="bfloat16",
)  # fmt: skip


def synthetic_points(coefficients=TRUE, noise=0.0, seed=0, repeats=3, geometry=RAGGED):
    """The default grid's shapes timed by a known linear model, with multiplicative noise."""
    rng = np.random.default_rng(seed)
    points = []
    for spec in grid_points("default"):
        exact = float(point_features(spec.point([1.0]), geometry) @ np.array(coefficients))
        points.append(spec.point(exact * (1 + noise * rng.standard_normal(repeats)) if noise else [exact] * repeats))
    return points


A100 = {"backend": "gpu", "kind": "NVIDIA A100-SXM4-80GB"}


def synthetic_profile(geometry=RAGGED, device=A100, **kw) -> Profile:
    return Profile(
        model=json.loads(json.dumps(dataclasses.asdict(LLAMA_7B_SHAPE))), dtype="bfloat16",
        device=dict(device), block_size=16,
        points=tuple(synthetic_points(geometry=geometry, **kw)), engine=geometry, model_name="llama-7b-shape",
        grid="default",
    )  # fmt: skip


# -- fitting ------------------------------------------------------------------------------------------


def test_fit_recovers_known_coefficients_exactly_without_noise():
    model, report = fit(synthetic_points(geometry=GROUPED), GROUPED, holdout_fraction=0.0)
    np.testing.assert_allclose(model.coefficients, TRUE, rtol=1e-6)
    assert report.train_mape < 1e-9 and report.num_holdout == 0 and np.isnan(report.holdout_mape)
    assert report.extrapolated == ROW_SEGMENTS[-2:]
    # Ragged attention computes what it reads (two equal columns): the split is not unique, the fit is.
    _, report = fit(synthetic_points(geometry=RAGGED), RAGGED, holdout_fraction=0.0)
    assert report.train_mape < 1e-9


def test_fit_with_noise_recovers_coefficients_and_reports_holdout_error():
    points = synthetic_points(noise=0.01, seed=1, geometry=GROUPED)
    model, report = fit(points, GROUPED, holdout_fraction=0.2, seed=0)
    # The big terms come back; a slope over a few rows of small steps is swamped by 1% noise.
    for name in ("const", "sample_slots", "decode_attention_keys", "decode_kv_read", "prefill_attention_keys"):
        assert model.as_dict()[name] == pytest.approx(TRUE[FEATURES.index(name)], rel=0.1), name
    assert report.num_holdout == round(0.2 * len(points)) and report.num_train == len(points) - report.num_holdout
    assert 0 < report.train_mape < 0.02 and 0 < report.holdout_mape < 0.03  # medians of 3 samples at 1% noise
    assert report.holdout_max_ape >= report.holdout_mape and not report.unidentified
    assert "held-out MAPE" in report.summary()


def test_fit_keeps_coefficients_non_negative():
    # No per-prefill-row cost in truth, and noise: unconstrained least squares would go negative.
    truth = TRUE[:-1] + (0.0,)
    model, _ = fit(synthetic_points(truth, noise=0.02, seed=3), GROUPED, holdout_fraction=0.0)
    assert min(model.coefficients) >= 0.0
    assert model.coefficients[-1] < 0.1 * TRUE[-1]


def test_fit_names_features_the_profile_does_not_exercise():
    decode_only = [p for p in synthetic_points() if not p.prefill_chunk_lens]
    model, report = fit(decode_only, RAGGED, holdout_fraction=0.0)
    assert report.unidentified == ("prefill_attention_keys", "prefill_kv_read")
    assert model.as_dict()["prefill_attention_keys"] == model.as_dict()["prefill_kv_read"] == 0.0
    assert report.extrapolated == ROW_SEGMENTS[8:]  # no decode-only step has more than 256 rows
    assert report.train_mape < 1e-9  # the decode terms still explain decode steps exactly


def test_nnls_is_exact_on_badly_scaled_columns():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.uniform(0, 1, (40, 8)) * np.logspace(0, 9, 8)  # features span 1 to 1e9, as step features do
        truth = rng.uniform(0, 1, 8) / np.logspace(0, 9, 8)
        truth[rng.integers(0, 8)] = 0.0
        np.testing.assert_allclose(nnls(a, a @ truth), truth, rtol=1e-6, atol=1e-15)
        b = rng.standard_normal(40)
        assert (nnls(a, b) >= 0).all()


def test_fit_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        fit([], RAGGED)
    with pytest.raises(ValueError, match="holdout_fraction"):
        fit(synthetic_points(), RAGGED, holdout_fraction=1.0)


# -- the file format ----------------------------------------------------------------------------------


def test_profile_round_trips(tmp_path):
    profile = synthetic_profile(noise=0.01)
    path = str(tmp_path / "p.json")
    save_profile(profile, path)
    assert load_profile(path) == profile
    raw = json.loads(pathlib.Path(path).read_text())
    assert raw["format"] == 2 and set(raw["points"][0]) >= {
        "num_prefill_tokens", "prefill_context", "decode_context", "num_decodes", "decode_context_tokens", "num_seqs",
        "times_s", "median_s"}
    assert raw["engine"] == dataclasses.asdict(RAGGED)
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
    (_set(["format"], 1), "format 1 is not supported.*re-run"),
    (_drop("engine"), "missing key 'engine'"),
    (_drop("temperature"), "missing key 'temperature'"),
    (_set(["temperature"], -0.5), "temperature must be a finite number >= 0"),
    (lambda d: d["engine"].pop("chunk_pages"), "engine is missing 'chunk_pages'"),
    (_set(["engine", "attention"], "flash"), "engine.attention must be one of"),
    (_set(["engine", "block_rows"], 0), "engine.block_rows must be an int >= 1"),
    (_set(["engine", "page_size"], 32), "engine.page_size = 32 disagrees with block_size = 16"),
    (_set(["engine", "warp"], 9), "engine has unknown key 'warp'"),
    (_set(["points", 0, "decode_context"], 5), r"points\[0\].decode_context must be a list"),
    (_set(["points", 40, "num_decodes"], 7), r"points\[40\].num_decodes = 7 disagrees"),
    (_set(["points", 40, "decode_context_tokens"], 7), r"points\[40\].decode_context_tokens = 7 disagrees"),
    (_set(["points"], []), "points is empty"),
    (_set(["points"], {"a": 1}), "points must be a list"),
    (_set(["points", 0, "times_s"], "fast"), r"points\[0\].times_s"),
    (_set(["points", 0, "times_s"], [0.1, -1.0]), r"points\[0\].times_s\[1\]"),
    (lambda d: d["points"][1].pop("median_s"), r"points\[1\] is missing key 'median_s'"),
    (_set(["points", 0, "decode_context"], [-1]), r"points\[0\].decode_context\[0\] must be an int >= 0"),
    (_set(["points", 0, "decode_context"], [1.5]), r"points\[0\].decode_context\[0\]"),
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


def cost_model(hardware="a100-80gb", geometry=RAGGED, jitter=False) -> ProfiledCostModel:
    profile = synthetic_profile(geometry, noise=0.1 if jitter else 0.0, repeats=5)
    return ProfiledCostModel.from_profile(profile, get_hardware(hardware), jitter=jitter)


def plan(computed, new, block_size=16, **ops):
    computed, new = np.asarray(computed, np.int64), np.asarray(new, np.int64)
    return jaxserve.BatchPlan(
        tuple(f"r{i}" for i in range(len(new))), computed, new, np.ones(len(new), bool),
        tuple(tuple(range(-(-int(c + n) // block_size))) for c, n in zip(computed, new)),
        np.zeros(int(new.sum()), np.int32), block_size, **ops,
    )  # fmt: skip


def expected(*work) -> float:
    return float(np.dot(TRUE, work_features(work)))


def test_step_is_the_fitted_expression():
    # 3 decodes with 100, 200, 300 tokens in KV; chunks of 64 after 128 and of 32 from the start:
    # 3 decode rows and 2 + 1 prefill blocks of 32 rows, all on bucket sizes.
    step = plan([100, 200, 300, 128, 0], [1, 1, 1, 64, 32])
    pairs = 64 * (128 + 65 / 2) + 32 * (33 / 2)
    read = 2 * 192 + 1 * 32  # each block reads its sequence's KV
    cm = cost_model()
    cost = cm.step(step)
    assert cost.duration_s == pytest.approx(expected(99, 6, 603, 603, pairs, read, 5), rel=1e-9)
    assert cost.energy_j > cm.idle_power_w() * cost.duration_s  # idle plus some dynamic energy
    assert cm.step(jaxserve.BatchPlan.empty(16)).duration_s == 0.0
    # Grouped attention computes each group's longest KV in chunks of 8 pages x 16 tokens: the
    # decodes' longest (301) takes 3 chunks, the blocks' (192) 2, for every row.
    grouped = cost_model(geometry=GROUPED).step(step).duration_s
    assert grouped == pytest.approx(expected(99, 6, 3 * 384, 603, 96 * 256, read, 5), rel=1e-9)


def test_step_pays_for_bucket_padding():
    cm = cost_model()
    # 5 decode rows run as a bucket of 6; 33 prefill tokens as 2 blocks of 32 rows.
    five = cm.step(plan([10] * 5, [1] * 5)).duration_s
    assert five == pytest.approx(expected(6, 6, 55, 55, 0, 0, 5), rel=1e-9)
    chunk = cm.step(plan([0], [33])).duration_s
    assert chunk == pytest.approx(expected(64, 2, 0, 0, 33 * 17, 2 * 33, 1), rel=1e-9)


def test_token_rows_are_piecewise_linear():
    model, _ = fit(synthetic_points(geometry=GROUPED), GROUPED, holdout_fraction=0.0)
    rows = lambda t: model.duration(t, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # noqa: E731
    assert rows(1) == pytest.approx(TRUE[0])
    assert rows(3) - rows(2) == pytest.approx(ROW_SLOPES[1]) and rows(2) - rows(1) == pytest.approx(ROW_SLOPES[0])
    assert rows(700) - rows(600) == pytest.approx(100 * ROW_SLOPES[9])
    assert rows(9000) - rows(8000) == pytest.approx(1000 * ROW_SLOPES[-1])  # open-ended last segment


def test_delegated_queries_use_the_profiled_model_on_the_hardware():
    cm = cost_model()
    assert cm.model.max_position_embeddings == 4096 and cm.model.num_layers == 32
    assert cm.kv_capacity_blocks(16) == cm.roofline.kv_capacity_blocks(16) > 1000
    assert cm.cost_usd_per_hour() == get_hardware("a100-80gb").price_per_hour_usd
    assert not cost_model("cpu").models_energy and cost_model("cpu").step(plan([5], [1])).energy_j == 0.0


@pytest.mark.parametrize("jitter", [False, True], ids=["median", "jitter"])
@pytest.mark.parametrize("hardware", ["a100-80gb", "cpu"])
@pytest.mark.parametrize("geometry", [RAGGED, GROUPED], ids=["ragged", "grouped"])
def test_decode_run_is_bitwise_step(hardware, geometry, jitter):
    cm = cost_model(hardware, geometry, jitter)
    rows = 37
    context = np.linspace(3, 400, rows).astype(np.int64)  # spread: the longest is not the mean
    durations, energies = cm.decode_run(rows, int(context.sum()), int(context.max()), 300)
    for j in (0, 1, 17, 128, 299):
        cost = cm.step(plan(context + j, np.ones(rows, np.int64)))
        assert cost.duration_s == durations[j] and cost.energy_j == energies[j]
    assert durations[299] > durations[0]


class CountingExecutor(SimExecutor):
    runs = 0

    def decode_run(self, num_rows, context_tokens, max_context, k):
        self.runs += 1
        return super().decode_run(num_rows, context_tokens, max_context, k)


@pytest.mark.parametrize("jitter", [False, True], ids=["median", "jitter"])
@pytest.mark.parametrize("name, opts", [("vllm", {}), ("sarathi", {"chunk_size": 256})])
def test_fast_forward_equals_step_by_step(name, opts, jitter):
    rng = np.random.default_rng(7)
    times = np.cumsum(rng.exponential(1 / 20, 40))
    requests = [
        jaxserve.Request(f"r{i}", prompt_len=int(rng.integers(1, 300)),
                         sampling=jaxserve.SamplingParams(int(rng.integers(1, 200))), arrival_time=float(t))
        for i, t in enumerate(times)
    ]  # fmt: skip
    executor = CountingExecutor(cost_model(geometry=GROUPED, jitter=jitter))
    logs = [
        run_replica(jaxserve.scheduler.make(name, **opts), KVConfig(300, 16), executor, requests, fast_forward=ff).freeze()
        for ff in (False, True)
    ]
    assert executor.runs > 0  # the fast path ran (only with fast_forward=True)
    assert_same_log(*logs)
    assert np.isfinite(logs[0].finish_s).all()


def test_jitter_scatters_steps_as_the_profile_repeats_did():
    profile = synthetic_profile(GROUPED, noise=0.1, repeats=5)
    jitter = StepJitter.from_points(profile.points)
    assert len(jitter.factors) == 5 * len(profile.points) and np.median(jitter.factors) == 1.0
    # Over many step shapes the drawn factors have the profile's distribution; a shape's factor is fixed.
    rows = np.arange(1, 4001)
    drawn = jitter.factor(rows % 64 + 1, rows % 64 + 1, 17 * rows, 3 * rows)
    for q in (10, 50, 90):
        assert np.percentile(drawn, q) == pytest.approx(np.percentile(jitter.factors, q), abs=0.01)
    assert drawn[123] == jitter.factor(124 % 64 + 1, 124 % 64 + 1, 17 * 124, 3 * 124)
    assert (StepJitter(jitter.factors, seed=1).factor(rows, rows, rows, rows) != jitter.factor(rows, rows, rows, rows)).mean() > 0.9
    # The jittered model is the median model times the factor.
    median, jittered = (ProfiledCostModel.from_profile(profile, get_hardware("cpu"), jitter=j) for j in (False, True))
    step = plan([100, 200, 300, 128], [1, 1, 1, 64])
    factor = jitter.factor(4, 67, 728, 300)[()]
    assert jittered.step(step).duration_s == median.step(step).duration_s * factor and factor != 1.0


def test_jitter_needs_repeated_samples():
    with pytest.raises(ValueError, match="at least 2 samples"):
        StepJitter.from_points(synthetic_points(repeats=1))
    with pytest.raises(ValueError, match="finite factors > 0"):
        StepJitter(np.array([1.0, np.nan]))


# -- through simulate(config) -------------------------------------------------------------------------


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
    # The first step prefills the first request alone: 200 prompt tokens (7 blocks of 32 rows).
    first = expected(224, 7, 0, 0, 200 * 201 / 2, 7 * 200, 1)
    assert results.log.step_duration_s[0] == pytest.approx(first, rel=1e-9)


def test_simulate_with_profile_jitter(tmp_path):
    path = tmp_path / "profile.json"
    save_profile(synthetic_profile(noise=0.1, repeats=5), str(path))
    config = profiled_config(path)
    steady = simulate(config).log.step_duration_s
    config.sim.profile_jitter = True
    jittered = simulate(config).log.step_duration_s
    assert not np.array_equal(steady[: len(jittered)], jittered[: len(steady)])
    np.testing.assert_array_equal(simulate(config).log.step_duration_s, jittered)  # deterministic
    loose = config.to_dict()  # a plain dict config is not type-checked by ml_collections
    loose["sim"]["profile_jitter"] = "yes"
    with pytest.raises(ConfigError, match="sim.profile_jitter"):
        simulate(loose)


@pytest.mark.parametrize("backend, kind, name", [
    ("gpu", "NVIDIA H200", "h200"), ("gpu", "NVIDIA H100 80GB HBM3", "h100-sxm"),
    ("gpu", "NVIDIA A100-SXM4-40GB", "a100-40gb"), ("gpu", "NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("gpu", "NVIDIA L4", "l4"), ("tpu", "TPU v5 lite", "tpu-v5e"), ("tpu", "TPU v5p", "tpu-v5p"),
    ("cpu", "cpu", "cpu"), ("gpu", "NVIDIA GeForce RTX 4090", None), ("tpu", "TPU v4", None),
])  # fmt: skip
def test_hardware_for_device(backend, kind, name):
    spec = hardware_for_device(backend, kind)
    assert (spec and spec.name) == name


def test_a_profiled_run_models_the_profiled_machine_not_hardware_name(tmp_path):
    from jaxserve.experiment import _title
    from jaxserve.sim.simulate import build_sim

    path = tmp_path / "profile.json"
    save_profile(synthetic_profile(device={"backend": "gpu", "kind": "NVIDIA H200"}), str(path))
    config = profiled_config(path)
    config.hardware.name = "l4"  # read by roofline runs only
    run = build_sim(config)
    assert run.cost_model.hardware.name == "h200"
    assert _title(config, run) == "vllm | llama-7b-shape on h200 (profiled) | poisson"
    assert run.kv.num_blocks == run.cost_model.roofline.kv_capacity_blocks(16)
    assert run.kv.num_blocks > cost_model("a100-80gb").kv_capacity_blocks(16)  # 141 GB, not 80 or 24
    m = simulate(config).metrics
    assert m["energy_j"] > 0 and "energy_j" not in m["unavailable"]
    h200_hour = get_hardware("h200").price_per_hour_usd
    out_tokens = 30 * 40
    assert m["cost_usd_per_mtok"] == pytest.approx(h200_hour * m["makespan_s"] / 3600 / out_tokens * 1e6)


def test_a_profiled_cpu_run_says_energy_is_not_modelled(tmp_path):
    path = tmp_path / "profile.json"
    save_profile(synthetic_profile(device={"backend": "cpu", "kind": "cpu"}), str(path))
    config = profiled_config(path)
    config.kv.num_blocks = 400  # a 7B-shaped bf16 model does not fit the nominal 24 GiB CPU
    m = simulate(config).metrics
    assert m["energy_j"] is None and m["energy_j_per_token"] is None
    assert "'cpu' has no published power figures" in m["unavailable"]["energy_j"]
    assert m["cost_usd_per_mtok"] > 0


def test_an_unknown_profiled_machine_has_unknown_memory_energy_and_price(tmp_path):
    from jaxserve.experiment import _title
    from jaxserve.sim.simulate import build_sim

    path = tmp_path / "profile.json"
    save_profile(synthetic_profile(device={"backend": "gpu", "kind": "NVIDIA GeForce RTX 4090"}), str(path))
    config = profiled_config(path)
    with pytest.raises(ConfigError, match=r"kv: the profiled machine 'NVIDIA GeForce RTX 4090' .*set kv.num_blocks"):
        simulate(config)
    config.kv.num_blocks = 400
    assert _title(config, build_sim(config)) == "vllm | llama-7b-shape on NVIDIA GeForce RTX 4090 (profiled) | poisson"
    m = simulate(config).metrics
    assert m["num_finished"] == 30
    for key in ("energy_j", "energy_j_per_token", "cost_usd_per_mtok"):
        assert m[key] is None and "NVIDIA GeForce RTX 4090" in m["unavailable"][key]
    unknown = ProfiledCostModel.from_profile(load_profile(str(path)))
    swap = plan([40], [1], swap_in_blocks=((0, 1),))
    with pytest.raises(ValueError, match="host link"):
        unknown.step(swap)


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

    from jaxserve.calibration.cli import main
    from jaxserve.calibration.profiler import profile_model

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
    # More repeats top every point up, keeping the samples already taken.
    more = profile_model(str(model_dir), out, dtype="float32", repeats=3, warmup=1, grid="small", progress=False)
    assert (more.measured, more.already) == (len(profile.points), 0)
    for old, new in zip(profile.points, load_profile(out).points):
        assert new.key == old.key and new.times_s[:2] == old.times_s and len(new.times_s) == 3
    before = pathlib.Path(out).read_text()
    with pytest.raises(ValueError, match="another temperature"):
        profile_model(str(model_dir), out, dtype="float32", grid="small", temperature=0.0, progress=False)
    with pytest.raises(ValueError, match="another dtype"):
        profile_model(str(model_dir), out, dtype="bfloat16", grid="small", progress=False)
    other = tmp_path / "other"
    other.mkdir()
    make_checkpoint(str(other), "qwen2")
    with pytest.raises(ValueError, match="another model"):
        profile_model(str(other), out, dtype="float32", grid="small", progress=False)
    assert main(["--model", str(other), "--out", out, "--dtype", "float32", "--quiet"]) == 1  # one message, no traceback
    assert pathlib.Path(out).read_text() == before

    assert profile.engine == StepGeometry(attention="grouped", page_size=16)
    _, report = fit(profile.points, profile.engine)
    assert np.isfinite(report.train_mape) and np.isfinite(report.holdout_mape)
    assert len(FEATURES) == len(report.coefficients)
