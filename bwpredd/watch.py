"""WatchHub: tell WatchForecasts streams which peers changed, never queueing.

One job. Ingest calls :meth:`WatchHub.publish` with the peers whose windows
changed; each :class:`Watcher` (one per WatchForecasts call) keeps only a set
of pending peer ids and an :class:`asyncio.Event`. When it wakes, the servicer
computes the *current* forecast of each returned peer, so a slow consumer
simply gets the latest value per peer: nothing accumulates per sample.

Bounds: a watcher's pending set holds at most one entry per peer, and at most
``max_pending`` entries (set it to the WindowStore's capacity). Past that the
least recently changed entry is dropped: with ``capacity + 1`` distinct peers
changed since the last read, the least recent of them has ``capacity`` more
recently seen peers, so LRU eviction has already forgotten it and its
forecast could not be answered anyway.

Cost: :meth:`publish` is O(1) when nobody watches (the common case: it is on
the ingest hot path), else O(batch) per watcher of all peers plus O(batch)
dict look-ups for watchers of named peers. Everything runs on the event
loop's thread: ``publish``, ``subscribe`` and ``close`` must be called there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

__all__ = ["WatchHub", "Watcher"]


class Watcher:
    """The pending changes of one subscriber; an async iterator of batches.

    Made by :meth:`WatchHub.subscribe`; use ``async for ids in watcher`` or
    :meth:`next_batch`, and :meth:`close` (or ``with watcher:``) at the end.
    """

    def __init__(self, hub: WatchHub, peers: frozenset[str] | None, max_pending: int) -> None:
        self.peers = peers
        self.max_pending = max_pending
        self._hub = hub
        # A dict as an ordered set: insertion order = least recently changed first.
        self._pending: dict[str, None] = {}
        self._event = asyncio.Event()
        self._closed = False

    @property
    def pending(self) -> int:
        """Peers changed since the last batch was taken."""
        return len(self._pending)

    @property
    def closed(self) -> bool:
        return self._closed

    def push(self, peer_ids: Iterable[str]) -> None:
        """Mark peers changed for this watcher only (e.g. every watched peer
        once at subscription, so the stream starts with current values).

        Args:
            peer_ids: ids; those outside the watcher's filter are ignored.
        """
        if self.peers is not None:
            peer_ids = [p for p in peer_ids if p in self.peers]
        self._offer(peer_ids)

    def _offer(self, peer_ids: Iterable[str]) -> None:
        if self._closed:
            return
        pending = self._pending
        for pid in peer_ids:
            # Re-inserting moves the peer to the most recent end.
            pending.pop(pid, None)
            pending[pid] = None
        while len(pending) > self.max_pending:
            del pending[next(iter(pending))]
        if pending:
            self._event.set()

    async def next_batch(self) -> list[str]:
        """Wait for changes and take them all: each changed peer once, least
        recently changed first. Returns ``[]`` once the watcher is closed."""
        while not self._pending:
            if self._closed:
                return []
            self._event.clear()
            await self._event.wait()
        if self._closed:
            return []
        batch = list(self._pending)
        self._pending = {}
        self._event.clear()
        return batch

    def close(self) -> None:
        """Stop watching; a pending :meth:`next_batch` returns ``[]``."""
        if not self._closed:
            self._closed = True
            self._pending = {}
            self._hub._remove(self)
            self._event.set()

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
        max_pending: bound of each watcher's pending set (the store capacity).
    """

    def __init__(self, max_pending: int = 100_000) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self.max_pending = max_pending
        self._all: set[Watcher] = set()
        self._by_peer: dict[str, set[Watcher]] = {}
        self._count = 0

    def __len__(self) -> int:
        """Watchers subscribed."""
        return self._count

    def subscribe(self, peer_ids: Iterable[str] | None = None) -> Watcher:
        """A new watcher of ``peer_ids`` (None or empty: every peer).

        Args:
            peer_ids: the peers to watch.
        """
        peers = frozenset(peer_ids) if peer_ids is not None else frozenset()
        w = Watcher(self, peers or None, min(self.max_pending, len(peers) or self.max_pending))
        if w.peers is None:
            self._all.add(w)
        else:
            for pid in w.peers:
                self._by_peer.setdefault(pid, set()).add(w)
        self._count += 1
        return w

    def publish(self, peer_ids: Iterable[str]) -> None:
        """Mark peers changed (their windows took new samples).

        Args:
            peer_ids: changed peers; repeats are fine.
        """
        if not self._count:
            return
        if self._all:
            ids = list(peer_ids) if not isinstance(peer_ids, list) else peer_ids
            for w in self._all:
                w._offer(ids)
            peer_ids = ids
        if self._by_peer:
            get = self._by_peer.get
            for pid in peer_ids:
                watchers = get(pid)
                if watchers:
                    for w in watchers:
                        w._offer((pid,))

    def _remove(self, w: Watcher) -> None:
        if w.peers is None:
            if w in self._all:
                self._all.discard(w)
                self._count -= 1
            return
        removed = False
        for pid in w.peers:
            watchers = self._by_peer.get(pid)
            if watchers is not None and w in watchers:
                watchers.discard(w)
                removed = True
                if not watchers:
                    del self._by_peer[pid]
        if removed:
            self._count -= 1

    def close(self) -> None:
        """Close every watcher (server shutdown): their streams end."""
        for w in list(self._all):
            w.close()
        for watchers in list(self._by_peer.values()):
            for w in list(watchers):
                w.close()
