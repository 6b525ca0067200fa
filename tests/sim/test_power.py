"""GPU clocks and power (jaxserve.sim.power) in the roofline cost model: compute scales with the SM
clock and memory does not, dynamic power falls as V²f, phases draw different power, a power cap
lowers the clock of the steps that exceed it, and bad clocks or caps are one clear error."""

import numpy as np
import pytest

import jaxserve
from config_defaults import default_config as defaults
from jaxserve.config import ConfigError, override
from jaxserve.sim.cost_model import RooflineCostModel
from jaxserve.sim.hardware import HARDWARE, get_hardware
from jaxserve.sim.models import get_model
from jaxserve.sim.power import CORE_SHARE, KNEE_FRACTION, STALL_ACTIVITY, ClockError, Dvfs, StepPower
from jaxserve.sim.simulate import build_cost_model

MODEL = get_model("llama-3-8b")


def plan(computed, new):
    computed, new = np.asarray(computed, np.int64), np.asarray(new, np.int64)
    return jaxserve.BatchPlan(
        tuple(f"r{i}" for i in range(len(new))), computed, new, np.ones(len(new), bool),
        tuple(() for _ in new), np.zeros(int(new.sum()), np.int32), 16,
    )


PREFILL = plan([0], [2048])
DECODE = plan([1024] * 64, [1] * 64)


def model(hardware="h100-sxm", **kw):
    return RooflineCostModel(MODEL, get_hardware(hardware), **kw)


# -- the clock table ---------------------------------------------------------------------------------


def test_every_gpu_with_power_has_clocks_and_nothing_else_does():
    for hw in HARDWARE.values():
        assert (hw.dvfs is not None) == hw.has_power_model, hw.name
    a100 = get_hardware("a100-80gb").dvfs
    assert a100.clocks()[0] == 210 and a100.clocks()[-1] == 1410 and len(a100.clocks()) == 81
    assert get_hardware("h100-sxm").dvfs.max_mhz == 1980 and get_hardware("l4").dvfs.max_mhz == 2040
    assert a100.knee_mhz == pytest.approx(1155.0)
    with pytest.raises(ValueError, match="whole number of 15 MHz steps"):
        Dvfs(210, 1400, 15, 100.0, "x")


def test_core_scale_is_v_squared_f_with_a_voltage_floor():
    dvfs = get_hardware("a100-80gb").dvfs
    assert dvfs.core_scale(1410) == 1.0
    assert dvfs.core_scale(1155) == pytest.approx((1155 / 1410) ** 3)  # at the knee: V ∝ f all the way
    assert dvfs.core_scale(705) == pytest.approx(0.5 * (1155 / 1410) ** 2)  # below it: V at its floor
    for f in (300, 705, 1155, 1305):
        assert dvfs.core_scale(f) < f / 1410  # super-linear: power falls faster than the clock


def test_phase_split_reproduces_the_measurements_it_is_calibrated_on():
    h200 = get_hardware("h200")
    power = StepPower("h200", h200.power_idle_w, h200.power_max_w - h200.power_idle_w, 1, 1, h200.dvfs)
    decode_w = power.busy_power_w(0.0, 1.0, 1.0)  # memory-bound, busy all step, top clock
    assert decode_w == pytest.approx(300.0)  # Ma et al.: H200 decode draws at most 300 W
    half = h200.dvfs.core_scale(990)
    assert (decode_w - power.busy_power_w(0.0, 1.0, half)) / decode_w == pytest.approx(0.32, abs=0.01)
    assert half == pytest.approx(0.5 * KNEE_FRACTION**2)
    prefill_w = power.busy_power_w(1.0, 0.1, 1.0)  # compute-bound prompt: close to TDP (Splitwise)
    assert prefill_w == pytest.approx(77 + 623 * (CORE_SHARE + (1 - CORE_SHARE) * 0.1))
    assert prefill_w > 0.85 * h200.power_max_w and 0 < STALL_ACTIVITY < 1


# -- the cost model -----------------------------------------------------------------------------------


def test_the_top_clock_is_the_default_bit_for_bit():
    base, top = model(), model(frequency_mhz=1980)
    for p in (PREFILL, DECODE):
        assert base.step(p) == top.step(p)


def test_compute_scales_with_the_clock_and_memory_does_not():
    top, half = model(), model(frequency_mhz=990)
    a, b = top.step(PREFILL), half.step(PREFILL)
    assert b.compute_s == pytest.approx(2 * a.compute_s) and b.memory_s == a.memory_s
    assert b.duration_s > 1.8 * a.duration_s  # compute-bound: nearly twice as long
    d_top, d_half = top.step(DECODE), half.step(DECODE)
    assert d_half.memory_s > d_half.compute_s  # still memory-bound at half clock
    assert d_half.duration_s == d_top.duration_s  # so decode does not slow down ...
    assert d_half.energy_j < 0.8 * d_top.energy_j  # ... and costs less energy


def test_energy_is_idle_plus_the_phase_weighted_dynamic_power():
    cm = model(tp=2, frequency_mhz=1500)
    hw = get_hardware("h100-sxm")
    c = cm.step(DECODE)
    busy = max(c.compute_s, c.memory_s)
    s = hw.dvfs.core_scale(1500)
    dyn = (hw.power_max_w - hw.power_idle_w) * ((1 - CORE_SHARE) * c.memory_s
                                                  + CORE_SHARE * s * (STALL_ACTIVITY * busy + (1 - STALL_ACTIVITY) * c.compute_s))
    assert c.energy_j == pytest.approx(2 * (hw.power_idle_w * c.duration_s + dyn))


def test_prefill_draws_more_power_than_decode_at_the_same_utilization():
    hw = get_hardware("h100-sxm")
    power = StepPower("h100-sxm", hw.power_idle_w, hw.power_max_w - hw.power_idle_w, 1, 1, hw.dvfs)
    # the same busy time and step time, one compute-bound, one memory-bound
    prefill, decode = power.busy_power_w(1.0, 0.2, 1.0), power.busy_power_w(0.2, 1.0, 1.0)
    assert prefill == pytest.approx(70 + 630 * ((1 - CORE_SHARE) * 0.2 + CORE_SHARE))
    assert decode == pytest.approx(70 + 630 * ((1 - CORE_SHARE) + CORE_SHARE * (STALL_ACTIVITY + (1 - STALL_ACTIVITY) * 0.2)))
    assert prefill > decode + 250


def test_lower_clocks_trade_prefill_time_for_power_and_energy_is_u_shaped():
    energies = [model(frequency_mhz=f).step(PREFILL).energy_j for f in (345, 1005, 1980)]
    assert energies[1] < energies[0] and energies[1] < energies[2]  # idle dominates low, V²f high


# -- power cap ----------------------------------------------------------------------------------------


def test_a_power_cap_slows_prefill_to_fit_and_leaves_decode_alone():
    free, capped = model(), model(power_cap_w=350.0)
    p, q = free.step(PREFILL), capped.step(PREFILL)
    assert q.duration_s > 1.2 * p.duration_s and q.energy_j / q.duration_s <= 350.0
    assert free.step(DECODE).duration_s == capped.step(DECODE).duration_s  # Splitwise: token phase unharmed


def test_the_cap_picks_the_highest_clock_that_fits():
    hw = get_hardware("h100-sxm")
    power = StepPower("h100-sxm", hw.power_idle_w, hw.power_max_w - hw.power_idle_w, 1, 1, hw.dvfs, power_cap_w=400.0)
    compute, scale = power.clocked(1.0, 0.1)
    f = 1980 / compute  # compute time 1 s at the top clock
    assert f in hw.dvfs.clocks() and f < 1980
    assert power.busy_power_w(compute, 0.1, scale) <= 400.0
    up = f + 15
    assert power.busy_power_w(1980 / up, 0.1, hw.dvfs.core_scale(up)) > 400.0
    assert power.clocked(0.1, 1.0) == (0.1, 1.0)  # a memory-bound step under the cap keeps the clock


@pytest.mark.parametrize("kw", [{"frequency_mhz": 1200}, {"power_cap_w": 300.0}, {"frequency_mhz": 1500, "power_cap_w": 450.0}])
@pytest.mark.parametrize("k", [5, 40])  # scalar and vectorized closed forms
def test_decode_run_stays_bitwise_step(kw, k):
    cm = model(**kw)
    rows, ctx = 48, 48 * 700
    durations, energies = cm.decode_run(rows, ctx, 701, k)
    for j in (0, k - 1):
        cost = cm.step(plan([700 + j] * rows, [1] * rows))
        assert cost.duration_s == durations[j] and cost.energy_j == energies[j]


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    ({"hardware.frequency_mhz": 1000}, "hardware.frequency_mhz: 1000 MHz is not a supported SM clock of 'a100-80gb': 210-1410 MHz in steps of 15 MHz"),
    ({"hardware.frequency_mhz": 1425}, "hardware.frequency_mhz: 1425 MHz is not a supported SM clock"),
    ({"hardware.power_cap_w": 50.0}, "hardware.power_cap_w: 50.0 W is outside the power limits 'a100-80gb' accepts: 100-400 W"),
    ({"hardware.power_cap_w": 401.0}, "hardware.power_cap_w: 401.0 W is outside"),
    ({"hardware.name": "tpu-v5e", "hardware.frequency_mhz": 1000}, "hardware.frequency_mhz: hardware 'tpu-v5e' has no published clock"),
    ({"hardware.name": "cpu", "hardware.power_cap_w": 100.0}, "hardware.power_cap_w: hardware 'cpu' has no published clock"),
])  # fmt: skip
def test_bad_clocks_and_caps_are_one_error_naming_the_key(values, message):
    with pytest.raises(ConfigError) as e:
        build_cost_model(override(defaults(), values))
    assert message in str(e.value)


def test_a_profiled_cost_model_takes_no_clock():
    config = override(defaults(), {"sim.cost_model": "profiled", "sim.profile": "unread.json", "hardware.frequency_mhz": 1005})
    with pytest.raises(ConfigError, match="hardware.frequency_mhz: does not apply to sim.cost_model='profiled'"):
        build_cost_model(config)


def test_set_clock_and_cap_reach_the_cost_model():
    cm = build_cost_model(override(defaults(), {"hardware.frequency_mhz": 1005, "hardware.power_cap_w": 300.0}))
    assert cm.frequency_mhz == 1005 and cm.power_cap_w == 300.0
    assert build_cost_model(defaults()).frequency_mhz == 1410  # unset: the top clock


def test_clock_errors_name_the_argument():
    with pytest.raises(ClockError) as e:
        model(frequency_mhz=100)
    assert e.value.argument == "frequency_mhz" and "345-1980 MHz" in str(e.value)
