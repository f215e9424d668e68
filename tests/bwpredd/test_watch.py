"""WatchHub: bounded, filtered, latest-value change notification."""

from __future__ import annotations

import asyncio
import time

import pytest

from bwpredd.watch import WatchHub


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
        """max_pending must be positive."""
        with pytest.raises(ValueError, match="max_pending"):
            WatchHub(max_pending=0)
