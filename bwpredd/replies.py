"""The reply cache of small Forecast and Allocate requests, owned by Core.

A sidecar is asked about the same peers over and over between samples; the
per-peer answers are cached in Core already, and keeping the built reply as
well skips validation, look-ups and message building. The reply is opaque
here (the servicer builds it; Core never sees protobuf).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from bwpredd.engine import Source

if TYPE_CHECKING:
    from bwpredd.core import Core, Stamp

__all__ = ["REPLY_CACHE_ENTRIES", "REPLY_CACHE_PEERS", "Replies", "Reply", "served"]

REPLY_CACHE_PEERS = 8  # Forecast/Allocate requests this small keep their reply
REPLY_CACHE_ENTRIES = 4096
M = TypeVar("M")
_NAMES = {s.value: s.name for s in Source}
_MINLENGTH = max(_NAMES) + 1


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
