"""The caches of Core's answers: per peer (:class:`Answers`) and per small
Forecast or Allocate request (:class:`Replies`).

A sidecar is asked about the same peers over and over between samples.
Answers keeps each peer's last forecast and allocation, Replies the reply
built for a small request, which skips validation, look-ups and message
building too. A reply is opaque here (the servicer builds it; Core never
sees protobuf).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from bwpredd.engine import Forecasts, Source
from bwpredd.windows import WindowStore

if TYPE_CHECKING:
    from bwpredd.core import Core, Stamp

__all__ = ["REPLY_CACHE_ENTRIES", "REPLY_CACHE_PEERS", "Answers", "Replies", "Reply", "served"]

REPLY_CACHE_PEERS = 8  # Forecast/Allocate requests this small keep their reply
REPLY_CACHE_ENTRIES = 4096
M = TypeVar("M")
I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]
_NAMES = {s.value: s.name for s in Source}
_MINLENGTH = max(_NAMES) + 1


class Answers:
    """The last forecast and allocation computed for each slot, each valid
    while the slot's window is the one it was computed from and the model is
    the one that computed it.

    A forecast depends only on the window, the model and the guardrail state,
    and the guardrail only moves when samples arrive, so repeated Forecast
    and Allocate calls between samples reuse the answer instead of running
    the model again. Validity is not kept by invalidation hooks, which each
    new way of changing a window would have to remember: an answer records
    the store's slot version it was computed at (:attr:`WindowStore.version`,
    bumped by every change to a slot: samples, assignment, eviction, expiry,
    restore), and ``epoch`` counts model swaps.
    """

    def __init__(self, store: WindowStore) -> None:
        capacity = store.capacity
        self.store = store
        self.epoch = 0
        # Slot version each answer was computed at; -1: none.
        self.at = np.full(capacity, -1, dtype=np.int64)
        self.alloc_at = np.full(capacity, -1, dtype=np.int64)
        self.point = np.zeros(capacity, dtype=np.float32)
        self.low = np.zeros(capacity, dtype=np.float32)
        self.high = np.zeros(capacity, dtype=np.float32)
        self.baseline = np.zeros(capacity, dtype=np.float32)
        self.model_point = np.zeros(capacity, dtype=np.float32)
        self.source = np.zeros(capacity, dtype=np.int8)
        self.counts = np.zeros(capacity, dtype=np.int64)
        self.action = np.zeros(capacity, dtype=np.int64)
        self.capacity = np.zeros(capacity, dtype=np.float32)

    def forget_all(self) -> None:
        """The model changed: every answer is stale."""
        self.epoch += 1
        self.at[:] = -1
        self.alloc_at[:] = -1

    def stale(self, slots: I64) -> npt.NDArray[np.bool_]:
        out: npt.NDArray[np.bool_] = self.at[slots] != self.store.versions[slots]
        return out

    def alloc_stale(self, slots: I64) -> npt.NDArray[np.bool_]:
        out: npt.NDArray[np.bool_] = self.alloc_at[slots] != self.store.versions[slots]
        return out

    def put(self, slots: I64, fc: Forecasts) -> None:
        self.point[slots] = fc.point
        self.low[slots] = fc.low
        self.high[slots] = fc.high
        self.baseline[slots] = fc.baseline
        self.model_point[slots] = fc.model_point
        self.source[slots] = fc.source
        self.counts[slots] = fc.counts
        self.at[slots] = self.store.versions[slots]

    def put_allocations(self, slots: I64, action: I64, capacity: F32) -> None:
        self.action[slots] = action
        self.capacity[slots] = capacity
        self.alloc_at[slots] = self.store.versions[slots]

    def get(self, slots: I64, version: str) -> Forecasts:
        return Forecasts(
            self.point[slots],
            self.low[slots],
            self.high[slots],
            self.source[slots],
            self.baseline[slots],
            self.model_point[slots],
            self.counts[slots],
            version,
        )


def served(source: npt.NDArray[np.int8]) -> list[tuple[int, int]]:
    """``(source value, peers)`` for each source present in ``source``."""
    if len(source) == 1:
        return [(int(source[0]), 1)]
    counts = np.bincount(source, minlength=_MINLENGTH).tolist()
    return [(v, n) for v, n in enumerate(counts) if n]


@dataclass(slots=True)
class Reply(Generic[M]):
    """A reply and the forecast sources behind it."""

    message: M
    served: list[tuple[int, int]]  # (source, peers), to count it served again
    stamp: Stamp | None = None  # where its peers stood when built; None: not kept
    _sources: dict[str, int] | None = field(default=None, repr=False)

    @property
    def sources(self) -> dict[str, int]:
        """``{"MODEL": n, ...}``, for a log line (built once, on first use)."""
        if self._sources is None:
            self._sources = {_NAMES[v]: n for v, n in self.served}
        return self._sources


class Replies(Generic[M]):
    """The reply messages of recent small requests, by their peer ids, served
    again while no answer behind them has changed.

    A reply is current while :meth:`Core.unchanged` says so for its stamp: a
    model swap, or any change to one of its peers' windows (a sample, an
    eviction, an expiry, a restore), retires it. Memory is bounded: at most
    ``REPLY_CACHE_ENTRIES`` replies of at most ``REPLY_CACHE_PEERS`` peers,
    forgotten all at once when full.

    Args:
        core: whose stamps say whether a reply is current.
    """

    def __init__(self, core: Core) -> None:
        self._core = core
        self._entries: dict[tuple[str, ...], Reply[M]] = {}

    def get(self, key: tuple[str, ...]) -> Reply[M] | None:
        """The current reply kept for ``key``, if any."""
        reply = self._entries.get(key)
        if reply is None or reply.stamp is None or not self._core.unchanged(reply.stamp):
            return None
        return reply

    def put(self, key: tuple[str, ...], message: M, source: npt.NDArray[np.int8]) -> Reply[M]:
        """Wrap ``message`` (built for ``key``, whose forecasts came from
        ``source``) and keep it if the request is small enough."""
        reply = Reply(message, served(source))
        if len(key) > REPLY_CACHE_PEERS:
            return reply
        if len(self._entries) >= REPLY_CACHE_ENTRIES:
            self._entries.clear()
        reply.stamp = self._core.stamp(list(key))
        self._entries[key] = reply
        return reply
