"""Sample and peer-id validation rules."""

from __future__ import annotations

import math

import pytest

from bwpredd.errors import InvalidArgument
from bwpredd.schema import FEATURES
from bwpredd.validate import SampleBatch, check_peer_ids, validate_batch

NOW = 1_800_000_000.0


def batch(*samples: dict[str, object]) -> SampleBatch:
    """A SampleBatch from dicts; absent optional fields are not given."""

    def col(name: str, default: float = 0.0) -> list[float]:
        return [float(s.get(name, default)) for s in samples]  # type: ignore[arg-type]

    keys = {
        "latency_ms": "lat",
        "bandwidth_mbps": "bw",
        "packet_loss": "loss",
        "reliability": "rel",
    }
    return SampleBatch(
        peer_ids=[str(s.get("peer_id", "p")) for s in samples],
        values=[col(keys[name]) for name in FEATURES],
        given=[[keys[name] in s for s in samples] for name in FEATURES],
        ts=col("ts", math.nan),
    )


def reasons(b: SampleBatch) -> dict[int, tuple[str, str]]:
    return validate_batch(b, NOW, set(), 300.0, 86_400.0).reasons


class TestSampleRules:
    """Each field's rule."""

    @pytest.mark.parametrize(
        ("sample", "field"),
        [
            ({}, "bandwidth_mbps"),
            ({"bw": math.nan}, "bandwidth_mbps"),
            ({"bw": math.inf}, "bandwidth_mbps"),
            ({"bw": -math.inf}, "bandwidth_mbps"),
            ({"bw": -0.1}, "bandwidth_mbps"),
            ({"bw": 1.1e7}, "bandwidth_mbps"),
            ({"bw": 1, "lat": math.nan}, "latency_ms"),
            ({"bw": 1, "lat": math.inf}, "latency_ms"),
            ({"bw": 1, "lat": -1}, "latency_ms"),
            ({"bw": 1, "lat": 600_001}, "latency_ms"),
            ({"bw": 1, "loss": math.nan}, "packet_loss"),
            ({"bw": 1, "loss": 1.5}, "packet_loss"),
            ({"bw": 1, "loss": -0.01}, "packet_loss"),
            ({"bw": 1, "rel": math.inf}, "reliability"),
            ({"bw": 1, "rel": 2}, "reliability"),
            ({"bw": 1, "ts": NOW + 301}, "timestamp"),
            ({"bw": 1, "ts": NOW - 86_401}, "timestamp"),
            ({"bw": 1, "peer_id": ""}, "peer_id"),
            ({"bw": 1, "peer_id": "x" * 129}, "peer_id"),
            ({"bw": 1, "peer_id": "héllo"}, "peer_id"),
            ({"bw": 1, "peer_id": "a b"}, "peer_id"),
            ({"bw": 1, "peer_id": "a\nb"}, "peer_id"),
            ({"bw": 1, "peer_id": "a\x00b"}, "peer_id"),
        ],
    )
    def test_rejects(self, sample: dict[str, object], field: str) -> None:
        """A sample breaking one rule is rejected with that field named in the reason."""
        got = reasons(batch(sample, {"bw": 5.0}))
        assert list(got) == [0]
        assert got[0][0] == field

    def test_accepts_edges(self) -> None:
        """Values on the edges of every rule are accepted."""
        ok = batch(
            {"bw": 0.0, "lat": 0.0, "loss": 0.0, "rel": 0.0, "peer_id": "a"},
            {
                "bw": 1e7,
                "lat": 600_000,
                "loss": 1.0,
                "rel": 1.0,
                "peer_id": "A-z_0.9:@/" + "x" * 118,
            },
            {"bw": 3.0, "ts": NOW + 299},
        )
        valid = validate_batch(ok, NOW, set(), 300.0, 86_400.0)
        assert valid.reasons == {} and valid.index.tolist() == [0, 1, 2]

    def test_rows_mark_absent_as_nan(self) -> None:
        """Optional fields not given are NaN in the rows; untimed samples get the arrival time."""
        valid = validate_batch(batch({"bw": 2.0, "loss": 0.5}), NOW, set(), 300.0, 86_400.0)
        row = valid.rows[0]
        assert math.isnan(row[0]) and row[1] == 2.0 and row[2] == 0.5 and math.isnan(row[3])
        assert valid.ts[0] == NOW


class TestPeerIds:
    """Forecast/Allocate peer lists."""

    def test_duplicates_and_limits(self) -> None:
        """Duplicates, empty lists, bad ids and oversize lists are refused naming the index."""
        with pytest.raises(InvalidArgument, match=r"peer_ids\[2\]: duplicate of peer_ids\[0\]"):
            check_peer_ids(["a", "b", "a"], 10)
        with pytest.raises(InvalidArgument, match="at least one"):
            check_peer_ids([], 10)
        with pytest.raises(InvalidArgument, match=r"peer_ids\[1\]"):
            check_peer_ids(["a", "b c"], 10)
        with pytest.raises(InvalidArgument, match="at most 2"):
            check_peer_ids(["a", "b", "c"], 2)
