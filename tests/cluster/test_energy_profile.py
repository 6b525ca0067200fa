"""Profiles for the energy controller measured in the simulator: lower clocks draw less power and
answer later, an overloaded instance's TTFT explodes, and the controller takes the profiles as they are."""

import importlib.util
import pathlib

import pytest

from jaxserve.cluster.energy_controller import ReconfigCosts, Slo, choose
from jaxserve.cluster.energy_profile import fixed_lengths, pool_profile, profile_entry, profile_until, window_energy_j
from jaxserve.config import override
from jaxserve.sim.simulate import build_sim, run_sim

ROOT = pathlib.Path(__file__).resolve().parents[2]


def config():
    spec = importlib.util.spec_from_file_location("jaxserve_energy_profile_default", ROOT / "configs" / "default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return override(module.get_config(), {"hardware.name": "h100-sxm", "model.name": "llama-3-8b"})


def test_lower_clock_draws_less_and_answers_later_and_overload_shows_in_ttft():
    loads = (1.0, 4.0, 1000.0)  # 1000 req/s of 24 requests: one burst, far past what one GPU serves
    top = profile_entry(config(), 1, 1980, loads, num_requests=24, lengths=fixed_lengths(512, 32))
    low = profile_entry(config(), 1, 990, loads, num_requests=24, lengths=fixed_lengths(512, 32))
    assert [p.load_rps for p in top.points] == list(loads) == [p.load_rps for p in low.points]
    assert top.idle_power_w == low.idle_power_w == 70.0  # one H100
    for a, b in zip(top.points[:2], low.points[:2]):
        assert b.power_w < a.power_w and b.ttft_s > a.ttft_s and a.power_w > top.idle_power_w
    assert top.points[1].power_w > top.points[0].power_w  # more load, more power
    assert top.points[2].ttft_s > 5 * top.points[1].ttft_s  # the burst queues


def test_pool_profile_feeds_the_controller():
    profile = pool_profile(config(), tps=(1,), frequencies=(990, 1980), loads=(1.0, 2.0), num_requests=16,
                           lengths=fixed_lengths(512, 32))
    assert {(e.tp, e.frequency_mhz) for e in profile} == {(1, 990), (1, 1980)}
    d = choose(1.0, profile, Slo(ttft_s=10.0, tbt_s=1.0), epoch_s=60.0, max_gpus=2, costs=ReconfigCosts(0.0, 0.0))
    assert d.slo_met and d.config.frequency_mhz == 990  # loose SLOs: the cheaper clock
    with pytest.raises(ValueError, match="output_len must be >= 2"):
        fixed_lengths(512, 1)


def test_profile_until_stops_at_the_first_load_that_misses_the_slo():
    slo = Slo(ttft_s=0.05, tbt_s=1.0)  # an 8B model on one H100 passes it up to ~16 req/s of these
    entry = profile_until(config(), 1, 1980, slo=slo, start_rps=1.0, factor=4.0, max_points=8, duration_s=6.0,
                          min_requests=24, lengths=fixed_lengths(512, 32))
    loads = [p.load_rps for p in entry.points]
    assert loads == [4.0**k for k in range(len(loads))] and 2 <= len(loads) < 8
    *fine, last = entry.points
    assert all(p.ttft_s <= slo.ttft_s and p.tbt_s <= slo.tbt_s for p in fine)
    assert last.ttft_s > slo.ttft_s or last.tbt_s > slo.tbt_s
    # without a miss it runs max_points loads, or stops at the first at or above max_rps
    loose = dict(slo=Slo(1e6, 1e6), start_rps=1.0, factor=2.0, duration_s=2.0, min_requests=8,
                 lengths=fixed_lengths(256, 8))
    assert [p.load_rps for p in profile_until(config(), 1, 1980, max_points=3, **loose).points] == [1.0, 2.0, 4.0]
    assert [p.load_rps for p in profile_until(config(), 1, 1980, max_points=9, max_rps=3.0, **loose).points] == [1.0, 2.0, 4.0]
    with pytest.raises(ValueError, match="factor > 1"):
        profile_until(config(), 1, 1980, max_points=3, **{**loose, "factor": 1.0})


def test_profile_points_last_a_duration_so_a_long_output_pool_reaches_its_queue():
    """A count of requests arriving fast ends before the batch fills; a duration does not."""
    lengths, slo = fixed_lengths(1024, 256), Slo(1e6, 1e6)
    config70 = override(config(), {"model.name": "llama-3-70b", "hardware.tp": 4})
    short = profile_until(config70, 4, 1980, slo=slo, start_rps=8.0, factor=2.0, max_points=1, duration_s=1.0,
                          min_requests=8, lengths=lengths)
    long = profile_until(config70, 4, 1980, slo=slo, start_rps=8.0, factor=2.0, max_points=1, duration_s=60.0,
                         min_requests=8, lengths=lengths)
    assert long.points[0].ttft_s > 2 * short.points[0].ttft_s


def test_trace_lengths_profile_the_pools_mix(tmp_path):
    path = tmp_path / "pool.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens\n" + "".join(f"{p},{o}\n" for p, o in ((256, 8), (2048, 64))))
    lengths = {"workload.lengths.kind": "trace", "workload.lengths.path": str(path)}
    mixed = profile_entry(config(), 1, 1980, (2.0,), num_requests=32, lengths=lengths)
    short = profile_entry(config(), 1, 1980, (2.0,), num_requests=32, lengths=fixed_lengths(256, 8))
    assert mixed.points[0].ttft_s > short.points[0].ttft_s  # the 2048-token prompts show in the p99


def test_power_is_the_steady_state_draw_over_the_arrival_window():
    assert window_energy_j(100.0, [2.0, 5.0], 4.0, 10.0) == 120.0  # idle for 2 s on the first, none on the second
    base = override(config(), {"hardware.tp": 1, "workload.kind": "poisson", "workload.num_requests": 12,
                               "workload.duration_s": None, "workload.qps": 0.5, **fixed_lengths(512, 32)})
    res = run_sim(build_sim(base))
    busy, window = float(res.log.step_duration_s.sum()), 12 / 0.5
    (point,) = profile_entry(config(), 1, 1980, (0.5,), num_requests=12, lengths=fixed_lengths(512, 32)).points
    assert point.power_w == pytest.approx((res.metrics["energy_j"] + 70.0 * (window - busy)) / window)
    # the drain after the last arrival is not idle time diluting the draw
    assert point.power_w > res.metrics["avg_power_w"]
    # overloaded: busy longer than the window, so the draw is over the busy time, within one H100's TDP
    (burst,) = profile_entry(config(), 1, 1980, (1000.0,), num_requests=24, lengths=fixed_lengths(512, 32)).points
    assert 70.0 < burst.power_w <= 700.0
