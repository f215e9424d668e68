"""Replay of real trace files into a running daemon, scored live."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from bwpredd.replay import ReplayError, peer_id_for, replay
from tests.helpers import running_server

TRACES = Path(os.environ.get("BWPRED_TRACES", Path(__file__).parents[3] / "shared" / "traces"))
OBOE = TRACES / "oboe" / "oboe_trace_0.txt.gz"


def _need_traces() -> None:
    if not OBOE.exists():
        pytest.skip(f"no real trace at {OBOE} (set BWPRED_TRACES)")


class TestPeerIds:
    def test_ids_are_valid_and_unique(self) -> None:
        """Odd characters are replaced; long names keep a unique hashed tail."""
        assert peer_id_for("oboe/a b#(x, y).txt") == "replay/oboe/a_b__x__y_.txt"
        long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
        a, b = peer_id_for(long_a), peer_id_for(long_b)
        assert len(a) <= 128 and len(b) <= 128 and a != b
        assert a.startswith("replay/") and a.endswith("a")


class TestReplay:
    def test_real_trace_counts_and_finite_metrics(self, tmp_path: Path) -> None:
        """One oboe trace: every sample sent, every later one scored, finite metrics."""
        _need_traces()
        from trainer.data.traces import load_traces

        (trace,) = load_traces(OBOE).traces
        n = len(trace)
        plot = tmp_path / "replay.png"
        with running_server(tmp_path) as (_, client):
            report = replay(client, [OBOE], speedup=None, progress=True, plot=plot)
            peer = client.peer(report.files[0].peer_id)
        (f,) = report.files
        assert f.samples == n and f.rejected == 0
        assert peer.sample_count == n
        for p in ("daemon", "last_value", "ewma"):
            s = f.scores[p]
            assert s.steps == n - 1
            assert math.isfinite(s.mae) and s.mae >= 0
            assert math.isfinite(s.nmae) and 0 <= s.within10 <= 1
            assert report.overall[p].steps == n - 1
            assert report.overall[p].mae == pytest.approx(s.mae)
        # Before 10 samples the daemon answers from its cold-start baseline.
        assert f.sources.get("baseline_cold_start") == 9
        assert sum(f.sources.values()) == n - 1
        assert 0 <= f.coverage <= 1
        # The local last-value baseline is exactly the previous actual.
        bw = trace.data[:, 1].astype(np.float64)
        want = float(np.mean(np.abs(bw[1:] - bw[:-1])))
        assert f.scores["last_value"].mae == pytest.approx(want, rel=1e-5)
        assert plot.stat().st_size > 1000
        assert "overall (1 traces)" in report.table()
        assert report.to_json()["files"][0]["samples"] == n

    def test_speedup_sleeps_between_samples(self, tmp_path: Path) -> None:
        """At a huge speed-up a trace still replays, and bad speed-ups fail."""
        _need_traces()
        with running_server(tmp_path) as (_, client):
            report = replay(client, [OBOE], speedup=1e6, prefix="fast/")
            assert report.files[0].peer_id.startswith("fast/")
            with pytest.raises(ReplayError, match="speedup"):
                replay(client, [OBOE], speedup=0.0)

    def test_no_traces_is_an_error(self, tmp_path: Path) -> None:
        """A directory holding no trace raises ReplayError, a missing path OSError."""
        (tmp_path / "empty").mkdir()
        with running_server(tmp_path) as (_, client):
            with pytest.raises(ReplayError, match="no traces"):
                replay(client, [tmp_path / "empty"])
            with pytest.raises(FileNotFoundError):
                replay(client, [tmp_path / "missing"])
