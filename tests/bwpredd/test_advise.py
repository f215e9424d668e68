"""Transfer advice: modes, times, streams, buffers, compression, confidence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bwpredd.advise import (
    DEFAULT_CODEC_TABLE,
    Advice,
    CodecTable,
    advise,
    advise_many,
    network_mode,
    rank,
)
from bwpredd.errors import InvalidArgument

GIB = 1 << 30
DC = (9500.0, 9000.0, 10000.0, 0.4)  # point, low, high, RTT ms
NET = (90.0, 70.0, 110.0, 80.0)


def dc(payload: int = GIB, **kw: object) -> Advice:
    return advise(*DC, payload, **kw)  # type: ignore[arg-type]


def net(payload: int = GIB, **kw: object) -> Advice:
    return advise(*NET, payload, **kw)  # type: ignore[arg-type]


class TestCodecTable:
    def test_shipped_table_loads_with_machine_and_every_kind(self) -> None:
        """The shipped table names its machine and has none + lz4 + zstd rows."""
        t = CodecTable.load()
        assert t.machine["cpu"]
        assert t.measured_at
        assert t.codecs[0] == ("none", 0)
        assert ("lz4", 0) in t.codecs
        assert {("zstd", 1), ("zstd", 3), ("zstd", 9)} <= set(t.codecs)
        for kind in ("memory", "text", "random"):
            assert t.ratio[kind].shape == (len(t.codecs),)
            assert (t.ratio[kind][1:] > 0).all()

    def test_measured_ratios_are_plausible(self) -> None:
        """Text and memory compress; random does not; zstd 9 beats lz4."""
        t = CodecTable.load()
        z9, lz4 = t.codecs.index(("zstd", 9)), t.codecs.index(("lz4", 0))
        for kind in ("memory", "text"):
            assert t.ratio[kind][z9] < t.ratio[kind][lz4] < 0.8
        assert t.ratio["random"][1:].min() > 0.99

    def test_rejects_other_formats(self, tmp_path: Path) -> None:
        """A file that is not format 1 is refused."""
        raw = json.loads(DEFAULT_CODEC_TABLE.read_text())
        raw["format"] = 2
        (tmp_path / "c.json").write_text(json.dumps(raw))
        with pytest.raises(ValueError, match="format 1"):
            CodecTable.load(tmp_path / "c.json")


class TestNetworkMode:
    def test_datacenter_and_internet_peers(self) -> None:
        """0.4 ms at 9.5 Gbit/s is datacenter; 80 ms at 90 Mbit/s is internet."""
        assert dc().network_mode == "datacenter"
        assert net().network_mode == "internet"

    def test_thresholds(self) -> None:
        """The documented thresholds, and unknown between them."""
        assert network_mode(1000, 2.0) == "datacenter"
        assert network_mode(999, 1.0) == "unknown"
        assert network_mode(5000, 5.0) == "unknown"
        assert network_mode(5000, 10.0) == "internet"
        assert network_mode(50, 0.1) == "internet"
        assert network_mode(5000, None) == "unknown"
        assert network_mode(5000, math.nan) == "unknown"

    def test_missing_latency_uses_the_assumed_rtt(self) -> None:
        """No latency: mode unknown, 50 ms used for the BDP."""
        a = advise(5000, 4000, 6000, None, GIB)
        assert a.network_mode == "unknown"
        assert a.latency_ms == 50.0


class TestTransferTime:
    def test_proportional_to_payload_over_bandwidth(self) -> None:
        """Incompressible data: time - RTT equals payload / bandwidth."""
        for point, low, high, rtt in (DC, NET):
            for payload in (1 << 20, GIB, 8 * GIB):
                a = advise(point, low, high, rtt, payload, data_kind="random")
                assert a.codec == "none"
                want = payload * 8 / (point * 1e6)
                assert a.transfer_seconds - rtt / 1e3 == pytest.approx(want, rel=1e-9)
                assert a.transfer_seconds_low - rtt / 1e3 == pytest.approx(
                    payload * 8 / (high * 1e6), rel=1e-9
                )
                assert a.transfer_seconds_high - rtt / 1e3 == pytest.approx(
                    payload * 8 / (low * 1e6), rel=1e-9
                )

    def test_doubling_payload_doubles_time(self) -> None:
        """Time grows linearly with payload whatever the codec."""
        a, b = net(GIB, data_kind="memory"), net(2 * GIB, data_kind="memory")
        rtt = NET[3] / 1e3
        assert (b.transfer_seconds - rtt) == pytest.approx(2 * (a.transfer_seconds - rtt))

    def test_interval_orders_times(self) -> None:
        """Faster at the interval's high end, slower at its low end."""
        a = net()
        assert a.transfer_seconds_low < a.transfer_seconds < a.transfer_seconds_high

    def test_outage_stays_finite(self) -> None:
        """A zero forecast is floored: times are finite and huge."""
        a = advise(0.0, 0.0, 0.0, 30.0, GIB, data_kind="random")
        assert math.isfinite(a.transfer_seconds)
        assert a.transfer_seconds > 1e6
        assert a.network_mode == "internet"


class TestStreamsAndBuffers:
    def test_more_streams_and_larger_buffer_where_bdp_is_larger(self) -> None:
        """The internet peer's BDP (900 kB) exceeds the datacenter's (475 kB)."""
        a, b = dc(), net()
        assert b.bdp_bytes > a.bdp_bytes
        assert b.parallel_streams > a.parallel_streams
        assert b.socket_buffer_bytes > a.socket_buffer_bytes

    def test_rule_values(self) -> None:
        """Streams = ceil(BDP / 512 KiB); buffer = 2 x BDP in 4 KiB pages."""
        assert dc().parallel_streams == 1
        assert net().parallel_streams == 2
        assert dc().socket_buffer_bytes == math.ceil(2 * 475_000 / 4096) * 4096
        assert net().socket_buffer_bytes == math.ceil(2 * 900_000 / 4096) * 4096

    def test_monotone_and_clamped(self) -> None:
        """Streams and buffers never shrink as BDP grows, within the clamps."""
        prev = advise(1.0, 1.0, 1.0, 0.1, GIB)
        assert prev.parallel_streams == 1
        assert prev.socket_buffer_bytes == 64 * 1024
        for bw in (10.0, 100.0, 1e3, 1e4, 1e5):
            cur = advise(bw, bw, bw, 100.0, GIB)
            assert cur.parallel_streams >= prev.parallel_streams
            assert cur.socket_buffer_bytes >= prev.socket_buffer_bytes
            prev = cur
        assert prev.parallel_streams == 16
        assert prev.socket_buffer_bytes == 64 * 1024 * 1024

    def test_loss_adds_streams(self) -> None:
        """A lossy long path gets the Mathis bound's streams."""
        clean = net(packet_loss=None)
        lossy = net(packet_loss=1e-3)
        # One stream at 80 ms and 0.1% loss carries ~5.6 Mbit/s: 90 needs 17 -> 16.
        assert lossy.parallel_streams == 16 > clean.parallel_streams


class TestCompression:
    def test_strong_codec_on_slow_link_none_on_fast(self) -> None:
        """Memory pages: zstd on 90 Mbit/s, none or lz4 at 9.5 Gbit/s."""
        slow, fast = net(data_kind="memory"), dc(data_kind="memory")
        assert slow.codec == "zstd" and slow.level >= 3
        assert slow.ratio < 0.5
        assert fast.codec in ("none", "lz4")

    def test_random_data_is_never_compressed(self) -> None:
        """Incompressible data goes uncompressed on any link."""
        for bw in (1.0, 90.0, 9500.0):
            assert advise(bw, bw, bw, 10.0, GIB, data_kind="random").codec == "none"

    def test_choice_minimises_the_time(self) -> None:
        """The chosen codec is at least as fast as sending uncompressed."""
        for bw in (1.0, 10.0, 100.0, 1e3, 1e4):
            a = advise(bw, bw, bw, 1.0, GIB, data_kind="text")
            plain = advise(bw, bw, bw, 1.0, GIB, data_kind="random")
            assert a.transfer_seconds <= plain.transfer_seconds + 1e-12

    def test_zstd_19_never_wins_from_20_mbps(self) -> None:
        """Level 19 is measured but too slow to be chosen from 20 Mbit/s up."""
        for bw in (20.0, 100.0, 1e3):
            assert advise(bw, bw, bw, 1.0, GIB, data_kind="memory").level != 19

    def test_compressibility_hint_scales_ratios(self) -> None:
        """An incompressible hint turns compression off; a good one turns it on."""
        assert net(data_kind="memory", compressibility=1.0).codec == "none"
        hinted = net(data_kind="random", compressibility=0.2)
        assert hinted.codec != "none"
        assert hinted.ratio <= 0.2 + 1e-9
        z3 = advise(5.0, 5.0, 5.0, 80.0, GIB, data_kind="text", compressibility=0.5)
        assert z3.ratio <= 0.5

    def test_bad_arguments(self) -> None:
        """Bad hints, kinds and payloads raise InvalidArgument."""
        with pytest.raises(InvalidArgument, match="compressibility"):
            net(compressibility=0.0)
        with pytest.raises(InvalidArgument, match="data_kind"):
            net(data_kind="video")
        with pytest.raises(InvalidArgument, match="payload_bytes"):
            net(payload=-1)


class TestConfidence:
    def test_in_unit_interval_and_lower_for_wider_intervals(self) -> None:
        """Confidence falls as the interval widens, always within [0, 1]."""
        prev = 2.0
        for half in (0.0, 1.0, 10.0, 45.0, 90.0, 1e4):
            c = advise(100.0, 100.0 - min(half, 100.0), 100.0 + half, 20.0, GIB).confidence
            assert 0.0 <= c <= 1.0
            assert c < prev or half == 0.0
            prev = c

    def test_lower_for_larger_live_error(self) -> None:
        """A larger live error lowers confidence; unscored sits between."""
        good = net(live_error_ratio=0.02).confidence
        bad = net(live_error_ratio=0.5).confidence
        unscored = net().confidence
        assert good > unscored > bad

    def test_formula(self) -> None:
        """exp(-relative width) x exp(-2 x live error)."""
        a = advise(100.0, 90.0, 110.0, 20.0, GIB, live_error_ratio=0.05)
        assert a.confidence == pytest.approx(math.exp(-0.2) * math.exp(-0.1))


class TestRankAndMany:
    def test_rank_orders_by_transfer_time(self) -> None:
        """The datacenter peer ranks first."""
        many = advise_many(
            ["slow", "fast", "mid"],
            [10.0, 9500.0, 500.0],
            [8.0, 9000.0, 400.0],
            [12.0, 10000.0, 600.0],
            [80.0, 0.4, 5.0],
            payload_bytes=GIB,
        )
        assert [a.peer_id for a in rank(many)] == ["fast", "mid", "slow"]

    def test_many_matches_one_at_a_time(self) -> None:
        """The vectorised path gives the scalar answers, NaN meaning unknown."""
        many = advise_many(
            ["a", "b"],
            [DC[0], NET[0]],
            [DC[1], NET[1]],
            [DC[2], NET[2]],
            [DC[3], math.nan],
            payload_bytes=GIB,
            data_kind="text",
            live_error_ratio=[0.1, math.nan],
        )
        assert many[0] == dc(data_kind="text", live_error_ratio=0.1, peer_id="a")
        assert many[1] == advise(NET[0], NET[1], NET[2], None, GIB, data_kind="text", peer_id="b")
