"""WindowStore: ring order, carry-forward, time order, eviction, gather, snapshots."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bwpredd.windows import SNAPSHOT_OVERSIZE, WindowStore

NAN = math.nan
DEFAULTS = [50.0, 0.0, 0.0, 1.0]


def rows(*values: tuple[float, float, float, float]) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def push(store: WindowStore, peer: str, bws: list[float], t0: float = 0.0) -> None:
    n = len(bws)
    data = np.full((n, 4), NAN)
    data[:, 1] = bws
    store.ingest([peer] * n, data, np.arange(n, dtype=np.float64) + t0, now=t0 + n)


class TestRing:
    """Ring buffer order and counts."""

    def test_keeps_newest_ten_in_order(self) -> None:
        """After 13 samples the window holds samples 3..12, oldest first."""
        store = WindowStore(4, DEFAULTS)
        push(store, "a", [float(i) for i in range(13)])
        view = store.view("a")
        assert view is not None
        assert view.window[:, 1].tolist() == [float(i) for i in range(3, 13)]
        assert view.sample_count == 13
        assert view.timestamps.tolist() == [float(i) for i in range(3, 13)]

    def test_batches_split_anywhere_give_same_window(self) -> None:
        """One batch of 25 and 25 batches of one produce the same window."""
        one, many = WindowStore(2, DEFAULTS), WindowStore(2, DEFAULTS)
        bws = [float(i * 3 % 7) for i in range(25)]
        push(one, "p", bws)
        for i, bw in enumerate(bws):
            push(many, "p", [bw], t0=float(i))
        a, b = one.view("p"), many.view("p")
        assert a is not None and b is not None
        np.testing.assert_array_equal(a.window, b.window)

    def test_interleaved_peers(self) -> None:
        """Samples of several peers in one batch go to their own windows in order."""
        store = WindowStore(3, DEFAULTS)
        ids = ["a", "b", "a", "c", "b", "a"]
        data = np.full((6, 4), NAN)
        data[:, 1] = [1, 10, 2, 100, 20, 3]
        res = store.ingest(ids, data, np.zeros(6), now=1.0)
        assert res.accepted.all()
        for peer, expect in (("a", [1, 2, 3]), ("b", [10, 20]), ("c", [100])):
            v = store.view(peer)
            assert v is not None and v.window[:, 1].tolist() == expect


class TestCarryForward:
    """Missing optional features."""

    def test_defaults_then_carry(self) -> None:
        """A first sample without latency takes the default; later ones carry the last given."""
        store = WindowStore(2, DEFAULTS)
        store.ingest(
            ["a", "a", "a"],
            rows((NAN, 1, NAN, NAN), (7.0, 2, 0.1, NAN), (NAN, 3, NAN, 0.5)),
            np.array([0.0, 1.0, 2.0]),
            now=3.0,
        )
        store.ingest(["a"], rows((NAN, 4, NAN, NAN)), np.array([3.0]), now=4.0)
        v = store.view("a")
        assert v is not None
        assert v.window.tolist() == [
            [50.0, 1, 0.0, 1.0],
            [7.0, 2, pytest.approx(0.1), 1.0],
            [7.0, 3, pytest.approx(0.1), 0.5],
            [7.0, 4, pytest.approx(0.1), 0.5],
        ]


class TestTimeOrder:
    """Samples older than the peer's newest are rejected."""

    def test_out_of_order_rejected_and_nothing_changes(self) -> None:
        """An older timestamp is rejected, in batch or against the store; nothing changes."""
        store = WindowStore(2, DEFAULTS)
        push(store, "a", [1.0, 2.0], t0=10.0)
        before = store.view("a")
        res = store.ingest(
            ["a", "a"], rows((NAN, 9, NAN, NAN), (NAN, 8, NAN, NAN)), np.array([5.0, 20.0]), 30.0
        )
        assert res.accepted.tolist() == [False, True]
        assert res.reasons[0][0] == "timestamp"
        res = store.ingest(
            ["a", "a"], rows((NAN, 7, NAN, NAN), (NAN, 6, NAN, NAN)), np.array([25.0, 21.0]), 31.0
        )
        assert res.accepted.tolist() == [True, False]
        v = store.view("a")
        assert before is not None and v is not None
        assert v.window[:, 1].tolist() == [1.0, 2.0, 8.0, 7.0]

    def test_equal_timestamps_allowed(self) -> None:
        """Two samples with the same timestamp are both kept."""
        store = WindowStore(1, DEFAULTS)
        res = store.ingest(["a", "a"], rows((1, 1, 0, 1), (1, 2, 0, 1)), np.array([1.0, 1.0]), 2.0)
        assert res.accepted.all()


class TestEviction:
    """Capacity, LRU eviction and idle expiry."""

    def test_lru_evicted_at_capacity(self) -> None:
        """A new peer at capacity evicts the least recently seen one."""
        store = WindowStore(2, DEFAULTS)
        push(store, "old", [1.0], t0=0.0)
        push(store, "mid", [1.0], t0=10.0)
        res = store.ingest(["new"], rows((1, 1, 0, 1)), np.array([20.0]), now=30.0)
        assert res.evicted == 1
        assert sorted(store.peer_ids()) == ["mid", "new"]
        assert "old" not in store and store.view("old") is None

    def test_flood_stays_bounded(self) -> None:
        """10,000 new peer ids into a store of 100 keep 100 peers and the newest ones."""
        store = WindowStore(100, DEFAULTS)
        for b in range(100):
            ids = [f"p{b}-{i}" for i in range(100)]
            store.ingest(ids, np.tile([1.0, 1.0, 0.0, 1.0], (100, 1)), np.zeros(100), now=float(b))
        assert len(store) == 100
        assert all(p.startswith("p99-") for p in store.peer_ids())

    def test_batch_larger_than_capacity(self) -> None:
        """More new peers than capacity in one batch: the excess is rejected, nothing crashes."""
        store = WindowStore(3, DEFAULTS)
        ids = [f"x{i}" for i in range(5)]
        res = store.ingest(ids, np.tile([1.0, 1.0, 0.0, 1.0], (5, 1)), np.zeros(5), now=1.0)
        assert int(res.accepted.sum()) == 3 and len(res.reasons) == 2
        assert all(field == "peer_id" for field, _ in res.reasons.values())

    def test_idle_expiry(self) -> None:
        """Peers idle longer than the limit are expired; fresh ones stay."""
        store = WindowStore(4, DEFAULTS)
        push(store, "idle", [1.0], t0=0.0)
        push(store, "fresh", [1.0], t0=100.0)
        assert store.expire_idle(now=150.0, max_idle_s=60.0) == 1
        assert store.peer_ids() == ["fresh"]

    def test_reset_hook_on_reuse(self) -> None:
        """A slot reassigned to a new peer triggers the reset hooks."""
        store = WindowStore(1, DEFAULTS)
        seen: list[list[int]] = []
        store.on_reset(lambda slots: seen.append(slots.tolist()))
        push(store, "a", [1.0])
        push(store, "b", [1.0], t0=5.0)
        assert seen == [[0], [0]]


class TestGather:
    """Vectorised reads."""

    def test_gather_pads_cold_peers(self) -> None:
        """gather returns oldest-first windows, zero padding before a short peer's rows."""
        store = WindowStore(3, DEFAULTS)
        push(store, "full", [float(i) for i in range(12)])
        push(store, "short", [5.0, 6.0])
        slots = np.array([store.slot("short"), store.slot("full")], dtype=np.int64)
        windows, counts = store.gather(slots)
        assert windows.shape == (2, 10, 4) and counts.tolist() == [2, 10]
        assert windows[0, :, 1].tolist() == [0.0] * 8 + [5.0, 6.0]
        assert windows[1, :, 1].tolist() == [float(i) for i in range(2, 12)]


class TestSnapshot:
    """Snapshot and restore."""

    def test_round_trip_drops_old(self) -> None:
        """Restore brings back fresh peers exactly and drops those older than max age."""
        store = WindowStore(4, DEFAULTS)
        push(store, "old", [1.0, 2.0], t0=0.0)
        push(store, "new", [float(i) for i in range(12)], t0=1000.0)
        snap = store.snapshot()
        fresh = WindowStore(4, DEFAULTS)
        assert fresh.restore(snap, now=1100.0, max_age_s=500.0) == 1
        a, b = store.view("new"), fresh.view("new")
        assert a is not None and b is not None
        np.testing.assert_array_equal(a.window, b.window)
        assert a.sample_count == b.sample_count
        push(fresh, "new", [99.0], t0=2000.0)
        v = fresh.view("new")
        assert v is not None and v.window[-1, 1] == 99.0 and v.window[0, 1] == 3.0

    def test_restore_rejects_inconsistent(self) -> None:
        """A snapshot with out-of-range values is refused."""
        store = WindowStore(2, DEFAULTS)
        push(store, "a", [1.0])
        snap = store.snapshot()
        snap["head"] = np.array([42])
        with pytest.raises(ValueError, match="head = total mod 10"):
            WindowStore(2, DEFAULTS).restore(snap, now=1.0, max_age_s=10.0)


class TestRestoreChecks:
    """restore checks a snapshot with the live rules and is all or nothing."""

    def test_failed_restore_changes_nothing(self) -> None:
        """A snapshot that breaks a rule half-way (last_seen longer than
        peer_ids) raises ValueError and leaves the store as it was."""
        src = WindowStore(4, DEFAULTS)
        push(src, "a", [1.0, 2.0], t0=100.0)
        push(src, "b", [3.0], t0=100.0)
        snap = src.snapshot()
        snap["last_seen"] = np.tile(snap["last_seen"], 2)
        store = WindowStore(4, DEFAULTS)
        push(store, "keep", [7.0, 8.0], t0=100.0)
        with pytest.raises(ValueError, match="last_seen"):
            store.restore(snap, now=110.0, max_age_s=100.0)
        assert store.peer_ids() == ["keep"]
        view = store.view("keep")
        assert view is not None and view.window[:, 1].tolist() == [7.0, 8.0]
        push(store, "x", [1.0], t0=200.0)
        push(store, "y", [1.0], t0=200.0)
        push(store, "z", [1.0], t0=200.0)
        assert len(store) == 4

    @pytest.mark.parametrize(
        ("peer_id", "rule"),
        [
            ("a\nb", "1-128 characters"),
            ("", "1-128 characters"),
            ("caf\u00e9", "1-128 characters"),
            ("a", "duplicate"),
        ],
    )
    def test_peer_ids_follow_the_live_rule(self, peer_id: str, rule: str) -> None:
        """A restored peer id obeys the live peer-id rule and is unique."""
        src = WindowStore(4, DEFAULTS)
        push(src, "a", [1.0], t0=100.0)
        push(src, "b", [1.0], t0=100.0)
        snap = src.snapshot()
        snap["peer_ids"] = np.array(["a", peer_id], dtype="<U128")
        with pytest.raises(ValueError, match=rule):
            WindowStore(4, DEFAULTS).restore(snap, now=110.0, max_age_s=100.0)

    def test_more_peers_than_capacity_keeps_most_recent(self) -> None:
        """A snapshot of more peers than the store holds (max_peers lowered
        since) restores the most recently seen, up to capacity."""
        src = WindowStore(4, DEFAULTS)
        for k, p in enumerate(("a", "b", "c")):
            src.ingest([p], np.array([[5.0, 1.0, 0.0, 1.0]]), np.array([100.0 + k]), now=100.0 + k)
        dst = WindowStore(2, DEFAULTS)
        assert dst.restore(src.snapshot(), now=110.0, max_age_s=100.0) == 2
        assert dst.peer_ids() == ["b", "c"]

    def test_far_more_peers_than_capacity_refused(self) -> None:
        """A snapshot of more than SNAPSHOT_OVERSIZE x capacity peers is
        refused by name before anything is restored."""
        src = WindowStore(16, DEFAULTS)
        for k in range(SNAPSHOT_OVERSIZE * 2 + 1):
            push(src, f"p{k}", [1.0], t0=100.0)
        dst = WindowStore(2, DEFAULTS)
        push(dst, "kept", [1.0], t0=100.0)
        with pytest.raises(ValueError, match="max_peers"):
            dst.restore(src.snapshot(), now=110.0, max_age_s=100.0)
        assert dst.peer_ids() == ["kept"]

    def test_snapshot_max_bytes_bounds_a_full_store(self) -> None:
        """snapshot_max_bytes is at least what a snapshot of SNAPSHOT_OVERSIZE
        times a full store takes on disk, and not much more."""
        import io

        store = WindowStore(50, DEFAULTS)
        for i in range(50):
            push(store, "p" * 128 if i == 0 else f"peer-{i}", [1.0] * 12, t0=100.0)
        buf = io.BytesIO()
        np.savez(buf, **store.snapshot())  # type: ignore[arg-type]
        full = len(buf.getvalue())
        assert SNAPSHOT_OVERSIZE * full <= store.snapshot_max_bytes()
        assert store.snapshot_max_bytes() < SNAPSHOT_OVERSIZE * 2 * full + 65536


class TestOneSample:
    """A request of one sample skips the grouping: the store and what it
    returns are exactly what the batch path gives."""

    def test_same_as_the_batch_path(self) -> None:
        rng = np.random.default_rng(1)
        one = WindowStore(capacity=6, window=10, defaults=DEFAULTS)
        many = WindowStore(capacity=6, window=10, defaults=DEFAULTS)
        peers = [f"p{i}" for i in range(9)]  # more than the capacity: evictions
        t = 0.0
        for step in range(3000):
            peer = str(rng.choice(peers))
            row = rng.uniform(0, 100, (1, 4))
            row[0, 2:] = rng.uniform(0, 1, 2)
            row[rng.random((1, 4)) < 0.3] = NAN
            row[0, 1] = rng.uniform(0, 100)  # bandwidth is required
            t += float(rng.choice([1.0, 0.0, -3.0]))  # equal and out-of-order times too
            ts = np.array([t])
            now = 10.0 + step
            a = one.ingest([peer], row, ts, now)
            keep = np.array([0])
            slots, evicted = many._assign([peer], now)
            accepted = np.zeros(1, dtype=bool)
            out = np.full(1, -1, dtype=np.int64)
            b = many._append_many(keep, slots, row, ts, now, accepted, {}, out, evicted)
            np.testing.assert_array_equal(a.accepted, b.accepted)
            assert a.reasons == b.reasons and a.evicted == b.evicted
            np.testing.assert_array_equal(a.slots, b.slots)
            for name in ("index", "slots", "ts", "rows", "unsent"):
                x, y = getattr(a.stored, name), getattr(b.stored, name)
                assert x.dtype == y.dtype, name
                np.testing.assert_array_equal(x, y, name)
        for name in (
            "_data",
            "_ts",
            "_head",
            "_count",
            "_total",
            "_last_ts",
            "_last_seen",
            "versions",
        ):
            np.testing.assert_array_equal(getattr(one, name), getattr(many, name), name)
        assert one._slots == many._slots
