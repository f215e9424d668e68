"""The soak's parts that decide its verdict, and its daemon's life cycle.

``make soak`` itself runs for minutes and is not part of the suite; these
check the verdicts on hand-made inputs and the soak's daemon (a real
``python -m bwpredd``) through a stop and a restart.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from bench.harness import wait_for_health
from bench.soak.common import KEEP_ACCEPTED, WINDOW, Plan
from bench.soak.faults import SoakDaemon, wait_metric
from bench.soak.run import schedule
from bench.soak.verify import RssTrace, check_peer, rss_verdict
from bwpredd.client import pb
from bwpredd.modeldir import DEFAULT_MODEL_DIR


def _peer(values: list[float], sample_count: int | None = None) -> pb.Peer:
    window = [pb.Sample(peer_id="p", bandwidth_mbps=v) for v in values]
    count = len(values) if sample_count is None else sample_count
    return pb.Peer(peer_id="p", window=window, sample_count=count)


def _track(accepted: list[float], uncertain: list[float] | None = None) -> dict[str, object]:
    return {"accepted": accepted, "uncertain": uncertain or [], "total": len(accepted)}


class TestCheckPeer:
    """What a worker acked against the window the daemon shows."""

    def test_every_acked_value_in_order_is_intact(self) -> None:
        """A window holding exactly the acked values, in order, is intact."""
        acked = [1001.0, 1002.0, 1003.0]
        assert check_peer(_track(acked), _peer(acked)) == ("intact", 0, "")

    def test_a_missing_acked_value_is_lost(self) -> None:
        """An acked value absent from a short window is counted as lost."""
        status, lost, note = check_peer(_track([1001.0, 1002.0, 1003.0]), _peer([1001.0, 1003.0]))
        assert (status, lost) == ("lost", 1) and "1002.0" in note

    def test_only_the_newest_window_must_be_kept(self) -> None:
        """Of more acked values than the window holds, the older ones may go."""
        acked = [1000.0 + k for k in range(1, 16)]
        assert check_peer(_track(acked), _peer(acked[-WINDOW:], 15))[0] == "intact"

    def test_a_value_never_acked_is_lost(self) -> None:
        """A value in the window that no call sent or acked is a phantom."""
        status, _, note = check_peer(_track([1001.0]), _peer([1001.0, 1005.0], 2))
        assert status == "lost" and "never sent" in note

    def test_an_uncertain_value_may_land(self) -> None:
        """A value sent on a failed call may or may not be stored."""
        track = _track([1001.0], uncertain=[1002.0])
        assert check_peer(track, _peer([1001.0, 1002.0]))[0] == "intact"

    def test_out_of_order_is_lost(self) -> None:
        """Acked values stored out of order are a loss."""
        status, _, note = check_peer(_track([1001.0, 1002.0]), _peer([1002.0, 1001.0]))
        assert status == "lost" and "out of order" in note

    def test_missing_peers(self) -> None:
        """A missing peer was evicted if anything was acked, else never there."""
        assert check_peer(_track([1001.0]), None)[0] == "evicted"
        assert check_peer(_track([]), None)[0] == "never"
        assert KEEP_ACCEPTED > WINDOW


class TestScheduleAndMemory:
    """When faults happen, and the memory verdict."""

    def test_faults_between_warmup_and_the_end(self) -> None:
        """Faults start after the warm-up, end 15 s before the end, are in
        time order, and include one SIGTERM restart per ~10 minutes."""
        plan = Plan(minutes=20)
        times = schedule(plan)
        assert times == sorted(times)
        assert all(plan.warmup_s <= t < plan.seconds - 15 for t, _ in times)
        assert sum(kind == "restart" for _, kind in times) == 2
        assert {"vandal", "sighup", "flood", "corrupt"} <= {kind for _, kind in times}

    def test_rss_growth_and_verdict(self) -> None:
        """A steady rise of 2 KiB/s on ~100 MiB reads as that slope (about
        7 %/h); the verdict is FAILED over the 5 %/h target on a window of 5
        minutes or more, ok under it, otherwise inconclusive."""
        trace = RssTrace([(float(t), 7, 100_000 + 2 * t) for t in range(0, 600, 10)])
        growth = trace.growth(warmup_s=60, started={7: 0.0})
        assert growth["pid"] == 7 and growth["slope_kib_per_s"] == pytest.approx(2.0)
        assert growth["window_s"] == 530.0 and growth["pct_per_hour"] > 5
        assert rss_verdict(growth) == "FAILED"
        flat = RssTrace([(float(t), 7, 100_000) for t in range(0, 600, 10)])
        assert rss_verdict(flat.growth(60, {7: 0.0})) == "ok"
        short = {"pct_per_hour_low": 6.0, "pct_per_hour_high": 9.0, "window_s": 100.0}
        assert rss_verdict(short) == "inconclusive"


@pytest.mark.slow
class TestSoakDaemon:
    """The soak's daemon through a stop and a restart."""

    def test_lifetimes_are_recorded_and_windows_restored(self, tmp_path: Path) -> None:
        """A SIGTERM stop exits 0 and records the lifetime's last scrape; the
        restarted daemon restores the windows from its state directory."""
        shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "model")
        daemon = SoakDaemon(Plan(minutes=1, workers=1, peers_per_worker=1), tmp_path)
        try:
            assert daemon.start() > 0
            with wait_for_health(daemon.address) as client:
                ack = client.push([pb.Sample(peer_id="soak-p", bandwidth_mbps=5.0)])
            assert ack.accepted == 1
            assert wait_metric(daemon, "bwpredd_samples_accepted_total{}", 0.0)
            code, _ = daemon.stop(signal.SIGTERM)
            assert code == 0 and len(daemon.lifetimes) == 1
            assert daemon.totals("bwpredd_samples_accepted_total") == {
                "bwpredd_samples_accepted_total{}": 1.0
            }
            daemon.start()
            assert daemon.metric("bwpredd_peers{}") == 1.0
        finally:
            daemon.stop()
