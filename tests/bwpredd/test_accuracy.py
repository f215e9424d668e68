"""Normalised MAE: one definition, the same number wherever it is reported."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bwpredd.accuracy import nmae
from bwpredd.livescore import LiveScores
from bwpredd.replay import _Acc

# Two series (peers or traces): forecasts and the values that then arrived.
FORECAST = [np.array([9.0, 12.0, 10.0]), np.array([1.0, 3.0])]
ACTUAL = [np.array([10.0, 10.0, 10.0]), np.array([2.0, 2.0])]
# Series 0: (1 + 2 + 0) / 30 = 0.1; series 1: (1 + 1) / 4 = 0.5.
EXPECTED = (0.1 + 0.5) / 2


class TestNmae:
    def test_one_series_is_error_over_actual(self) -> None:
        """One series: sum |error| / sum actual, i.e. MAE over mean actual."""
        assert nmae(3.0, 30.0) == pytest.approx(0.1)
        assert nmae(np.array([1.0]), np.array([10.0])) == pytest.approx(0.1)

    def test_series_weigh_the_same(self) -> None:
        """Several series: the mean of each one's normalised MAE, not the pooled ratio."""
        assert nmae([3.0, 2.0], [30.0, 4.0]) == pytest.approx(EXPECTED)
        assert nmae([3.0, 2.0], [30.0, 4.0]) != pytest.approx(5.0 / 34.0)

    def test_means_give_the_same_ratio_as_sums(self) -> None:
        """Per-series means (same count for error and actual) give the same value."""
        assert nmae([1.0, 1.0], [10.0, 2.0]) == pytest.approx(EXPECTED)

    def test_series_without_scale_left_out(self) -> None:
        """A series whose actual sums to 0 has no scale and is skipped."""
        assert nmae([3.0, 7.0], [30.0, 0.0]) == pytest.approx(0.1)

    def test_nan_without_any_scale(self) -> None:
        """No series with a scale: NaN, not 0 and not an error."""
        assert math.isnan(nmae([1.0, 2.0], [0.0, 0.0]))
        assert math.isnan(nmae(0.0, 0.0))
        assert math.isnan(nmae([], []))


class TestOneDefinition:
    """The daemon's live scores and ``bwpredctl replay`` report :func:`nmae`."""

    def test_live_scores_summary(self) -> None:
        """LiveScores.summary's model_nmae is nmae over the peers' windows."""
        ls = LiveScores(4, steps=8)
        for slot, (forecast, actual) in enumerate(zip(FORECAST, ACTUAL, strict=True)):
            for f, a in zip(forecast, actual, strict=True):
                ls.record(np.array([slot]), np.array([f], np.float32),
                          np.array([a], np.float32), np.array([True]))  # fmt: skip
                ls.score(np.array([slot]), np.array([a], np.float32))
        s = ls.summary()
        assert s["model_nmae"] == pytest.approx(EXPECTED)
        assert s["baseline_nmae"] == 0.0

    def test_replay_scores(self) -> None:
        """bwpredctl replay's per-file nMAE is nmae of that one series."""
        acc = _Acc()
        acc.add(FORECAST[0], ACTUAL[0])
        assert acc.scores().nmae == pytest.approx(0.1)
        empty = _Acc()
        empty.add(np.array([1.0]), np.array([0.0]))
        assert math.isnan(empty.scores().nmae)
