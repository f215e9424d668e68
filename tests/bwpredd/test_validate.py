"""Sample and peer-id validation rules."""

from __future__ import annotations

import math

import numpy as np
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


class TestCleanBatchCheck:
    """A batch that breaks no rule is checked with every rule at once: it must
    give exactly what the rules one by one give, and every batch that breaks
    one must still get the rule-by-rule reasons."""

    @staticmethod
    def random_batch(rng: np.random.Generator, n: int, p_bad: float) -> SampleBatch:
        from bwpredd.schema import SCHEMA

        values: list[list[float]] = []
        given: list[list[bool]] = []
        for f in SCHEMA:
            v = rng.uniform(f.low, min(f.high, 1e4), n)
            v[rng.random(n) < 0.1] = f.low  # the edges are within the rules
            v[rng.random(n) < 0.1] = f.high
            bad = rng.random(n) < p_bad
            v[bad] = rng.choice([math.nan, math.inf, -math.inf, f.low - 1, f.high * 2], bad.sum())
            values.append(v.tolist())
            given.append((rng.random(n) < (1.0 if f.required else 0.7)).tolist())
        if p_bad:
            given[FEATURES.index("bandwidth_mbps")][int(rng.integers(n))] = bool(rng.random() < 0.5)
        ts = (NOW + rng.uniform(-86_400.0, 300.0, n)).tolist()
        for i in np.flatnonzero(rng.random(n) < 0.3):
            ts[i] = math.nan
        for i in np.flatnonzero(rng.random(n) < p_bad):
            ts[i] = float(rng.choice([NOW + 301.0, NOW - 86_401.0, math.inf]))
        ids = [f"peer-{i}" for i in rng.integers(0, 5, n)]
        if p_bad and rng.random() < 0.3:
            ids[int(rng.integers(n))] = "bad id!"
        nanos = [(int(rng.integers(n)), -1)] if p_bad and rng.random() < 0.2 else []
        return SampleBatch(ids, values, given, ts, nanos)

    def test_same_as_rule_by_rule(self) -> None:
        from bwpredd import validate as v

        rng = np.random.default_rng(0)
        clean = 0
        for round_ in range(600):
            n = int(rng.choice([1, 1, 2, 5, 40]))
            b = self.random_batch(rng, n, 0.0 if round_ % 2 else 0.05)
            now = NOW
            got = validate_batch(b, now, {"peer-1"}, 300.0, 86_400.0)
            values = np.asarray(b.values, dtype=np.float64).reshape(4, n)
            given = np.asarray(b.given, dtype=bool).reshape(4, n)
            ts = np.asarray(b.ts, dtype=np.float64)
            ts = np.where(np.isnan(ts), now, ts)
            id_bad = np.array(
                [p != "peer-1" and v._PEER_RE.fullmatch(p) is None for p in b.peer_ids]
            )
            want = v._rule_by_rule(b, values, given, ts, id_bad, now, 300.0, 86_400.0)
            assert got.reasons == want.reasons
            np.testing.assert_array_equal(got.index, want.index)
            assert got.peer_ids == want.peer_ids
            np.testing.assert_array_equal(got.rows, want.rows)  # NaN where not given
            assert got.rows.flags.c_contiguous
            np.testing.assert_array_equal(got.ts, want.ts)
            clean += not want.reasons
        assert 250 < clean < 600  # both paths were taken
