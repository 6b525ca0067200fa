"""experiments/splitwise_designs.py: machine caps, budget enumeration, deployments as configs, headlines
(its end-to-end run is its quick mode, tests/test_quick_modes.py)."""

from __future__ import annotations

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import _common as C  # noqa: E402
import splitwise_designs as S  # noqa: E402

from jaxserve.cluster.config import build_cluster_sim  # noqa: E402

DESIGNS = {d.name: d for d in S.designs(0.7)}
A100_USD, H100_USD = 40.9657, 55.04  # jaxserve's AWS prices per 8-GPU machine (p4de, p5)


def counts(cands):
    return [(c.prompt, c.token, c.mixed) for c in cands]


def test_capped_machine():
    cap = DESIGNS["Splitwise-HHcap"].token
    assert cap.power_w == pytest.approx(7140.0)  # 0.7 x 10.2 kW, SplitwiseSim's dgx-h100-pcap
    assert cap.gpu_cap_w == pytest.approx(700 - 0.3 * 10200 / 8)  # 317.5 W: the GPUs give up the 3.06 kW
    assert DESIGNS["Splitwise-HH"].token.gpu_cap_w is None
    assert DESIGNS["Baseline-A100"].token.usd_per_hour == pytest.approx(A100_USD)
    assert DESIGNS["Baseline-H100"].token.usd_per_hour == pytest.approx(H100_USD)


def test_iso_cost_candidates_by_hand():
    budget = 6 * A100_USD  # 245.79 $/h
    assert counts(S.candidates(DESIGNS["Baseline-A100"], budget, "usd_per_hour", 1)) == [(0, 0, 6)]
    assert counts(S.candidates(DESIGNS["Baseline-H100"], budget, "usd_per_hour", 1)) == [(0, 0, 4)]  # 4 x 55.04
    # HA: P x 55.04 + (T + 1) x 40.97; (1, 3): 218.9, (2, 2): 233.0, (3, 0): 197.0 (one more T: 247.1 > 245.8)
    assert counts(S.candidates(DESIGNS["Splitwise-HA"], budget, "usd_per_hour", 1)) == [(1, 3, 1), (2, 2, 1), (3, 0, 1)]
    assert counts(S.candidates(DESIGNS["Splitwise-AA"], budget, "usd_per_hour", 1)) == [(p, 5 - p, 1) for p in range(1, 6)]
    assert S.candidates(DESIGNS["Baseline-H100"], 50.0, "usd_per_hour", 1) == []  # not even one machine
    # prompt machines cheaper than token ones: (2, 1) = 192.0 leaves room for a third prompt machine (233.0)
    ah = S.Design("AH", DESIGNS["Baseline-A100"].token, DESIGNS["Baseline-H100"].token, True)
    assert counts(S.candidates(ah, budget, "usd_per_hour", 1)) == [(1, 2, 1), (3, 1, 1), (4, 0, 1)]


def test_iso_power_candidates_by_hand():
    budget = 6 * 6500.0  # 39 kW
    # HHcap: P x 10.2 + (T + 1) x 7.14 kW: (1, 3): 38.76, (2, 1): 34.68, (3, 0): 37.74
    assert counts(S.candidates(DESIGNS["Splitwise-HHcap"], budget, "power_w", 1)) == [(1, 3, 1), (2, 1, 1), (3, 0, 1)]
    assert counts(S.candidates(DESIGNS["Splitwise-HH"], budget, "power_w", 1)) == [(1, 1, 1), (2, 0, 1)]
    # without a mixed machine a design needs a token machine: (2, 0, 0) could serve no decode
    assert counts(S.candidates(DESIGNS["Splitwise-AA"], 2 * 6500.0, "power_w", 0)) == [(1, 1, 0)]


def test_deployment_builds_the_designed_replicas():
    c = S.Candidate(DESIGNS["Splitwise-HHcap"], 2, 1, 1)
    sim = build_cluster_sim(C.config_for(S.POLICY, S.overrides(c)))
    models = [s.executor.cost_model for s in sim.specs]
    assert [s.role for s in sim.specs] == ["prefill", "prefill", "decode", "mixed"]
    assert all(m.hardware.name == "h100-sxm" and m.tp == 8 for m in models)
    assert [m.power_cap_w for m in models] == [None, None, pytest.approx(317.5), pytest.approx(317.5)]
    assert sim.pools.link.name == "infiniband-ndr" and sim.pools.overlap == "layer"
    ha = build_cluster_sim(C.config_for(S.POLICY, S.overrides(S.Candidate(DESIGNS["Splitwise-HA"], 1, 1, 1))))
    assert [s.executor.cost_model.hardware.name for s in ha.specs] == ["h100-sxm", "a100-80gb", "a100-80gb"]
    assert ha.pools.link.name == "infiniband-hdr"
    base = build_cluster_sim(C.config_for(S.POLICY, S.overrides(S.Candidate(DESIGNS["Baseline-H100"], 0, 0, 3))))
    assert [s.role for s in base.specs] == ["mixed"] * 3
    assert {s.executor.cost_model.hardware.name for s in base.specs} == {"h100-sxm"}


def row(design, budget, thr_a, cost_a, power_a, thr_h=1.0, cost_h=1.0, power_h=1.0):
    return {"design": design, "deployment": "", "budget": budget, "throughput_vs_A100": thr_a, "cost_vs_A100": cost_a,
            "power_vs_A100": power_a, "throughput_vs_H100": thr_h, "cost_vs_H100": cost_h, "power_vs_H100": power_h}


def test_headlines_pick_the_best_qualifying_design():
    rows = [row("Baseline-A100", "iso-cost", 1.0, 1.0, 1.0),
            row("Splitwise-AA", "iso-cost", 2.0, 1.0, 1.0),
            row("Splitwise-HA", "iso-cost", 3.0, 0.9, 1.1),  # more power than the baseline: not "same cost and power"
            row("Splitwise-HH", "iso-power", 1.5, 0.8, 0.9)]  # fmt: skip
    same_a, _, cheaper_a, cheaper_h = (ours for _, _, ours in S.headlines(rows))
    assert same_a.startswith("Splitwise-AA") and "2.00x throughput" in same_a
    assert cheaper_a.startswith("Splitwise-HA") and "3.00x throughput at 0.90x cost" in cheaper_a
    assert cheaper_h == "no Splitwise design qualifies"
