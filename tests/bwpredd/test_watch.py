"""WatchHub: bounded, filtered, latest-value change notification."""

from __future__ import annotations

import asyncio
import time
import tracemalloc

import pytest

from bwpredd.errors import ResourceExhausted
from bwpredd.watch import Watcher, WatchHub


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


class TestBounds:
    def test_consumer_that_never_reads_stays_bounded(self) -> None:
        """100k publishes over 10 peers leave at most 10 pending ids."""
        hub = WatchHub()
        w = hub.subscribe(None)
        peers = [f"p{i}" for i in range(10)]
        for i in range(100_000):
            hub.publish([peers[i % 10]])
            assert w.pending <= 10
        assert w.pending == 10

    def test_max_pending_drops_the_least_recently_changed(self) -> None:
        """Beyond max_pending the oldest change goes, the newest stay."""
        hub = WatchHub(max_pending=3)
        w = hub.subscribe()
        hub.publish(["a", "b", "c"])
        hub.publish(["a"])  # a is now the most recent
        hub.publish(["d"])
        assert w.pending == 3
        assert run(w.next_batch()) == ["c", "a", "d"]

    def test_idle_watchers_cost_nothing_per_publish(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Watchers of every peer that are not waiting (their client does not
        read) are not touched by publish: 5,000 changed peers leave the same
        memory behind with 200 such watchers as with one (the hub's one
        change log), and each then reads every changed peer once."""
        ids = [f"peer-{i:05d}" for i in range(5000)]

        def growth(n: int) -> tuple[int, WatchHub]:
            hub = WatchHub(max_watchers=1000, max_per_peer=1000)
            for _ in range(n):
                hub.subscribe()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            for i in range(0, len(ids), 500):
                hub.publish(ids[i : i + 500])
            grown = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            return grown, hub

        woken: list[Watcher] = []

        def wake(self: Watcher) -> None:
            woken.append(self)

        monkeypatch.setattr(Watcher, "_wake", wake)
        one, _ = growth(1)
        many, hub = growth(200)
        assert woken == []
        assert many < one + 256 * 1024, (one, many)
        assert all(run(w.next_batch()) == ids for w in hub._all)

    def test_waiting_watchers_woken_once_each(self) -> None:
        """A publish wakes each waiting watcher with interest once, and no
        other: a watcher of every peer, and a named watcher of a changed
        peer; not a watcher of another peer."""

        async def main() -> list[list[str]]:
            hub = WatchHub()
            every, named, other = hub.subscribe(), hub.subscribe({"a"}), hub.subscribe({"z"})
            tasks = [asyncio.create_task(w.next_batch()) for w in (every, named, other)]
            await asyncio.sleep(0.01)
            hub.publish(["a", "b", "a"])
            await asyncio.sleep(0.01)
            assert [t.done() for t in tasks] == [True, True, False]
            assert hub._waiting_all == [] and hub._waiting_named == 1
            other.close()
            return [t.result() for t in tasks[:2]] + [await tasks[2]]

        assert run(main()) == [["b", "a"], ["a"], []]

    def test_publish_without_watchers_is_cheap(self) -> None:
        """With nobody watching, publish does no per-id work."""
        hub = WatchHub()
        ids = [f"p{i}" for i in range(10_000)]
        t0 = time.perf_counter()
        for _ in range(10_000):
            hub.publish(ids)
        # 10k calls of a 10k-id batch: per-id work would take seconds.
        assert time.perf_counter() - t0 < 0.5


class TestDelivery:
    def test_wakes_on_publish_with_deduplicated_ids(self) -> None:
        """A waiting watcher wakes with each changed peer once."""

        async def main() -> list[str]:
            hub = WatchHub()
            w = hub.subscribe()
            task = asyncio.create_task(w.next_batch())
            await asyncio.sleep(0.01)
            assert not task.done()
            hub.publish(["x", "y", "x", "x"])
            return await task

        assert run(main()) == ["y", "x"]

    def test_filters_by_peer(self) -> None:
        """A watcher of named peers never sees the others."""

        async def main() -> tuple[list[str], list[str], int]:
            hub = WatchHub()
            only_a = hub.subscribe({"a", "c"})
            every = hub.subscribe(None)
            hub.publish(["b", "a", "d"])
            hub.publish(["b"])
            return await only_a.next_batch(), await every.next_batch(), only_a.pending

        got_a, got_all, left = run(main())
        assert got_a == ["a"]
        assert sorted(got_all) == ["a", "b", "d"]
        assert left == 0

    def test_async_iteration_and_close(self) -> None:
        """``async for`` yields batches and ends when the watcher is closed."""

        async def main() -> list[list[str]]:
            hub = WatchHub()
            w = hub.subscribe(["p"])
            seen: list[list[str]] = []

            async def consume() -> None:
                async for batch in w:
                    seen.append(batch)

            task = asyncio.create_task(consume())
            hub.publish(["p"])
            await asyncio.sleep(0.01)
            hub.publish(["p", "q"])
            await asyncio.sleep(0.01)
            w.close()
            await task
            assert len(hub) == 0
            hub.publish(["p"])  # no watcher left: nothing to deliver
            return seen

        assert run(main()) == [["p"], ["p"]]

    def test_push_seeds_one_watcher(self) -> None:
        """push marks peers for one watcher, within its filter."""
        hub = WatchHub()
        a, b = hub.subscribe({"p"}), hub.subscribe()
        a.push(["p", "q"])
        assert a.pending == 1 and b.pending == 0

    def test_hub_close_ends_every_stream(self) -> None:
        """Closing the hub wakes every waiter with an empty batch."""

        async def main() -> list[list[str]]:
            hub = WatchHub()
            ws = [hub.subscribe(), hub.subscribe({"a"})]
            tasks = [asyncio.create_task(w.next_batch()) for w in ws]
            await asyncio.sleep(0.01)
            hub.close()
            assert len(hub) == 0
            return list(await asyncio.gather(*tasks))

        assert run(main()) == [[], []]

    def test_rejects_a_zero_bound(self) -> None:
        """max_pending, max_watchers and max_per_peer must be positive."""
        for name in ("max_pending", "max_watchers", "max_per_peer"):
            with pytest.raises(ValueError, match=name):
                WatchHub(**{name: 0})


class TestLimits:
    """max_watchers and max_per_peer."""

    def test_max_watchers(self) -> None:
        """Past max_watchers a subscription is refused naming the limit; a
        closed watcher frees its place."""
        hub = WatchHub(max_watchers=2)
        first, _ = hub.subscribe(["a"]), hub.subscribe()
        with pytest.raises(ResourceExhausted, match=r"^max_watchers: 2 WatchForecasts streams"):
            hub.subscribe(["b"])
        first.close()
        assert hub.subscribe(["b"]).peers == frozenset({"b"})

    def test_watchers_of_every_peer_count_for_each_peer(self) -> None:
        """With max_per_peer 2: two watchers of every peer fill every peer;
        a named watcher and a peer followed twice by name keep further
        watchers of every peer out; other peers stay open to name-watchers."""
        hub = WatchHub(max_per_peer=2)
        every = [hub.subscribe(), hub.subscribe()]
        for peers in (None, ["a"]):
            with pytest.raises(ResourceExhausted, match=r"^max_watchers_per_peer: "):
                hub.subscribe(peers)
        every[0].close()
        named = [hub.subscribe(["a", "b"])]
        with pytest.raises(ResourceExhausted, match="peer 'a' is followed by 2 watchers"):
            hub.subscribe(["c", "a"])
        every[1].close()
        named.append(hub.subscribe(["a"]))
        with pytest.raises(ResourceExhausted, match="a peer is followed by 2 watchers"):
            hub.subscribe()
        assert hub.subscribe(["c"]).peers == frozenset({"c"})
        named[1].close()
        assert hub.subscribe().peers is None
