"""DynamoLLM's energy controller on hand-made profiles whose right answers are worked out by hand.

Profile of one pool (SLO p99 TTFT 0.5 s, TBT 0.06 s unless said; epoch 100 s):

    tp  MHz   idle W   load -> (TTFT s, TBT s, W)
    A  1  1980  100    1 -> (0.2, 0.03, 300)    2 -> (0.4, 0.05, 400)
    B  1  1200   90    1 -> (0.3, 0.04, 200)    2 -> (0.9, 0.08, 260)
    C  2  1980  200  2.5 -> (0.15, 0.02, 800)   5 -> (0.3, 0.03, 900)
"""

import pytest

from jaxserve.cluster.energy_controller import (
    LengthBins,
    LoadPoint,
    PoolConfig,
    ProfileEntry,
    ReconfigCosts,
    Slo,
    choose,
    plan_epoch,
    pool_loads,
    transition_j,
)

A = ProfileEntry(1, 1980, 100.0, (LoadPoint(1, 0.2, 0.03, 300), LoadPoint(2, 0.4, 0.05, 400)))
B = ProfileEntry(1, 1200, 90.0, (LoadPoint(1, 0.3, 0.04, 200), LoadPoint(2, 0.9, 0.08, 260)))
C = ProfileEntry(2, 1980, 200.0, (LoadPoint(2.5, 0.15, 0.02, 800), LoadPoint(5, 0.3, 0.03, 900)))
PROFILE = (A, B, C)
SLO = Slo(ttft_s=0.5, tbt_s=0.06)
FREE = ReconfigCosts(instance_start_s=0.0, reshard_s=0.0)


def decide(load, max_gpus=4, slo=SLO, costs=FREE, **kw):
    return choose(load, PROFILE, slo, epoch_s=100.0, max_gpus=max_gpus, costs=costs, **kw)


def test_profiles_interpolate_from_idle():
    assert A.at(1.5) == LoadPoint(1.5, pytest.approx(0.3), pytest.approx(0.04), pytest.approx(350))
    assert A.at(0.5).power_w == pytest.approx(200)  # halfway from idle (100 W) to 300 W
    assert A.at(0.0) == LoadPoint(0.0, 0.2, 0.03, 100.0)
    with pytest.raises(ValueError, match="outside this profile's 0-2"):
        A.at(2.5)


def test_slo_infeasible_at_the_low_clock_picks_the_high_clock():
    # 4 req/s on 2 GPUs: B x2 has TTFT 0.9 > 0.5; A x2 (per 2: 0.4 s, 0.05 s) 2·400·100 = 80 kJ;
    # C x1 (per 4: 900·0.6 + 800·0.4 = 860 W) 86 kJ.
    d = decide(4.0, max_gpus=2)
    assert d.config == PoolConfig(2, 1, 1980) and d.energy_j == pytest.approx(80_000) and d.slo_met
    # relaxed SLOs make B x2 feasible: 2·260·100 = 52 kJ at 1200 MHz
    relaxed = decide(4.0, max_gpus=2, slo=Slo(ttft_s=1.0, tbt_s=0.1))
    assert relaxed.config == PoolConfig(2, 1, 1200) and relaxed.energy_j == pytest.approx(52_000)


def test_more_gpus_buy_a_lower_clock():
    # 4 GPUs: B x3 (per 4/3: TTFT 0.5, TBT 0.0533, 220 W) = 66 kJ beats A x2 (80 kJ)
    d = decide(4.0, max_gpus=4)
    assert d.config == PoolConfig(3, 1, 1200) and d.energy_j == pytest.approx(66_000)


def test_a_change_that_does_not_pay_for_itself_is_not_made():
    current = PoolConfig(2, 1, 1980)  # A x2: 80 kJ; B x3 would save 14 kJ by starting one instance
    slow = decide(4.0, costs=ReconfigCosts(instance_start_s=200.0, reshard_s=0.0), current=current)
    assert slow.kept and slow.config == current and slow.transition_j == 0.0 and slow.energy_j == pytest.approx(80_000)
    assert slow.best_static == PoolConfig(3, 1, 1200)  # 200 s · 90 W = 18 kJ > 14 kJ
    fast = decide(4.0, costs=ReconfigCosts(instance_start_s=100.0, reshard_s=0.0), current=current)
    assert not fast.kept and fast.config == PoolConfig(3, 1, 1200) and fast.transition_j == pytest.approx(9_000)
    # the same 18 kJ spread over two epochs (9 kJ each) pays
    amortized = decide(4.0, costs=ReconfigCosts(200.0, 0.0), current=current, amortize_epochs=2)
    assert amortized.config == PoolConfig(3, 1, 1200) and amortized.transition_j == pytest.approx(18_000)


def test_a_load_drop_gives_fewer_instances_at_a_lower_clock():
    current = PoolConfig(2, 1, 1980)
    # 1 req/s: A x2 (per 0.5: 200 W) 40 kJ, A x1 30 kJ, B x1 (200 W) 20 kJ; moving to B x1 starts nothing
    d = decide(1.0, costs=ReconfigCosts(instance_start_s=1000.0, reshard_s=1000.0), current=current)
    assert d.config == PoolConfig(1, 1, 1200) and d.energy_j == pytest.approx(20_000) and d.transition_j == 0.0
    off = decide(0.0, current=current, min_instances=0)
    assert off.config.instances == 0 and off.energy_j == 0.0


def test_reconfiguration_costs_by_hand():
    costs = ReconfigCosts(instance_start_s=60.0, reshard_s=10.0, clock_change_s=1.0)
    # C x1 (2 GPUs) -> A x2 at the same clock: both instances re-sharded from the 2 GPUs, 2·10 s at 100 W
    assert transition_j(PoolConfig(1, 2, 1980), PoolConfig(2, 1, 1980), 100.0, costs) == pytest.approx(2_000)
    # A x2 (2 GPUs) -> C x2: one re-sharded (2 // 2), one started: (10 + 60) s at 200 W
    assert transition_j(PoolConfig(2, 1, 1980), PoolConfig(2, 2, 1980), 200.0, costs) == pytest.approx(14_000)
    # A x2 -> B x3: one started, three clocks changed: (60 + 3) s at 90 W
    assert transition_j(PoolConfig(2, 1, 1980), PoolConfig(3, 1, 1200), 90.0, costs) == pytest.approx(63 * 90)
    assert transition_j(PoolConfig(3, 1, 1980), PoolConfig(1, 1, 1980), 90.0, costs) == 0.0  # scale-in drains
    assert transition_j(None, PoolConfig(3, 1, 1980), 90.0, costs) == 0.0  # the first deployment


def test_no_feasible_config_gives_the_least_violating_one_flagged():
    # 10 req/s on 2 GPUs: A x2 and B x2 at 2.5x their capacity, C x1 at 2x
    d = decide(10.0, max_gpus=2)
    assert not d.slo_met and d.config == PoolConfig(1, 2, 1980)


def test_plan_epoch_decides_every_pool():
    loads = {"short": 1.0, "long": 4.0}
    out = plan_epoch(loads, {p: PROFILE for p in loads}, {p: SLO for p in loads}, epoch_s=100.0,
                     max_gpus={"short": 4, "long": 2}, costs=FREE)
    assert out["short"].config == PoolConfig(1, 1, 1200) and out["long"].config == PoolConfig(2, 1, 1980)
    with pytest.raises(ValueError, match="slos has no entry for pool 'long'"):
        plan_epoch(loads, {p: PROFILE for p in loads}, {"short": SLO}, epoch_s=100.0, max_gpus={"short": 4, "long": 2}, costs=FREE)


def test_length_bins():
    bins = LengthBins((256, 1024), (128, 512))
    assert bins.pool(100, 600) == (0, 2) and bins.pool(256, 127) == (1, 0) and bins.pool(5000, 128) == (2, 1)
    assert len(bins.pools) == 9
    loads = pool_loads([(100, 50), (100, 60), (2000, 600)], bins, duration_s=2.0)
    assert loads[(0, 0)] == 1.0 and loads[(2, 2)] == 0.5 and sum(loads.values()) == 1.5
    with pytest.raises(ValueError, match="input_edges must be increasing"):
        LengthBins((512, 256), (128,))


@pytest.mark.parametrize("make, message", [
    (lambda: Slo(ttft_s=0.0, tbt_s=0.1), "slo.ttft_s must be a finite number > 0, got 0.0"),
    (lambda: Slo(ttft_s=0.5, tbt_s=-1), "slo.tbt_s must be a finite number > 0, got -1"),
    (lambda: choose(1.0, (), SLO, epoch_s=10, max_gpus=2, costs=FREE, pool="chat"), "profile of pool 'chat' is empty"),
    (lambda: ProfileEntry(1, 1980, 100.0, ()), "points is empty"),
    (lambda: ProfileEntry(1, 1980, 100.0, (LoadPoint(2, 0.1, 0.01, 1), LoadPoint(1, 0.1, 0.01, 1))), "increasing"),
    (lambda: decide(-1.0), "load_rps must be a finite number >= 0"),
    (lambda: choose(1.0, PROFILE, SLO, epoch_s=0, max_gpus=2, costs=FREE), "epoch_s must be a finite number > 0"),
    (lambda: decide(1.0, max_gpus=0), "max_gpus must be an int >="),
    (lambda: decide(1.0, current=PoolConfig(1, 4, 1980)), "not in its profile"),
    (lambda: ReconfigCosts(instance_start_s=-1, reshard_s=0), "ReconfigCosts.instance_start_s"),
])  # fmt: skip
def test_bad_input_is_one_clear_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()
