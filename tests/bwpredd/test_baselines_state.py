"""Baselines and the allocator state on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from bwpredd import baselines
from bwpredd.state import (
    STATE_LAYOUT,
    allocation_percent,
    build_state,
    reference_capacity,
    step_seconds,
)


def windows(*bws: list[float]) -> np.ndarray:
    w = np.zeros((len(bws), len(bws[0]), 4), dtype=np.float32)
    for i, b in enumerate(bws):
        w[i, :, 1] = b
        w[i, :, 0] = 10.0
        w[i, :, 3] = 1.0
    return w


class TestBaselines:
    """The practitioners' forecasters."""

    def test_last_mean_harmonic(self) -> None:
        """Last value, mean of last 10 and harmonic mean of last 5 match hand arithmetic."""
        w = windows([1.0, 2, 3, 4, 5, 6, 7, 8, 9, 10])
        assert baselines.last_value(w).tolist() == [10.0]
        assert baselines.mean(w).tolist() == [5.5]
        assert baselines.harmonic_mean(w)[0] == pytest.approx(
            5 / (1 / 6 + 1 / 7 + 1 / 8 + 1 / 9 + 1 / 10)
        )

    def test_harmonic_floor(self) -> None:
        """A zero in the window is floored at 1 kbit/s instead of giving 0 or inf."""
        w = windows([5.0] * 9 + [0.0])
        assert baselines.harmonic_mean(w)[0] == pytest.approx(5 / (4 / 5.0 + 1 / 1e-3))

    def test_ewma(self) -> None:
        """EWMA with alpha 0.5 over 1, 2, 3 is 2.25; counts restrict it to the real rows."""
        w = windows([9.0, 9.0, 1.0, 2.0, 3.0])
        assert baselines.ewma(w, np.array([3]), 0.5)[0] == pytest.approx(2.25)
        with pytest.raises(ValueError):
            baselines.ewma(w, None, 0.0)

    def test_interval_brackets_point(self) -> None:
        """The baseline interval brackets the point, widens with volatility and is scale-free."""
        calm = windows([10.0, 10.1, 9.9, 10.0, 10.05, 9.95, 10.0, 10.1, 9.9, 10.0])
        wild = windows([10.0, 20, 5, 10, 30, 3, 10, 25, 4, 10])
        point = np.array([10.0], dtype=np.float32)
        lo_c, hi_c = baselines.baseline_interval(calm, point)
        lo_w, hi_w = baselines.baseline_interval(wild, point)
        assert lo_c[0] <= 10 <= hi_c[0] and lo_w[0] <= 10 <= hi_w[0]
        assert hi_w[0] - lo_w[0] > hi_c[0] - lo_c[0]
        lo_s, _ = baselines.baseline_interval(calm * 1000, point * 1000)
        assert lo_s[0] == pytest.approx(lo_c[0] * 1000, rel=1e-4)


class TestState:
    """The allocator state shared by training and serving."""

    def test_layout_and_values(self) -> None:
        """build_state has one column per STATE_LAYOUT name with hand-checkable values."""
        w = windows([10.0] * 9 + [20.0])
        w[0, -1, 0] = 30.0  # latency tripled at the newest step: a queue
        cap = reference_capacity(w)
        assert cap[0] == pytest.approx(11.0)  # p90 of nine 10s and a 20
        s = build_state(w, np.array([12.0]), np.array([8.0]), np.array([16.0]), 0.5)
        assert s.shape == (1, len(STATE_LAYOUT))
        col = dict(zip(STATE_LAYOUT, s[0].tolist(), strict=True))
        assert col["bandwidth_over_capacity"] == pytest.approx(20 / 11, rel=1e-5)
        assert col["forecast_over_capacity"] == pytest.approx(12 / 11, rel=1e-5)
        assert col["queue_signal"] == pytest.approx(2.0)
        assert col["latency_trend"] == pytest.approx(2.0)
        assert col["log1p_latency_ms"] == pytest.approx(np.log1p(30.0), rel=1e-5)
        # 20 ms above the window's minimum at 0.5 s steps: 0.04 steps of capacity.
        assert col["queue_steps"] == pytest.approx(0.04, rel=1e-5)
        assert col["queue_trend_steps"] == pytest.approx(0.04, rel=1e-5)
        assert col["min_over_capacity"] == pytest.approx(10 / 11, rel=1e-5)
        assert col["median_over_capacity"] == pytest.approx(10 / 11, rel=1e-5)

    def test_step_seconds(self) -> None:
        """The median gap between real samples; padding and repeated times
        ignored; one second when the window has no positive gap."""
        ts = np.array(
            [
                [0, 0, 0, 0, 0, 0, 10.0, 10.5, 11.0, 13.0],  # 4 real rows, gaps .5 .5 2
                [5.0] * 10,  # one timestamp for every sample
                [0.0] * 9 + [7.0],  # one real row
                np.arange(10) * 2.0,
            ]
        )
        counts = np.array([4, 10, 1, 10])
        np.testing.assert_allclose(step_seconds(ts, counts), [0.5, 1.0, 1.0, 2.0])

    def test_step_seconds_is_the_median_gap(self) -> None:
        """On random windows and counts (every window full in half the
        batches: the unmasked path), step_seconds equals statistics.median of
        each window's real gaps (one second where it is not positive)."""
        import statistics

        rng = np.random.default_rng(0)
        for _ in range(300):
            k = int(rng.integers(1, 5))
            gaps = rng.choice([0.0, 0.5, 1.0, 2.0, 3.7], (k, 10))
            ts = 1.7e9 + gaps.cumsum(axis=1)
            counts = rng.integers(0, 11, k) if rng.random() < 0.5 else np.full(k, 10)
            got = step_seconds(ts, counts)
            for i in range(k):
                real = np.diff(ts[i, 10 - counts[i] :]).tolist()
                want = statistics.median(real) if real else 0.0
                assert got[i] == pytest.approx(want if want > 0 else 1.0, rel=1e-6)

    def test_scale_free(self) -> None:
        """Multiplying every bandwidth and forecast by 1000 leaves the state unchanged."""
        w = windows([3.0, 5, 4, 6, 5, 4, 7, 5, 6, 5])
        a = build_state(w, np.array([5.0]), np.array([4.0]), np.array([6.0]), 1.0)
        w2 = w.copy()
        w2[:, :, 1] *= 1000
        b = build_state(w2, np.array([5000.0]), np.array([4000.0]), np.array([6000.0]), 1.0)
        np.testing.assert_allclose(a, b, rtol=1e-5)

    def test_allocation_percent(self) -> None:
        """Levels are (action + 1) x 10; out-of-range actions are refused."""
        assert [allocation_percent(a) for a in range(10)] == list(range(10, 101, 10))
        with pytest.raises(ValueError):
            allocation_percent(10)
