"""WatchHub: tell WatchForecasts streams which peers changed, never queueing.

One job. Ingest calls :meth:`WatchHub.publish` with the peers whose windows
changed; each :class:`Watcher` (one per WatchForecasts call) asks the hub,
when it wakes, which of its peers changed since it last asked, and the
servicer computes the *current* forecast of each, so a slow consumer simply
gets the latest value per peer: nothing accumulates per sample.

The hub keeps one change log for all watchers: peer id -> the publish it
last changed in, in change order. A watcher holds only its position in that
log (a cursor) and a flag saying whether it is waiting for news. So a
watcher that is busy, or blocked on a client that does not read, costs
ingest nothing, however many samples arrive: :meth:`publish` writes the log
(O(batch) once, whatever the number of watchers) and wakes only the waiting
watchers with interest (each once). Reading costs the watcher
O(min(changes since its cursor, peers it watches)).

Bounds: the log holds at most ``max_pending`` peers (set it to the
WindowStore's capacity); past that the least recently changed entry is
dropped: with ``capacity + 1`` distinct peers changed since, the least
recent of them has ``capacity`` more recently seen peers, so LRU eviction
has already forgotten it and its forecast could not be answered anyway.
At most ``max_watchers`` watchers are open, and at most ``max_per_peer``
follow any one peer, a watcher of every peer counting for each: past either,
:meth:`WatchHub.subscribe` raises :class:`ResourceExhausted`.

Everything runs on the event loop's thread: ``publish``, ``subscribe`` and
``close`` must be called there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

from bwpredd.errors import ResourceExhausted

__all__ = ["WatchHub", "Watcher"]


class Watcher:
    """The pending changes of one subscriber; an async iterator of batches.

    Made by :meth:`WatchHub.subscribe`; use ``async for ids in watcher`` or
    :meth:`next_batch`, and :meth:`close` (or ``with watcher:``) at the end.
    """

    def __init__(self, hub: WatchHub, peers: frozenset[str] | None) -> None:
        self.peers = peers
        self._hub = hub
        self._cursor = hub._seq  # changes after this publish are news
        self._seed: list[str] = []  # peers pushed to this watcher alone
        self._event = asyncio.Event()
        self._waiting = False
        self._closed = False

    @property
    def pending(self) -> int:
        """Peers changed since the last batch was taken."""
        if self._closed:
            return 0
        return len({*self._seed, *self._hub._changed_since(self._cursor, self.peers)})

    @property
    def closed(self) -> bool:
        return self._closed

    def push(self, peer_ids: Iterable[str]) -> None:
        """Mark peers changed for this watcher only (e.g. every watched peer
        once at subscription, so the stream starts with current values).

        Args:
            peer_ids: ids; those outside the watcher's filter are ignored.
        """
        if self._closed:
            return
        if self.peers is not None:
            peer_ids = [p for p in peer_ids if p in self.peers]
        self._seed.extend(peer_ids)
        if self._seed and self._waiting:
            self._wake()

    def _take(self) -> list[str]:
        hub = self._hub
        changed = hub._changed_since(self._cursor, self.peers)
        self._cursor = hub._seq
        if not self._seed:
            return changed
        seed, self._seed = self._seed, []
        return list(dict.fromkeys([*seed, *changed])) if changed else list(dict.fromkeys(seed))

    def _wake(self) -> None:
        if self._waiting:
            self._waiting = False
            if self.peers is not None:
                self._hub._waiting_named -= 1
        self._event.set()

    async def next_batch(self) -> list[str]:
        """Wait for changes and take them all: each changed peer once, least
        recently changed first. Returns ``[]`` once the watcher is closed."""
        while not self._closed:
            batch = self._take()
            if batch:
                return batch
            self._event.clear()
            self._waiting = True
            self._hub._arm(self)
            await self._event.wait()
        return []

    def close(self) -> None:
        """Stop watching; a pending :meth:`next_batch` returns ``[]``."""
        if not self._closed:
            self._closed = True
            self._seed = []
            if self._waiting and self.peers is None:
                self._hub._waiting_all.remove(self)
            self._wake()
            self._hub._remove(self)

    def __aiter__(self) -> AsyncIterator[list[str]]:
        return self

    async def __anext__(self) -> list[str]:
        batch = await self.next_batch()
        if not batch:
            raise StopAsyncIteration
        return batch

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WatchHub:
    """Fans peer changes out to the watchers interested in them.

    Args:
        max_pending: peers the change log holds at most (the store capacity).
        max_watchers: watchers open at once, at most.
        max_per_peer: watchers following any one peer, at most; a watcher
            of every peer counts for each.
    """

    def __init__(
        self, max_pending: int = 100_000, max_watchers: int = 256, max_per_peer: int = 32
    ) -> None:
        for name, value in (
            ("max_pending", max_pending),
            ("max_watchers", max_watchers),
            ("max_per_peer", max_per_peer),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1")
        self.max_pending = max_pending
        self.max_watchers = max_watchers
        self.max_per_peer = max_per_peer
        self._all: set[Watcher] = set()
        self._by_peer: dict[str, set[Watcher]] = {}
        # How many peers are followed by name by exactly k watchers, for k >= 1:
        # the busiest peer, which a new watcher of every peer would also follow.
        self._followed: dict[int, int] = {}
        self._count = 0
        self._seq = 0  # publishes so far
        self._log: dict[str, int] = {}  # peer -> publish it last changed in, oldest first
        self._waiting_all: list[Watcher] = []
        self._waiting_named = 0

    def __len__(self) -> int:
        """Watchers subscribed."""
        return self._count

    def subscribe(self, peer_ids: Iterable[str] | None = None) -> Watcher:
        """A new watcher of ``peer_ids`` (None or empty: every peer).

        Args:
            peer_ids: the peers to watch.

        Raises:
            ResourceExhausted: ``max_watchers`` are open, or one of the peers
                (any peer, for a watcher of every peer) is followed by
                ``max_per_peer`` watchers already.
        """
        peers = frozenset(peer_ids) if peer_ids is not None else frozenset()
        if self._count >= self.max_watchers:
            raise ResourceExhausted(
                "max_watchers", f"{self.max_watchers} WatchForecasts streams already open"
            )
        every = len(self._all)
        if not peers:
            if every + max(self._followed, default=0) >= self.max_per_peer:
                raise ResourceExhausted(
                    "max_watchers_per_peer",
                    f"a peer is followed by {self.max_per_peer} watchers already (a watcher "
                    "of every peer follows each peer)",
                )
        else:
            for pid in peers:
                if every + len(self._by_peer.get(pid, ())) >= self.max_per_peer:
                    raise ResourceExhausted(
                        "max_watchers_per_peer",
                        f"peer {pid!r} is followed by {self.max_per_peer} watchers already "
                        f"({every} of them watch every peer)",
                    )
        w = Watcher(self, peers or None)
        if w.peers is None:
            self._all.add(w)
        else:
            for pid in w.peers:
                watchers = self._by_peer.setdefault(pid, set())
                self._count_followers(len(watchers), +1)
                watchers.add(w)
        self._count += 1
        return w

    def _count_followers(self, before: int, step: int) -> None:
        """A peer followed by ``before`` named watchers gains or loses one."""
        followed = self._followed
        if before:
            followed[before] -= 1
            if not followed[before]:
                del followed[before]
        after = before + step
        if after:
            followed[after] = followed.get(after, 0) + 1

    def publish(self, peer_ids: Iterable[str]) -> None:
        """Mark peers changed (their windows took new samples).

        Args:
            peer_ids: changed peers; repeats are fine.
        """
        if not self._count:
            return
        ids = peer_ids if isinstance(peer_ids, list) else list(peer_ids)
        if not ids:
            return
        self._seq += 1
        seq = self._seq
        log = self._log
        pop = log.pop
        for pid in ids:
            # Re-inserting moves the peer to the most recent end.
            pop(pid, None)
            log[pid] = seq
        excess = len(log) - self.max_pending
        if excess > 0:
            it = iter(log)
            for pid in [next(it) for _ in range(excess)]:
                del log[pid]
        if self._waiting_all:
            waiting, self._waiting_all = self._waiting_all, []
            for w in waiting:
                w._wake()
        if self._waiting_named:
            get = self._by_peer.get
            for pid in ids:
                watchers = get(pid)
                if watchers:
                    for w in watchers:
                        if w._waiting:
                            w._wake()
                    if not self._waiting_named:
                        break

    def _changed_since(self, cursor: int, peers: frozenset[str] | None) -> list[str]:
        """Peers (of ``peers``, or any) changed in a publish after ``cursor``,
        least recently changed first."""
        if cursor >= self._seq:
            return []
        log = self._log
        out: list[str] = []
        budget = len(peers) if peers is not None else -1
        for pid, seq in reversed(log.items()):
            if seq <= cursor:
                break
            if budget == 0 and peers is not None:
                # More changes than watched peers: look each peer up instead.
                hits = sorted((log[p], p) for p in peers if log.get(p, -1) > cursor)
                return [p for _, p in hits]
            budget -= 1
            if peers is None or pid in peers:
                out.append(pid)
        out.reverse()
        return out

    def _arm(self, w: Watcher) -> None:
        """``w`` waits for news: the next publish of a peer it follows wakes it."""
        if w.peers is None:
            self._waiting_all.append(w)
        else:
            self._waiting_named += 1

    def _remove(self, w: Watcher) -> None:
        if w.peers is None:
            if w in self._all:
                self._all.discard(w)
                self._count -= 1
        else:
            removed = False
            for pid in w.peers:
                watchers = self._by_peer.get(pid)
                if watchers is not None and w in watchers:
                    self._count_followers(len(watchers), -1)
                    watchers.discard(w)
                    removed = True
                    if not watchers:
                        del self._by_peer[pid]
            if removed:
                self._count -= 1
        if not self._count:
            self._log.clear()  # nobody left to read it

    def close(self) -> None:
        """Close every watcher (server shutdown): their streams end."""
        for w in list(self._all):
            w.close()
        for watchers in list(self._by_peer.values()):
            for w in list(watchers):
                w.close()
