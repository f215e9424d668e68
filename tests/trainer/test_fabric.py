"""The datacenter fabric profile make mesh-demo replays."""

from __future__ import annotations

import numpy as np

from bwpredd.schema import BW, LAT, LOSS, REL
from trainer.data.fabric import EFFICIENCY, JOB_STEPS, LINE_RATES_GBPS, fabric_link


def _period(bw: np.ndarray) -> int:
    """The lag (5-8) at which the log bandwidth's autocorrelation peaks."""
    x = np.log(bw) - np.log(bw).mean()
    return max(range(5, 9), key=lambda lag: float(np.dot(x[:-lag], x[lag:])))


class TestFabric:
    def test_seeded(self) -> None:
        """The same seed gives the same link; another seed another link."""
        np.testing.assert_array_equal(fabric_link(3, 200), fabric_link(3, 200))
        assert not np.array_equal(fabric_link(3, 200), fabric_link(4, 200))

    def test_values_a_daemon_accepts(self) -> None:
        """Positive bandwidth below the line rate; loss and reliability in
        [0, 1] and summing to 1; positive latency."""
        for seed in range(20):
            d = fabric_link(seed, 300)
            assert (d[:, BW] > 0).all()
            assert d[:, BW].max() <= max(LINE_RATES_GBPS) * 1000 * EFFICIENCY * 1.1
            assert ((d[:, LOSS] >= 0) & (d[:, LOSS] <= 1)).all()
            np.testing.assert_allclose(d[:, LOSS] + d[:, REL], 1.0, atol=1e-6)
            assert (d[:, LAT] > 0).all()

    def test_the_job_repeats_within_a_window(self) -> None:
        """The periodic job shows: bandwidth drops for JOB_STEPS steps in
        every period of 5-8 s, which the autocorrelation finds."""
        found = []
        for seed in range(10):
            bw = fabric_link(seed, 2000)[:, BW].astype(np.float64)
            p = _period(bw)
            found.append(p)
            x = np.log(bw)
            phase_means = [x[k::p].mean() for k in range(p)]
            low = sorted(phase_means)[:JOB_STEPS]
            high = sorted(phase_means)[JOB_STEPS:]
            assert max(low) < min(high) - 0.3, (seed, p, phase_means)
        assert set(found) <= set(range(5, 9)) and len(set(found)) > 1
