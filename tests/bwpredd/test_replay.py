"""Replay of real trace files into a running daemon, scored live."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bwpredd import ctl
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
        from bwpredd.traces import load_traces

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

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
    def test_plot_through_planted_link_refused(self, tmp_path: Path) -> None:
        """--plot into a directory another user owns (as the service's user
        owns /var/lib/bwpredd), where they planted a link at the plot's
        name: refused, naming the path, and the link's target untouched."""
        _need_traces()
        state = tmp_path / "var-lib-bwpredd"
        state.mkdir()
        os.chown(state, 65534, 65534)
        victim = tmp_path / "victim"
        victim.write_text("precious")
        plot = state / "replay.png"
        plot.symlink_to(victim)
        os.lchown(plot, 65534, 65534)
        with (
            running_server(tmp_path) as (_, client),
            pytest.raises(ReplayError, match=r"--plot .*owned by uid 65534"),
        ):
            replay(client, [OBOE], speedup=None, plot=plot)
        assert victim.read_text() == "precious"

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


class TestSingleCsvFile:
    """``bwpredctl replay FILE.csv`` on one generic CSV file of one's own."""

    def test_two_column_file_replayed(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A file with only time_s and bandwidth_mbps, and one with the full
        header whose rows stop after the bandwidth, are each replayed whole."""
        short = tmp_path / "short.csv"
        short.write_text("time_s,bandwidth_mbps\n" + "".join(f"{i},{50 + i}\n" for i in range(12)))
        full = tmp_path / "full.csv"
        full.write_text(
            "time_s,bandwidth_mbps,latency_ms,packet_loss,reliability\n"
            + "".join(f"{i},{80 + i}\n" for i in range(5))
        )
        with running_server(tmp_path) as (server, client):
            for path, n in ((short, 12), (full, 5)):
                args = ["--target", server.address, "--json", "replay", "--no-progress"]
                assert ctl.main([*args, str(path)]) == 0
                report: dict[str, Any] = _json_line(capsys.readouterr().out)
                (f,) = report["files"]
                assert f["samples"] == n and f["rejected"] == 0
                assert client.peer(f["peer_id"]).sample_count == n

    def test_unrecognised_file_says_why(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A CSV that is not a trace (bwpredctl push's format) or has a bad
        cell fails with exit 2 and one line naming the file and why."""
        push = tmp_path / "push.csv"
        push.write_text("peer_id,bandwidth_mbps\na,1\na,2\n")
        bad = tmp_path / "bad.csv"
        bad.write_text("time_s,bandwidth_mbps\n0,1\n1,2\n2,fast\n")
        with running_server(tmp_path) as (server, _):
            for path, why in (
                (push, "starts with the header time_s,bandwidth_mbps"),
                (bad, "line 4: bandwidth_mbps: not a number: 'fast'"),
            ):
                args = ["--target", server.address, "replay", "--no-progress", str(path)]
                assert ctl.main(args) == 2
                err = capsys.readouterr().err
                assert len(err.splitlines()) == 1, err
                assert err.startswith(f"bwpredctl: no traces found in {path} (")
                assert path.name in err.split("(", 1)[1] and why in err, err


def _json_line(out: str) -> dict[str, Any]:
    import json

    line = next(x for x in out.splitlines() if x.startswith("{"))
    data: dict[str, Any] = json.loads(line)
    return data
