"""Metrics and baselines on small cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from bwpredd import baselines
from bwpredd.accuracy import nmae
from trainer import metrics

# Two traces of two windows each; errors are [0.01, 0.5, 2.5, 0].
ACTUAL = np.array([1.0, 2.0, 10.0, 10.0])
PRED = np.array([1.01, 1.5, 12.5, 10.0])
TRACE = np.array([0, 0, 1, 1])


class TestPointMetrics:
    def test_mae_and_mse(self) -> None:
        """MAE and MSE are pooled over windows in raw Mbit/s."""
        m = metrics.point_metrics(PRED, ACTUAL, TRACE)
        assert m["mae"] == pytest.approx(3.01 / 4)
        assert m["mse"] == pytest.approx((0.0001 + 0.25 + 6.25 + 0.0) / 4)

    def test_nmae_is_per_trace_then_averaged(self) -> None:
        """nMAE divides each trace's MAE by its mean actual, then averages traces."""
        m = metrics.point_metrics(PRED, ACTUAL, TRACE)
        # trace 0: 0.255 / 1.5 = 0.17; trace 1: 1.25 / 10 = 0.125
        assert m["nmae"] == pytest.approx((0.17 + 0.125) / 2)

    def test_nmae_skips_traces_without_scale(self) -> None:
        """A trace whose actuals are all 0 has no scale and is left out of nMAE."""
        m = metrics.point_metrics(np.array([1.0, 3.0]), np.array([0.0, 2.0]), np.array([0, 1]))
        assert m["nmae"] == pytest.approx(0.5)

    def test_nmae_is_the_shared_definition(self) -> None:
        """The evaluation's nMAE is bwpredd.accuracy.nmae over the traces, the
        figure the daemon and bwpredctl replay report."""
        m = metrics.point_metrics(PRED, ACTUAL, TRACE)
        # Per trace: sum |error| and sum actual.
        assert m["nmae"] == pytest.approx(nmae([0.51, 2.5], [3.0, 20.0]))

    def test_mape_ignores_tiny_actuals(self) -> None:
        """MAPE counts only actuals >= 0.1 Mbit/s."""
        m = metrics.point_metrics(np.array([1.0, 1.5]), np.array([0.05, 1.0]), np.array([0, 0]))
        assert m["mape"] == pytest.approx(50.0)

    def test_mape(self) -> None:
        """MAPE is the mean of |error| / actual, in percent."""
        m = metrics.point_metrics(PRED, ACTUAL, TRACE)
        assert m["mape"] == pytest.approx((0.01 + 0.25 + 0.25 + 0.0) / 4 * 100)

    def test_accuracy_thresholds(self) -> None:
        """accN is the share of forecasts within N% of the actual in raw Mbit/s."""
        actual = np.array([100.0, 100.0, 100.0, 100.0])
        pred = np.array([101.0, 95.0, 85.0, 70.0])  # 1%, 5%, 15%, 30% off
        m = metrics.point_metrics(pred, actual, np.zeros(4, dtype=int))
        assert (m["acc2"], m["acc10"], m["acc20"]) == (0.25, 0.5, 0.75)

    def test_rejects_mismatched_lengths(self) -> None:
        """Arrays of different lengths are an error, not a silent broadcast."""
        with pytest.raises(ValueError):
            metrics.point_metrics(PRED[:3], ACTUAL, TRACE)


class TestIntervalMetrics:
    def test_coverage_and_width(self) -> None:
        """Coverage counts actuals inside [low, high]; width is per-trace normalised."""
        low = np.array([0.0, 1.0, 9.0, 11.0])
        high = np.array([2.0, 1.4, 11.0, 12.0])
        m = metrics.interval_metrics(low, high, ACTUAL, TRACE)
        assert m["coverage"] == pytest.approx(0.5)
        # widths [2, 0.4, 2, 1]: trace 0 1.2 / 1.5 = 0.8, trace 1 1.5 / 10 = 0.15
        assert m["rel_width"] == pytest.approx((0.8 + 0.15) / 2)


class TestMacro:
    def test_each_source_weighs_the_same(self) -> None:
        """Macro averages metrics over sources regardless of their window counts."""
        out = metrics.macro(
            {"a": {"nmae": 0.2, "n_windows": 1000}, "b": {"nmae": 0.4, "n_windows": 5}}
        )
        assert out["nmae"] == pytest.approx(0.3)
        assert out["n_windows"] == 1005
        assert out["n_sources"] == 2

    def test_score_has_every_metric(self) -> None:
        """score() returns the point metrics, the interval metrics and counts."""
        out = metrics.score(ACTUAL, TRACE, PRED, PRED - 1, PRED + 1)
        for key in (*metrics.POINT_METRICS, "coverage", "rel_width"):
            assert key in out
        assert out["n_traces"] == 2


def _window(bw: list[float]) -> np.ndarray:
    x = np.zeros((1, len(bw), 4), dtype=np.float32)
    x[0, :, 1] = bw
    return x


WIN = _window([1, 1, 1, 1, 1, 2, 4, 4, 2, 1])


class TestBaselines:
    def test_last_value(self) -> None:
        """Last value is the newest bandwidth."""
        assert baselines.last_value(WIN)[0] == pytest.approx(1.0)

    def test_mean_of_last_10(self) -> None:
        """The mean of the last 10 is the arithmetic mean of the window."""
        assert baselines.mean(WIN, last=10)[0] == pytest.approx(18 / 10)

    def test_harmonic_mean_of_last_5(self) -> None:
        """The harmonic mean uses only the 5 newest samples."""
        # [2, 4, 4, 2, 1]: 5 / (0.5 + 0.25 + 0.25 + 0.5 + 1) = 2.0
        assert baselines.harmonic_mean(WIN, last=5)[0] == pytest.approx(2.0)

    def test_harmonic_mean_floors_zeros(self) -> None:
        """A zero is floored at 1 kbit/s instead of making the mean 0 or NaN."""
        win = _window([1, 1, 1, 1, 1, 0, 1, 1, 1, 1])
        assert baselines.harmonic_mean(win, last=5)[0] == pytest.approx(5 / (1000 + 4), rel=1e-4)

    @pytest.mark.parametrize(
        ("alpha", "expected"),
        [
            # from 1: 0.5*2+0.5*1=1.5, 2.75, 3.375, 2.6875, 1.84375
            (0.5, 1.84375),
            # from 1: 1.3, 2.11, 2.677, 2.4739, 0.3+0.7*2.4739=2.03173
            (0.3, 2.03173),
        ],
    )
    def test_ewma(self, alpha: float, expected: float) -> None:
        """EWMA runs oldest to newest starting from the first sample."""
        assert baselines.ewma(WIN, alpha=alpha)[0] == pytest.approx(expected, rel=1e-5)

    def test_baseline_interval_brackets_the_point(self) -> None:
        """The baseline interval is exp(+-1.28 sigma) of the log changes around the point."""
        point = baselines.last_value(WIN)
        low, high = baselines.baseline_interval(WIN, point)
        diffs = np.diff(np.log(WIN[0, :, 1].astype(np.float64)))
        sigma = diffs.std(ddof=1)
        assert low[0] == pytest.approx(np.exp(-1.2815516 * sigma), rel=1e-5)
        assert high[0] == pytest.approx(np.exp(1.2815516 * sigma), rel=1e-5)
