"""experiments/sim_vs_engine.py: its error arithmetic (its end-to-end run is its quick mode, tests/test_quick_modes.py)."""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import sim_vs_engine as E  # noqa: E402


def test_step_errors_per_kind_and_total():
    steps = [
        {"kind": "decode", "measured_s": 1.0, "raw_s": 2.0, "profiled_s": 1.1, "roofline_s": 2.0},
        {"kind": "decode", "measured_s": 2.0, "raw_s": 4.0, "profiled_s": 1.8, "roofline_s": 1.0},
        {"kind": "prefill", "measured_s": 4.0, "raw_s": 8.0, "profiled_s": 4.0, "roofline_s": 4.0},
    ]
    e = E.step_errors(steps)
    assert e["mape"] == pytest.approx((0.1 + 0.1 + 0.0) / 3)
    assert e["decode_mape"] == pytest.approx(0.1) and e["prefill_mape"] == 0.0 and np.isnan(e["mixed_mape"])
    assert (e["decode_steps"], e["prefill_steps"], e["mixed_steps"]) == (2, 1, 0)
    assert e["total_time_error"] == pytest.approx(6.9 / 7.0 - 1)
    assert e["roofline_mape"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    raw = E.step_errors(steps, "raw_s")  # the undivided times of a machine at half the profile's speed
    assert raw["mape"] == pytest.approx((0.45 + 0.55 + 0.5) / 3) and raw["total_time_error"] == pytest.approx(6.9 / 14 - 1)


class Latencies:
    def __init__(self, ttft, tbt, e2e):
        self.ttft_s, self.tbt_s, self.e2e_s = (np.array(v, float) for v in (ttft, tbt, e2e))


def test_latency_rows_compare_percentiles():
    rows = E.latency_rows(Latencies([1.0, 2.0, 3.0], [0.1, 0.1], [2.0, np.nan, 4.0]),
                          Latencies([1.1, 2.2, 3.3], [0.1, 0.2], [2.0, 4.0, 6.0]))  # fmt: skip
    by = {(r["metric"], r["percentile"]): r for r in rows}
    assert len(rows) == len(E.LATENCIES) * len(E.PERCENTILES)
    assert by[("ttft_s", 50)]["error"] == pytest.approx(0.1)
    assert by[("e2e_s", 50)]["engine_s"] == 3.0 and by[("e2e_s", 50)]["sim_s"] == 4.0  # NaN (unfinished) dropped
