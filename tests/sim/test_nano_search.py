"""NanoFlow's offline search in small: the vectorized grid search finds the brute-force optimum."""

import itertools

import numpy as np
import pytest

from jaxserve.sim.cost_model import RooflineCostModel
from jaxserve.sim.hardware import get_hardware
from jaxserve.sim.models import get_model
from jaxserve.sim.nano_search import schedule_grid, search_schedule, steady_state_plan
from jaxserve.sim.overlap_cost_model import NanoSchedule, OverlapCostModel

A100 = get_hardware("a100-80gb")


def brute_force(model, tp, plans, weights, max_nano, step, **kw):
    """Every schedule of the grid, one OverlapCostModel each, plans stepped one by one."""
    best = None
    shares = [i * step for i in range(1, round(1 / step))]
    network = shares if tp > 1 else [0.0]
    candidates = [NanoSchedule()] + [NanoSchedule(n, m, c) for n in range(2, max_nano + 1) for m, c in
                                     itertools.product(shares, network) if m + c < 1 - 1e-9]  # fmt: skip
    for schedule in candidates:
        cm = OverlapCostModel(get_model(model), A100, tp=tp, schedule=schedule, **kw)
        total = sum(w * cm.step(p).duration_s for w, p in zip(weights, plans))
        if best is None or total < best[1] - 1e-15:
            best = (schedule, total)
    return best, len(candidates)


@pytest.mark.parametrize("model, tp, lengths, kw", [
    ("llama-2-70b", 8, [(512, 512, 2048)], {}),
    ("llama-2-70b", 8, [(1024, 512, 1024), (2340, 439, 2048)], {"async_scheduling": True}),
    ("llama-3-8b", 1, [(512, 512, 2048)], {}),
    ("llama-2-70b", 8, [(512, 512, 2048), (1, 1000, 4)], {}),  # splitting helps the first, slows the second
    ("llama-2-13b", 2, [(1024, 64, 512), (64, 1024, 256)], {}),
])  # fmt: skip
def test_grid_search_finds_the_brute_force_optimum(model, tp, lengths, kw):
    plans = [steady_state_plan(p, o, d) for p, o, d in lengths]
    weights = [1.0, 2.0][: len(plans)]
    base = RooflineCostModel(get_model(model), A100, tp=tp, **kw)
    found = search_schedule(base, plans, weights, max_nano=4, share_step=0.2)
    (schedule, total), count = brute_force(model, tp, plans, weights, 4, 0.2, **kw)
    assert found.candidates == count
    assert found.step_s == pytest.approx(total, rel=1e-12)
    assert found.schedule.num_nano == schedule.num_nano
    assert (found.schedule.memory_share, found.schedule.network_share) == pytest.approx(
        (schedule.memory_share, schedule.network_share))
    assert found.unsplit_s == pytest.approx(sum(w * base.step(p).duration_s for w, p in zip(weights, plans)))


def test_a_dense_70b_step_is_worth_splitting():
    base = RooflineCostModel(get_model("llama-2-70b"), A100, tp=8)
    found = search_schedule(base, [steady_state_plan(512, 512, 2048)])
    assert found.schedule.num_nano >= 2 and found.schedule.network_share > 0 and found.speedup > 1.05


def test_a_few_decodes_are_not_worth_splitting():
    """4 decodes read every weight for little compute: nano-batches would read them again each."""
    base = RooflineCostModel(get_model("llama-2-70b"), A100, tp=8)
    found = search_schedule(base, [steady_state_plan(1, 1000, 4)])
    assert found.schedule == NanoSchedule() and found.speedup == 1.0


def test_grid_shape():
    nano, memory, network = schedule_grid(3, 0.25)
    # shares 0.25, 0.5, 0.75: 3 pairs sum to < 1, for 2 counts, plus the unsplit step
    assert len(nano) == 7 and (nano[0], memory[0], network[0]) == (1, 0, 0)
    assert np.all(memory[1:] + network[1:] < 1) and np.all(memory[1:] > 0) and np.all(network[1:] > 0)
    nano, memory, network = schedule_grid(2, 0.5, network=False)
    assert nano.tolist() == [1, 2] and memory.tolist() == [0, 0.5] and network.tolist() == [0, 0]


@pytest.mark.parametrize("call, match", [
    (lambda b, p: search_schedule(b, []), "at least one plan"),
    (lambda b, p: search_schedule(b, [p], [1.0, 2.0]), "weights must be 1"),
    (lambda b, p: search_schedule(b, [p], max_nano=0), "max_nano must be an int"),
    (lambda b, p: search_schedule(b, [p], share_step=0.3), "share_step must divide 1"),
    (lambda b, p: steady_state_plan(0, 10, 100), "need prompt_len"),
])  # fmt: skip
def test_bad_input(call, match):
    base = RooflineCostModel(get_model("llama-2-7b"), A100)
    with pytest.raises(ValueError, match=match):
        call(base, steady_state_plan(100, 100, 256))


def test_steady_state_plan_mixes_phases_by_their_token_shares():
    plan = steady_state_plan(1536, 512, 2048)  # decodes: 2048 * 512 / 2048 = 512 rows at context 1792
    n, c = plan.num_new_tokens, plan.num_computed_tokens
    assert plan.num_tokens == 2048 and int(np.sum(n == 1)) == 512 and set(c[n == 1].tolist()) == {1792}
    assert n[n > 1].tolist() == [1536] and plan.samples_token.all()
