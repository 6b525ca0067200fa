"""The run plots: TTFT readable next to E2E latency, rolling quantiles, every PNG written."""

import numpy as np
import pytest

from jaxserve.metrics import RequestMetrics
from jaxserve.plots import _rolling_quantiles, latency_over_time_figure


def metrics(n=400, seed=0):
    rng = np.random.default_rng(seed)
    ttft = rng.uniform(0.01, 0.5, n)
    e2e = ttft + rng.uniform(1.0, 35.0, n)  # E2E ~70x TTFT, as in the main job
    f = np.ones(n, bool)
    z = np.zeros(n)
    return RequestMetrics(
        request_id=tuple(f"r{i}" for i in range(n)), client_id=np.array(["a"] * n), arrival_s=np.sort(rng.uniform(0, 600, n)),
        prompt_len=z + 10, num_output=z + 5, finished=f, rejected=~f, finish_reason=("stop",) * n, ttft_s=ttft, e2e_s=e2e,
        tpot_s=z, normalized_latency_s=z, queueing_s=z, max_tbt_s=z, preemptions=z, tbt_s=z[:0],
    )  # fmt: skip


def test_ttft_has_its_own_panel_scaled_to_it():
    rm = metrics()
    fig = latency_over_time_figure(rm)
    ttft_ax, e2e_ax = fig.axes
    assert "TTFT" in ttft_ax.get_ylabel() and "E2E" in e2e_ax.get_ylabel()
    top = ttft_ax.get_ylim()[1]
    assert rm.ttft_s.max() <= top < 2 * rm.ttft_s.max()  # not flattened under a 35 s axis
    assert len(ttft_ax.lines) == 2  # rolling P50 and P99


def test_a_spread_over_decades_gets_a_log_axis():
    rm = metrics()
    rm.ttft_s[:10] = 1e-4  # 3+ decades below the rest
    assert latency_over_time_figure(rm).axes[0].get_yscale() == "log"
    assert latency_over_time_figure(metrics()).axes[0].get_yscale() == "linear"


def test_a_log_axis_is_labelled_with_plain_numbers_and_no_minor_ticks():
    """Mathtext labels (10^k) and minor ticks' artists were a third of drawing the figure."""
    rm = metrics()
    rm.ttft_s[:10] = 1e-4
    fig = latency_over_time_figure(rm)
    fig.canvas.draw()
    axis = fig.axes[0].yaxis
    labels = [t.get_text() for t in axis.get_ticklabels() if t.get_text()]
    assert "0.01" in labels and "0.1" in labels and not any("$" in t for t in labels)
    assert len(axis.get_minorticklocs()) == 0


def test_rolling_quantiles():
    x = np.arange(10.0)[::-1]
    y = np.arange(10.0)[::-1]
    cx, p50, p99 = _rolling_quantiles(x, y, 3)
    np.testing.assert_array_equal(cx, np.arange(1.0, 9.0))
    np.testing.assert_array_equal(p50, np.arange(1.0, 9.0))
    assert p99 == pytest.approx(np.arange(1.0, 9.0) + 0.98)
    assert len(_rolling_quantiles(x, y, 20)[0]) == 0


def test_rolling_quantiles_at_evenly_spaced_windows_when_there_are_many():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 100, 5000), rng.uniform(0, 1, 5000)
    every = _rolling_quantiles(x, y, 50, points=10**6)
    cx, p50, p99 = _rolling_quantiles(x, y, 50, points=100)
    assert len(cx) == 100 and len(every[0]) == 5000 - 49
    picked = np.searchsorted(every[0], cx)  # the same windows' values as when every window is drawn
    np.testing.assert_array_equal(every[0][picked], cx)
    np.testing.assert_array_equal(every[1][picked], p50)
    np.testing.assert_array_equal(every[2][picked], p99)
    assert cx[0] == every[0][0] and cx[-1] == every[0][-1]


def test_a_cdf_from_the_sorted_gaps_draws_the_same_line():
    """plot_run draws the TBT CDF from the summary's sorted copy: the same points as sorting here."""
    from matplotlib.figure import Figure

    from jaxserve.plots import CDF_POINTS, _cdf

    rng = np.random.default_rng(2)
    for n in (5, CDF_POINTS + 7):
        values = rng.exponential(0.05, n)
        values[::4] = np.nan
        ax = Figure().subplots(1, 2)
        _cdf(ax[0], values, "raw")
        _cdf(ax[1], np.sort(values[~np.isnan(values)]), "sorted", ascending=True)
        np.testing.assert_array_equal(ax[0].lines[0].get_xydata(), ax[1].lines[0].get_xydata())
