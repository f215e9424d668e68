"""Tests for trainer.data.synthetic: ranges, seeding, temporal structure, oracle."""

from __future__ import annotations

import numpy as np
import pytest

from bwpredd.schema import BW, FEATURES, LAT, LOSS, REL
from trainer.data.synthetic import PARAMS, PROFILES, generate, synthetic_traces

# The origin design's ranges, raw units.
RANGES = {
    "datacenter": {BW: (8000, 12000), LAT: (0.1, 2.0), LOSS: (0.0, 0.01), REL: (0.99, 1.0)},
    "internet": {BW: (80, 120), LAT: (10, 200), LOSS: (0.0, 0.05), REL: (0.90, 0.99)},
}


def _lag1(x: np.ndarray) -> float:
    return float(np.corrcoef(x[:-1], x[1:])[0, 1])


class TestGenerate:
    @pytest.mark.parametrize("profile", PROFILES)
    def test_within_documented_ranges(self, profile: str) -> None:
        """Every feature stays inside the origin design's range for the profile."""
        data, oracle = generate(profile, 3000, seed=1)
        assert data.shape == (3000, 4) and data.dtype == np.float32
        assert oracle.shape == (3000,) and oracle.dtype == np.float32
        for col, (lo, hi) in RANGES[profile].items():
            assert data[:, col].min() >= np.float32(lo), FEATURES[col]
            assert data[:, col].max() <= np.float32(hi), FEATURES[col]

    @pytest.mark.parametrize("profile", PROFILES)
    def test_centred_on_base(self, profile: str) -> None:
        """Mean bandwidth is within 5% of the profile's base (10 Gbit/s or 100 Mbit/s)."""
        data, _ = generate(profile, 5000, seed=2)
        assert data[:, BW].mean() == pytest.approx(PARAMS[profile].base, rel=0.05)

    def test_same_seed_same_data(self) -> None:
        """The same seed gives identical data and oracle."""
        a = generate("internet", 400, seed=7)
        b = generate("internet", 400, seed=7)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])

    def test_different_seed_different_data(self) -> None:
        """A different seed gives different bandwidth."""
        a, _ = generate("internet", 400, seed=7)
        b, _ = generate("internet", 400, seed=8)
        assert not np.array_equal(a[:, BW], b[:, BW])

    @pytest.mark.parametrize("profile", PROFILES)
    def test_not_iid(self, profile: str) -> None:
        """Bandwidth is clearly autocorrelated at lag 1 (a temporal process, not noise)."""
        data, _ = generate(profile, 2000, seed=3)
        assert _lag1(data[:, BW]) > 0.5

    @pytest.mark.parametrize("profile", PROFILES)
    def test_congestion_couples_features(self, profile: str) -> None:
        """Latency and loss rise when bandwidth dips (negative correlation)."""
        data, _ = generate(profile, 5000, seed=4)
        assert np.corrcoef(data[:, BW], data[:, LAT])[0, 1] < -0.2
        assert np.corrcoef(data[:, BW], data[:, LOSS])[0, 1] < -0.2

    def test_bad_arguments(self) -> None:
        """Unknown profiles and empty traces are rejected."""
        with pytest.raises(ValueError, match="profile"):
            generate("satellite", 10, 0)
        with pytest.raises(ValueError, match="n_steps"):
            generate("internet", 0, 0)


class TestOracle:
    @pytest.mark.parametrize("profile", PROFILES)
    def test_unbiased_and_beats_last_value(self, profile: str) -> None:
        """The oracle is an unbiased next-step forecast with lower squared error than last value."""
        runs = [generate(profile, 2000, seed=s) for s in range(10)]
        bw = np.concatenate([d[1:, BW] for d, _ in runs]).astype(np.float64)
        orc = np.concatenate([o[1:] for _, o in runs]).astype(np.float64)
        last = np.concatenate([d[:-1, BW] for d, _ in runs]).astype(np.float64)
        # Mean error is a small fraction of the residual spread (unbiased).
        resid = bw - orc
        assert abs(resid.mean()) < 0.05 * resid.std()
        assert np.mean(resid**2) < np.mean((bw - last) ** 2)

    @pytest.mark.parametrize("profile", PROFILES)
    def test_residual_orthogonal_to_past(self, profile: str) -> None:
        """oracle[t] uses the state after t-1: its error is uncorrelated with bw[t-1]."""
        runs = [generate(profile, 2000, seed=s) for s in range(10)]
        resid = np.concatenate([d[1:, BW] - o[1:] for d, o in runs])
        prev = np.concatenate([d[:-1, BW] for d, _ in runs])
        # A one-step misalignment gives about 0.1 here; the true expectation about 0.01.
        assert abs(np.corrcoef(resid, prev)[0, 1]) < 0.04

    def test_oracle_tracks_congestion(self) -> None:
        """After a congested step the oracle expects lower bandwidth than after a normal one."""
        data, oracle = generate("internet", 20000, seed=5)
        bw = data[:, BW]
        low = bw[:-1] < np.quantile(bw, 0.1)
        high = bw[:-1] > np.quantile(bw, 0.9)
        assert oracle[1:][low].mean() < oracle[1:][high].mean()


class TestSyntheticTraces:
    def test_default_set(self) -> None:
        """Defaults give 20 traces per profile and at least the origin's 10,000 samples."""
        traces = synthetic_traces(seed=0)
        assert len(traces) == 40
        assert sum(len(t) for t in traces) >= 10_000
        sources = [t.source for t in traces]
        assert sources.count("synthetic_datacenter") == sources.count("synthetic_internet") == 20
        assert len({t.name for t in traces}) == 40
        for t in traces:
            assert t.group == t.name and t.step_s == 1.0
            assert t.measured == FEATURES
            assert t.oracle_next_bw is not None and t.oracle_next_bw.shape == (len(t),)

    def test_seeded(self) -> None:
        """Same seed, same traces; different seed, different traces."""
        a = synthetic_traces(seed=3, n_traces=4, length=50)
        b = synthetic_traces(seed=3, n_traces=4, length=50)
        c = synthetic_traces(seed=4, n_traces=4, length=50)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x.data, y.data)
        assert not np.array_equal(a[0].data, c[0].data)

    def test_traces_differ_within_a_set(self) -> None:
        """Each trace of a set has its own stream."""
        a = synthetic_traces(seed=3, n_traces=4, length=50)
        assert not np.array_equal(a[0].data, a[1].data)

    def test_rejects_too_short(self) -> None:
        """Traces shorter than one window plus target are refused."""
        with pytest.raises(ValueError, match="length"):
            synthetic_traces(seed=0, n_traces=2, length=10)
