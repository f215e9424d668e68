"""Tests for bwpredd.traces reading a daemon's recordings (format 1), written
here with plain numpy.savez."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from bwpredd.schema import BW, FEATURES, LAT, LOSS, REL, WIDTH
from bwpredd.traces import GAP_FACTOR, load_traces
from tests.recording_files import ALL_SENT, write_mesh, write_recording

T0 = 1.7e9


def _rows(n: int, seed: int) -> np.ndarray:
    """``[n, 4]`` distinct feature rows (bandwidth 10, 11, ... plus the seed)."""
    out = np.zeros((n, WIDTH), np.float32)
    out[:, BW] = 10.0 + np.arange(n) + 1000 * seed
    out[:, LAT] = 5.0 + seed
    out[:, LOSS] = 0.01 * seed
    out[:, REL] = 1.0 - 0.01 * seed
    return out


class TestOneNode:
    """A node's recordings directory: one trace per peer."""

    def test_peers_in_time_order_across_files(self, tmp_path: Path) -> None:
        """Two peers interleaved over two files give one trace each, rows in
        time order, features exactly as recorded, times from the file."""
        rec = tmp_path / "recordings"
        a, b = _rows(30, 0), _rows(30, 1)
        t = T0 + np.arange(30, dtype=np.float64)
        for lo, hi in ((0, 15), (15, 30)):
            peers = ["peer-a", "peer-b"] * (hi - lo)
            times = np.repeat(t[lo:hi], 2) + np.tile([0.0, 0.5], hi - lo)
            feats = np.stack([a[lo:hi], b[lo:hi]], axis=1).reshape(-1, WIDTH)
            write_recording(rec, "node-1", peers, times, feats)
        res = load_traces(rec)
        assert res.skipped == {} and res.unknown == []
        by_name = {tr.name: tr for tr in res.traces}
        assert sorted(by_name) == ["node-1/peer-a", "node-1/peer-b"]
        for name, want, shift in (("node-1/peer-a", a, 0.0), ("node-1/peer-b", b, 0.5)):
            tr = by_name[name]
            assert tr.source == "recordings:node-1"
            assert tr.group == name
            np.testing.assert_array_equal(tr.data, want)
            assert tr.start_s == pytest.approx(T0 + shift)
            assert tr.time_s is not None
            np.testing.assert_allclose(tr.time_s, np.arange(30.0))
            assert tr.step_s == pytest.approx(1.0)
            assert tr.measured == FEATURES

    def test_carried_forward_features_and_sent_bits(self, tmp_path: Path) -> None:
        """Latency that the worker sent once and the daemon carried forward
        reads as recorded; a feature never sent is not ``measured``."""
        feats = _rows(20, 0)
        feats[:, LAT] = 7.5  # sent on row 0, carried forward after
        sent = np.full(20, 1 << BW, np.uint8)
        sent[0] |= 1 << LAT
        write_recording(tmp_path, "n", ["p"] * 20, T0 + np.arange(20.0), feats, sent=sent)
        (tr,) = load_traces(tmp_path).traces
        np.testing.assert_array_equal(tr.data[:, LAT], 7.5)
        assert tr.measured == ("latency_ms", "bandwidth_mbps")

    def test_out_of_order_files_are_sorted_by_time(self, tmp_path: Path) -> None:
        """A peer's rows are put in time order even when a file holds older
        rows than the one named before it."""
        feats = _rows(24, 0)
        t = T0 + np.arange(24.0)
        write_recording(tmp_path, "n", ["p"] * 12, t[12:], feats[12:])
        write_recording(tmp_path, "n", ["p"] * 12, t[:12], feats[:12], compressed=True)
        (tr,) = load_traces(tmp_path).traces
        np.testing.assert_array_equal(tr.data[:, BW], feats[:, BW])

    def test_gap_splits_segments(self, tmp_path: Path) -> None:
        """A step longer than GAP_FACTOR x the median starts a new segment of
        the same group; a segment too short for a window is skipped."""
        t = np.concatenate(
            [
                np.arange(15.0),
                15 + GAP_FACTOR + 1 + np.arange(20.0),
                100 + np.arange(5.0),
            ]
        )
        write_recording(tmp_path, "n", ["p"] * len(t), T0 + t, _rows(len(t), 0))
        res = load_traces(tmp_path)
        assert [tr.name for tr in res.traces] == ["n/p#0", "n/p#1"]
        assert {tr.group for tr in res.traces} == {"n/p"}
        assert [len(tr) for tr in res.traces] == [15, 20]
        assert res.traces[1].start_s == pytest.approx(T0 + 15 + GAP_FACTOR + 1)
        np.testing.assert_array_equal(res.traces[1].data[:, BW], 10.0 + np.arange(15, 35))
        assert "too short" in res.skipped["n/p#2"]

    def test_steps_within_the_factor_stay_one_trace(self, tmp_path: Path) -> None:
        """Jitter and a pause of less than GAP_FACTOR steps do not cut."""
        t = np.arange(30.0)
        t[15:] += GAP_FACTOR - 1.5
        write_recording(tmp_path, "n", ["p"] * 30, T0 + t, _rows(30, 0))
        (tr,) = load_traces(tmp_path).traces
        assert tr.name == "n/p" and len(tr) == 30


class TestFleet:
    """Several nodes' recordings side by side."""

    def test_two_nodes_side_by_side(self, tmp_path: Path) -> None:
        """fleet/node-a/recordings/*.npz and fleet/node-b/*.npz: one source
        per node, each node's peers its own traces."""
        write_mesh(tmp_path / "fleet", ("node-a",), peers=2, steps=40)
        t = T0 + np.arange(40.0)
        write_recording(tmp_path / "fleet" / "node-b", "node-b", ["x"] * 40, t, _rows(40, 2))
        res = load_traces(tmp_path / "fleet")
        got = sorted((tr.source, tr.name) for tr in res.traces)
        assert got == [
            ("recordings:node-a", "node-a/node-a-peer-0"),
            ("recordings:node-a", "node-a/node-a-peer-1"),
            ("recordings:node-b", "node-b/x"),
        ]
        only_a = load_traces(tmp_path / "fleet" / "node-a" / "recordings")
        assert {tr.source for tr in only_a.traces} == {"recordings:node-a"}

    def test_one_name_in_two_directories_is_two_nodes(self, tmp_path: Path) -> None:
        """Two machines that both call themselves "host" are never interleaved."""
        t = T0 + np.arange(20.0)
        write_recording(tmp_path / "m1", "host", ["p"] * 20, t, _rows(20, 0))
        write_recording(tmp_path / "m2", "host", ["p"] * 20, t, _rows(20, 1))
        with pytest.warns(RuntimeWarning, match="'host' in 2 directories"):
            res = load_traces(tmp_path)
        assert sorted(tr.name for tr in res.traces) == ["host@m1/p", "host@m2/p"]
        assert all(len(tr) == 20 for tr in res.traces)


class TestBadFiles:
    """Files a reader must skip, loudly, without losing the others."""

    def test_torn_file_skipped_with_warning(self, tmp_path: Path) -> None:
        """A truncated last file is skipped with a warning naming it; the
        earlier file still reads; temporaries (dot names) are not read."""
        t = T0 + np.arange(40.0)
        write_recording(tmp_path, "n", ["p"] * 20, t[:20], _rows(20, 0))
        last = write_recording(tmp_path, "n", ["p"] * 20, t[20:], _rows(20, 0)[::-1])
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
        (tmp_path / ".rec-tmp-12345678.npz").write_bytes(b"partial")
        with pytest.warns(RuntimeWarning, match=last.name):
            res = load_traces(tmp_path)
        assert list(res.skipped) == [last.name]
        assert res.unknown == []
        (tr,) = res.traces
        assert len(tr) == 20

    @pytest.mark.parametrize(
        ("change", "reason"),
        [
            ({"version": np.int64(2)}, "version: expected 1, got 2"),
            ({"features": np.zeros((5, 3), np.float32)}, "features: expected float32 (5, 4)"),
            ({"peer": np.zeros(5)}, "peer: expected a unicode array"),
        ],
    )
    def test_wrong_columns_named(self, tmp_path: Path, change: dict, reason: str) -> None:
        """A file of another version or with a misshapen column is skipped
        with the rule it breaks."""
        cols = {
            "version": np.int64(1),
            "node": np.str_("n"),
            "peer": np.asarray(["p"] * 5),
            "t": T0 + np.arange(5.0),
            "features": _rows(5, 0),
            "sent": np.full(5, ALL_SENT, np.uint8),
        }
        np.savez(tmp_path / "rec-000000000000001-0a0b0c0d.npz", **{**cols, **change})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = load_traces(tmp_path)
        assert res.traces == []
        assert reason in res.skipped["rec-000000000000001-0a0b0c0d.npz"]
