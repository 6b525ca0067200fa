"""Placement search: the candidates a GPU budget allows (TP, PP, counts, memory), the analytic
screen over them, confirmation by bisection on a synthetic monotone system whose goodput is known,
the wall-time budget (a fake clock that counts simulate calls) and one clear error per bad input."""

from __future__ import annotations

import importlib.util
import itertools
import pathlib

import numpy as np
import pytest

from jaxserve.cluster import phase_model as pm
from jaxserve.cluster import placement as pl
from jaxserve.config import override
from jaxserve.sim import RooflineCostModel, get_hardware, get_model

ROOT = pathlib.Path(__file__).resolve().parents[2]
A100 = get_hardware("a100-80gb")
RNG = np.random.default_rng(0)
# chatbot-like lengths (a few hundred tokens each way)
WORKLOAD = pm.PhaseWorkload.from_lengths(RNG.integers(16, 1024, 400), RNG.integers(2, 512, 400))


def cost_models(name="llama-2-13b"):
    return lambda tp, pp: RooflineCostModel(get_model(name), A100, tp=tp, pp=pp)


@pytest.fixture(scope="module")
def screen16():
    return pl.screen_placements(cost_models(), 16, WORKLOAD, 0.25, 0.1, max_pp=4)


def test_phase_config_and_placement_count_gpus():
    p = pl.Placement(pl.PhaseConfig(2, 1, 3), pl.PhaseConfig(4, 2, 1))
    assert (p.prefill.num_gpus, p.decode.num_gpus, p.num_gpus) == (6, 8, 14)
    assert p.family() == pl.Placement(pl.PhaseConfig(2, 1, 6), pl.PhaseConfig(4, 2, 2)).family()
    with pytest.raises(ValueError, match="PhaseConfig.count"):
        pl.PhaseConfig(1, 1, 0)


def test_screen_enumerates_every_placement_that_fits(screen16):
    degrees = pl.parallel_degrees(16, node_size=8, max_pp=4)
    assert {tp for tp, _ in degrees} == {1, 2, 4, 8} and {pp for _, pp in degrees} == {1, 2, 4}
    expected = {
        pl.Placement(pl.PhaseConfig(a, b, m), pl.PhaseConfig(c, d, n))
        for (a, b), (c, d) in itertools.product(degrees, repeat=2)
        for m in range(1, 17) for n in range(1, 17) if m * a * b + n * c * d <= 16
    }  # fmt: skip
    assert set(screen16.candidates) == expected and len(screen16.candidates) == len(expected)
    assert screen16.goodput == pytest.approx(np.minimum(screen16.prefill_rate, screen16.decode_rate))
    assert (screen16.goodput > 0).all() and not screen16.skipped


def test_screen_leaves_out_configs_whose_weights_do_not_fit():
    # Llama-2-70B (~138 GB of bf16 weights) needs at least 2 A100-80GB per instance
    screen = pl.screen_placements(cost_models("llama-2-70b"), 16, WORKLOAD, 1.0, 0.2, max_pp=1)
    assert [(tp, pp) for tp, pp, _ in screen.skipped] == [(1, 1)] and "does not fit" in screen.skipped[0][2]
    assert {c.prefill.tp for c in screen.candidates} == {c.decode.tp for c in screen.candidates} == {2, 4, 8}


def test_each_phase_needs_its_longest_request_in_kv():
    # one A100-80GB holds ~61k KV tokens of Llama-2-13B, two (tp=2) ~155k; the short requests keep
    # the mean context small, so only the longest request's fit decides
    def tps(prompt, output):
        lengths = pm.PhaseWorkload.from_lengths([prompt] + [100] * 100, [output] + [100] * 100)
        screen = pl.screen_placements(cost_models(), 4, lengths, 60.0, 0.5, max_pp=1)
        return {c.prefill.tp for c in screen.candidates}, {c.decode.tp for c in screen.candidates}

    assert tps(70_000, 2) == ({2}, {2})  # the prompt alone is too long for one GPU
    assert tps(50_000, 20_000) == ({1, 2}, {2})  # the prompt fits, prompt + output does not


def test_screen_with_more_gpus_per_instance_estimates_more_per_instance(screen16):
    # a sanity check of direction: within a phase, more tensor parallelism serves more per instance
    rate = {c.prefill: r for c, r in zip(screen16.candidates, screen16.prefill_rate)}
    assert rate[pl.PhaseConfig(1, 1, 1)] < rate[pl.PhaseConfig(2, 1, 1)] < rate[pl.PhaseConfig(4, 1, 1)]
    # ...and count scales the rate exactly (Poisson arrivals split evenly)
    assert rate[pl.PhaseConfig(2, 1, 3)] == pytest.approx(3 * rate[pl.PhaseConfig(2, 1, 1)], rel=1e-6)


def test_cost_models_from_config_build_the_simulators_cost_model():
    spec = importlib.util.spec_from_file_location("placement_test_defaults", ROOT / "configs" / "default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = override(module.get_config(), {"model.name": "llama-2-13b", "hardware.mfu": 0.5})
    built = pl.cost_models_from_config(config)(4, 2)
    direct = RooflineCostModel(get_model("llama-2-13b"), A100, tp=4, pp=2, mfu=0.5)
    plan = pm.prefill_plan(700, 16)
    assert built.step(plan) == direct.step(plan)


def test_colocated_candidates_fill_the_budget_with_one_tp():
    got = pl.colocated_candidates(8, 2, cost_models(), WORKLOAD, pps=(1, 2))
    assert got == tuple(pl.PhaseConfig(2, 1, n) for n in range(1, 5)) + tuple(pl.PhaseConfig(2, 2, n) for n in (1, 2))


# -- search on a synthetic monotone system -------------------------------------------------------
def synthetic(truth):
    """``simulate`` of a system whose goodput is ``truth(placement)``: every request meets the SLOs
    at or below it, a tenth of them above it (attainment falls monotonically through 0.9)."""
    calls = []

    def simulate(placement, rate):
        calls.append((placement, rate))
        return 1.0 if rate <= truth(placement) else 0.1

    return simulate, calls


def test_search_finds_the_known_best_among_the_promising(screen16):
    promising = pl.promising(screen16, 4)
    assert len(promising) == 4 and len({screen16.candidates[i].family() for i in promising}) == 4
    # the truth reverses the screen's order among the four: the fourth is really the best
    truth = {screen16.candidates[i]: screen16.goodput[i] * f for i, f in zip(promising, (0.5, 0.6, 0.7, 1.2))}
    simulate, calls = synthetic(lambda p: truth[p])
    result = pl.search_placement(screen16, simulate, time_budget_s=1e9, top_k=4, rel_tol=0.01)
    best = screen16.candidates[promising[3]]
    assert result.chosen == best and result.num_simulated == 4 and not result.budget_spent
    assert result.goodput == pytest.approx(truth[best], rel=0.011) and result.goodput <= truth[best]
    assert result.goodput_per_gpu == pytest.approx(result.goodput / best.num_gpus)
    assert result.num_simulations == len(calls) and all(c.complete for c in result.confirmed)
    assert result.screen is screen16


def test_promising_confirms_the_largest_of_each_family(screen16):
    for i in pl.promising(screen16, 6):
        c = screen16.candidates[i]
        assert all(o.num_gpus <= c.num_gpus for o in screen16.candidates if o.family() == c.family())


def test_promising_takes_the_largest_member_even_when_rounding_favours_a_smaller_one():
    small, large = (pl.Placement(pl.PhaseConfig(1, 1, k), pl.PhaseConfig(1, 1, k)) for k in (1, 2))
    rates = np.array([2.0000001, 4.0])  # per GPU: 1.00000005 and 1.0, equal but for rounding
    screen = pl.Screen((small, large), rates, rates, rates, rates / [2, 4], 1.0, 1.0, (), 0.0, 0.0)
    assert pl.promising(screen, 4) == (1,)


def test_wall_time_budget_stops_confirming(screen16):
    simulate, calls = synthetic(lambda p: 1e9)  # never fails: every bisection ends at its high bound
    clock = lambda: float(len(calls))  # one "second" per simulate call

    result = pl.search_placement(screen16, simulate, time_budget_s=3, top_k=4, clock=clock)
    # each confirmation takes two calls (low and high both pass): the second is cut after one
    assert len(calls) == result.num_simulations == 3 and result.budget_spent and result.wall_s == 3
    assert [c.complete for c in result.confirmed] == [True, False]
    assert result.confirmed[1].goodput == result.confirmed[1].tried[0][0]  # its one passing rate: a lower bound
    # a budget of a fraction of one call still simulates once, so there is an answer
    calls.clear()
    tiny = pl.search_placement(screen16, simulate, time_budget_s=0.5, top_k=4, clock=clock)
    assert len(calls) == 1 and tiny.budget_spent and tiny.confirmed[0].goodput > 0


def test_bad_input_is_one_clear_error(screen16):
    simulate, _ = synthetic(lambda p: 1.0)
    with pytest.raises(ValueError, match="num_gpus must be an int >= 1, got 0"):
        pl.screen_placements(cost_models(), 0, WORKLOAD, 0.25, 0.1)
    with pytest.raises(ValueError, match="ttft_s must be a finite number > 0, got 0"):
        pl.screen_placements(cost_models(), 4, WORKLOAD, 0, 0.1)
    with pytest.raises(ValueError, match="tpot_s must be a finite number > 0, got -0.1"):
        pl.screen_placements(cost_models(), 4, WORKLOAD, 0.25, -0.1)
    with pytest.raises(ValueError, match="num_gpus=1: no placement fits"):
        pl.screen_placements(cost_models(), 1, WORKLOAD, 0.25, 0.1)
    empty = pl.Screen((), *(np.zeros(0),) * 4, 0.25, 0.1, (), 0.0, 0.0)
    with pytest.raises(ValueError, match="screen: no candidates"):
        pl.search_placement(empty, simulate, time_budget_s=10)
    with pytest.raises(ValueError, match="time_budget_s must be a finite number > 0"):
        pl.search_placement(screen16, simulate, time_budget_s=0)
    hopeless = pl.screen_placements(cost_models(), 4, WORKLOAD, 0.25, 0.001)  # no step is that fast
    with pytest.raises(ValueError, match="no placement has a positive estimated goodput at .*tpot_s=0.001"):
        pl.search_placement(hopeless, simulate, time_budget_s=10)
    with pytest.raises(ValueError, match="simulate must return an SLO attainment in \\[0, 1\\], got 90"):
        pl.search_placement(screen16, lambda p, r: 90, time_budget_s=10)
