"""WindowStore: the last ``W`` samples of every peer, in preallocated numpy
ring buffers.

All state is in arrays indexed by *slot* (``[capacity, W, WIDTH]`` float32
for the windows, features as :mod:`bwpredd.schema` orders them, plus per-slot
counters and times) and a ``peer_id -> slot`` dict.
Ingest is vectorised per batch: samples are grouped by slot, checked for time
order, missing features carried forward, and only each peer's newest ``W``
rows written. At capacity, the least recently seen peers are evicted (once per
batch, with one partial sort); idle peers expire on :meth:`expire_idle`.
Snapshots are plain arrays (``.npz`` without pickle).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from bwpredd.errors import InvalidArgument
from bwpredd.schema import SCHEMA, WIDTH, WINDOW
from bwpredd.state import step_seconds
from bwpredd.validate import MAX_PEER_ID_LEN, check_peer_id

__all__ = ["IngestResult", "PeerView", "StoredRows", "WindowStore"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
BOOL = npt.NDArray[np.bool_]
# The in-order rule's rejection, for one sample and for a batch alike.
_OUT_OF_ORDER = ("timestamp", "older than the peer's newest sample (out of order)")

# Snapshot keys; bumping the format invalidates old snapshots cleanly.
SNAPSHOT_FORMAT = 1
# Arrays of a snapshot that are not per peer.
_SNAPSHOT_HEADER = ("format", "window")
# Room for the archive's and the .npy headers (about 200 bytes per array).
_SNAPSHOT_SLACK = 64 * 1024
# A snapshot may hold this many times max_peers: lowering max_peers and
# restarting keeps the most recently seen peers; a file declaring more is
# refused before anything is allocated.
SNAPSHOT_OVERSIZE = 4


@dataclass(frozen=True)
class IngestResult:
    """What :meth:`WindowStore.ingest` did with each sample it was given."""

    accepted: BOOL  # [n] True where the sample is now in its peer's window
    reasons: dict[int, tuple[str, str]]  # index -> (field, rule) for the rejected
    slots: I64  # [n] slot of each sample (-1 where rejected)
    evicted: int  # peers evicted to make room
    stored: StoredRows  # the accepted samples, as stored


@dataclass(frozen=True)
class StoredRows:
    """The accepted samples of one :meth:`WindowStore.ingest`, in the order
    they were applied (grouped by peer, each peer's in request order): what
    the recorder takes. Fresh arrays the store keeps no reference to."""

    index: I64  # [m] indices into the inputs
    slots: I64  # [m]
    ts: F64  # [m] sample times
    rows: F32  # [m, WIDTH] as stored: missing features carried forward
    unsent: BOOL  # [m, WIDTH] True where the feature was missing (carried or default)

    def __len__(self) -> int:
        return len(self.index)


@dataclass(frozen=True)
class PeerView:
    """A copy of one peer's state."""

    peer_id: str
    window: F32  # [count, WIDTH], oldest first
    timestamps: F64  # [count] sample times (unix seconds)
    sample_count: int
    last_seen: float  # unix seconds of the newest sample's arrival


def _nothing_stored() -> StoredRows:
    none = np.zeros(0, dtype=np.int64)
    return StoredRows(
        none,
        none,
        np.zeros(0, dtype=np.float64),
        np.zeros((0, WIDTH), dtype=np.float32),
        np.zeros((0, WIDTH), dtype=np.bool_),
    )


class WindowStore:
    """Per-peer rolling windows.

    Not thread-safe: the daemon touches it from its event loop only.

    Args:
        capacity: peers held at most.
        defaults: the value of each feature when a peer has never reported
            it (bandwidth's entry is unused: bandwidth is required).
        window: samples per peer.
    """

    def __init__(self, capacity: int, defaults: Sequence[float], window: int = WINDOW) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {capacity}")
        if len(defaults) != WIDTH:
            raise ValueError(f"defaults: need one value per feature ({WIDTH})")
        self.capacity = capacity
        self.window = window
        self.defaults = np.asarray(defaults, dtype=np.float32)
        self._data = np.zeros((capacity, window, WIDTH), dtype=np.float32)
        self._ts = np.zeros((capacity, window), dtype=np.float64)
        self._head = np.zeros(capacity, dtype=np.int64)  # next row to write
        self._count = np.zeros(capacity, dtype=np.int64)  # rows filled, <= window
        self._total = np.zeros(capacity, dtype=np.int64)  # samples ever accepted
        self._last_ts = np.full(capacity, -math.inf, dtype=np.float64)
        self._last_seen = np.zeros(capacity, dtype=np.float64)
        self._slots: dict[str, int] = {}
        self._peers: list[str | None] = [None] * capacity
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._used = np.zeros(capacity, dtype=np.bool_)  # slot holds a peer
        self._reset_hooks: list[Callable[[I64], None]] = []
        # Per-slot version, bumped by every change to what a slot holds: a
        # sample, the slot (re)assigned, the peer released (evicted or
        # expired), a restore. Anything computed from a window is current
        # while its slot's version is unchanged. ``version`` is a plain-Python
        # view for callers that read single slots (a NumPy scalar read costs
        # more in the request path); ``versions`` is a NumPy view of the same
        # memory.
        self.version = array("q", bytes(8 * capacity))
        self.versions: I64 = np.frombuffer(self.version, dtype=np.int64)

    # -- lookup -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._slots

    def slot(self, peer_id: str) -> int | None:
        """The slot of a peer, or None if it is not tracked."""
        return self._slots.get(peer_id)

    def peer_at(self, slot: int) -> str | None:
        """The peer holding a slot, or None."""
        return self._peers[slot]

    def peer_ids(self) -> list[str]:
        """Every tracked peer id, sorted."""
        return sorted(self._slots)

    def on_reset(self, hook: Callable[[I64], None]) -> None:
        """Call ``hook(slots)`` whenever slots are (re)assigned to new peers, so
        per-slot state kept elsewhere (live scores) starts clean."""
        self._reset_hooks.append(hook)

    # -- ingest -----------------------------------------------------------------

    def ingest(self, peer_ids: Sequence[str], rows: F64 | F32, ts: F64, now: float) -> IngestResult:
        """Append already-validated samples to their peers' windows.

        Samples of one peer are applied in the order given. A sample whose
        timestamp is older than its peer's newest sample (stored or earlier in
        this batch) is rejected: windows are time series. Missing optional
        features (NaN in ``rows``) are carried forward from the peer's
        previous sample, else take the defaults.

        Args:
            peer_ids: ``n`` valid peer ids.
            rows: ``[n, WIDTH]`` values in feature order; NaN = not given.
            ts: ``[n]`` sample times, unix seconds.
            now: arrival time, unix seconds (for recency and expiry).
        """
        n = len(peer_ids)
        accepted = np.zeros(n, dtype=bool)
        slots_out = np.full(n, -1, dtype=np.int64)
        reasons: dict[int, tuple[str, str]] = {}
        if n == 0:
            return IngestResult(accepted, reasons, slots_out, 0, _nothing_stored())
        slots, evicted = self._assign(peer_ids, now)
        full = slots < 0
        for i in np.flatnonzero(full):
            reasons[int(i)] = ("peer_id", "peer table is full and no peer could be evicted")
        keep = np.flatnonzero(~full)
        if keep.size == 0:
            return IngestResult(accepted, reasons, slots_out, evicted, _nothing_stored())
        if keep.size == 1:  # one sample (a worker's push): no grouping to do
            one = int(keep[0])
            stored = self._append_one(one, int(slots[one]), rows, float(ts[one]), now)
            if stored is None:
                reasons[one] = _OUT_OF_ORDER
                return IngestResult(accepted, reasons, slots_out, evicted, _nothing_stored())
            accepted[one], slots_out[one] = True, slots[one]
            return IngestResult(accepted, reasons, slots_out, evicted, stored)
        return self._append_many(keep, slots, rows, ts, now, accepted, reasons, slots_out, evicted)

    def _append_one(
        self, i: int, slot: int, rows: F64 | F32, t: float, now: float
    ) -> StoredRows | None:
        """Append sample ``i`` to ``slot``'s window (:meth:`ingest`'s rules);
        None if it is older than the slot's newest sample."""
        if not t >= self._last_ts[slot]:  # NaN too, as in the batch rule
            return None
        r = np.asarray(rows, dtype=np.float32)[i : i + 1]
        unsent = np.isnan(r)
        head = int(self._head[slot])
        if unsent.any():
            seed = self._data[slot, head - 1] if self._count[slot] > 0 else self.defaults
            r = np.where(unsent, seed, r)
        self._data[slot, head] = r[0]
        self._ts[slot, head] = t
        self._head[slot] = (head + 1) % self.window
        self._count[slot] = min(int(self._count[slot]) + 1, self.window)
        self._total[slot] += 1
        self._last_ts[slot] = t
        self._last_seen[slot] = now
        self.version[slot] += 1
        return StoredRows(
            np.array([i], dtype=np.int64),
            np.array([slot], dtype=np.int64),
            np.array([t], dtype=np.float64),
            r,
            unsent,
        )

    def _append_many(  # noqa: PLR0917 (ingest's arrays, in its order)
        self,
        keep: I64,
        slots: I64,
        rows: F64 | F32,
        ts: F64,
        now: float,
        accepted: BOOL,
        reasons: dict[int, tuple[str, str]],
        slots_out: I64,
        evicted: int,
    ) -> IngestResult:
        """:meth:`ingest` of the samples ``keep`` (indices into the inputs)
        whose peers have ``slots``: grouped by peer, each in request order."""
        s = slots[keep]
        t = np.asarray(ts, dtype=np.float64)[keep]
        # Group by slot, keeping the request's order inside each group.
        order = np.lexsort((keep, s))
        s, t, idx = s[order], t[order], keep[order]
        group = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1
        # In-order rule: t must be >= every earlier timestamp of its peer.
        t0 = t.min()
        span = t.max() - t0 + 1.0
        cummax = np.maximum.accumulate((t - t0) + group * span) - group * span + t0
        ok = (t >= cummax) & (t >= self._last_ts[s])
        for i in idx[~ok]:
            reasons[int(i)] = _OUT_OF_ORDER
        s, t, idx = s[ok], t[ok], idx[ok]
        if s.size == 0:
            return IngestResult(accepted, reasons, slots_out, evicted, _nothing_stored())
        r = np.asarray(rows, dtype=np.float32)[idx]
        is_start = np.r_[True, s[1:] != s[:-1]]
        starts = np.flatnonzero(is_start)
        sizes = np.diff(np.r_[starts, s.size])
        group = np.cumsum(is_start) - 1
        rank = np.arange(s.size) - starts[group]
        # Carry forward: seed each group's first row from the stored newest
        # row (or the defaults), then forward-fill inside the sorted batch;
        # every group starts non-NaN, so the fill never crosses peers.
        first_slots = s[starts]
        prev = self._data[first_slots, (self._head[first_slots] - 1) % self.window]
        seed = np.where((self._count[first_slots] > 0)[:, None], prev, self.defaults[None, :])
        unsent = np.isnan(r)
        r[starts] = np.where(unsent[starts], seed, r[starts])
        # Seeds are finite: what is still missing is the unsent past the starts.
        missing = unsent.copy()
        missing[starts] = False
        if missing.any():
            pos = np.where(~missing, np.arange(s.size)[:, None], 0)
            np.maximum.accumulate(pos, axis=0, out=pos)
            r = r[pos, np.arange(WIDTH)[None, :]]
        # Only each peer's newest `window` rows can survive; write just those.
        live = rank >= (sizes[group] - self.window)
        ws, wr, wt = s[live], rank[live], t[live]
        pos = (self._head[ws] + wr) % self.window
        self._data[ws, pos] = r[live]
        self._ts[ws, pos] = wt
        self._head[first_slots] = (self._head[first_slots] + sizes) % self.window
        self._count[first_slots] = np.minimum(self._count[first_slots] + sizes, self.window)
        self._total[first_slots] += sizes
        self._last_ts[first_slots] = t[starts + sizes - 1]
        self._last_seen[first_slots] = now
        self.versions[first_slots] += 1
        accepted[idx] = True
        slots_out[idx] = s
        return IngestResult(accepted, reasons, slots_out, evicted, StoredRows(idx, s, t, r, unsent))

    def _assign(self, peer_ids: Sequence[str], now: float) -> tuple[I64, int]:
        """Slots for ``peer_ids``, creating peers (and evicting) as needed."""
        get = self._slots.get
        slots = np.fromiter((get(p, -1) for p in peer_ids), dtype=np.int64, count=len(peer_ids))
        new_pos = np.flatnonzero(slots < 0)
        if new_pos.size == 0:
            return slots, 0
        new_ids: dict[str, int] = {}
        for i in new_pos:
            new_ids.setdefault(peer_ids[int(i)], len(new_ids))
        evicted = 0
        short = len(new_ids) - len(self._free)
        if short > 0:
            evicted = self._evict_lru(short, protect=slots[slots >= 0])
        fresh: list[int] = []
        for pid in new_ids:
            if not self._free:
                break
            slot = self._free.pop()
            self._slots[pid] = slot
            self._peers[slot] = pid
            self._used[slot] = True
            fresh.append(slot)
        if fresh:
            self._clear(np.asarray(fresh, dtype=np.int64), now)
        for i in new_pos:
            slots[i] = self._slots.get(peer_ids[int(i)], -1)
        return slots, evicted

    def _clear(self, slots: I64, now: float) -> None:
        self.versions[slots] += 1
        self._head[slots] = 0
        self._count[slots] = 0
        self._total[slots] = 0
        self._last_ts[slots] = -math.inf
        self._last_seen[slots] = now
        for hook in self._reset_hooks:
            hook(slots)

    def _release(self, slots: Iterable[int]) -> None:
        version = self.version
        for slot in slots:
            pid = self._peers[slot]
            if pid is not None:
                version[slot] += 1
                del self._slots[pid]
                self._peers[slot] = None
                self._used[slot] = False
                self._free.append(int(slot))

    def _evict_lru(self, n: int, protect: I64) -> int:
        """Free at least ``n`` slots, least recently seen first, never one in
        ``protect`` (peers written by the batch being ingested).

        Evicts in bulk (1/256 of capacity at a time): each call scans every
        slot, so a flood of new ids at capacity must not pay that per batch.
        """
        n = max(n, self.capacity // 256)
        candidates = self._used.copy()
        candidates[protect] = False
        used = np.flatnonzero(candidates)
        n = min(n, used.size)
        if n <= 0:
            return 0
        seen = self._last_seen[used]
        victims = used[np.argpartition(seen, n - 1)[:n]] if n < used.size else used
        self._release(victims.tolist())
        return int(victims.size)

    def expire_idle(self, now: float, max_idle_s: float) -> int:
        """Forget peers with no sample for ``max_idle_s`` seconds.

        Args:
            now: unix seconds.
            max_idle_s: idle limit; 0 disables expiry.
        """
        if max_idle_s <= 0 or not self._slots:
            return 0
        used = np.fromiter(self._slots.values(), dtype=np.int64, count=len(self._slots))
        stale = used[self._last_seen[used] < now - max_idle_s]
        self._release(stale.tolist())
        return int(stale.size)

    # -- reads ------------------------------------------------------------------

    def gather(self, slots: I64) -> tuple[F32, I64]:
        """Windows of many slots in one vectorised read.

        Args:
            slots: ``[k]`` slots.

        Returns:
            ``(windows [k, W, WIDTH] oldest first, counts [k])``; for peers with
            fewer than ``W`` samples the leading rows are padding (zeros).
        """
        w = self.window
        windows = self._data[slots[:, None], self._oldest_first(slots)]
        counts = self._count[slots]
        if (counts < w).any():
            pad = np.arange(w)[None, :] < (w - counts)[:, None]
            windows[pad] = 0.0
        return windows, counts.copy()

    def step_s(self, slots: I64) -> F32:
        """Seconds between samples of each slot's window
        (:func:`bwpredd.state.step_seconds`)."""
        return step_seconds(self.times(slots), self._count[slots])

    def times(self, slots: I64) -> F64:
        """``[k, W]`` sample times of each slot's window, oldest first (a
        copy; padding rows hold stale values, as :meth:`step_s` expects)."""
        ts: F64 = self._ts[slots[:, None], self._oldest_first(slots)]
        return ts

    def _oldest_first(self, slots: I64) -> I64:
        """``[k, W]`` ring positions of each slot's rows, oldest first."""
        idx: I64 = (self._head[slots, None] + np.arange(self.window)[None, :]) % self.window
        return idx

    def view(self, peer_id: str) -> PeerView | None:
        """A copy of one peer's state, or None if it is not tracked."""
        slot = self._slots.get(peer_id)
        if slot is None:
            return None
        one = np.array([slot], dtype=np.int64)
        windows, counts = self.gather(one)
        c = int(counts[0])
        w = self.window
        idx = self._oldest_first(one)[0]
        return PeerView(
            peer_id=peer_id,
            window=windows[0, w - c :].copy(),
            timestamps=self._ts[slot, idx][w - c :].copy(),
            sample_count=int(self._total[slot]),
            last_seen=float(self._last_seen[slot]),
        )

    def summary(self, slots: I64) -> tuple[I64, I64, F64]:
        """``(counts, totals, last_seen)`` of many slots."""
        return self._count[slots].copy(), self._total[slots].copy(), self._last_seen[slots].copy()

    # -- snapshots --------------------------------------------------------------

    def _snapshot_layout(self) -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]]:
        """Every array of a snapshot: its dtype and shape. Per-peer arrays
        have one row per peer; the shape given is that of a row."""
        w = self.window
        return {
            "format": (np.dtype(np.int64), (1,)),
            "window": (np.dtype(np.int64), (1,)),
            "peer_ids": (np.dtype(f"<U{MAX_PEER_ID_LEN}"), ()),
            "data": (self._data.dtype, (w, WIDTH)),
            "ts": (self._ts.dtype, (w,)),
            "head": (self._head.dtype, ()),
            "count": (self._count.dtype, ()),
            "total": (self._total.dtype, ()),
            "last_ts": (self._last_ts.dtype, ()),
            "last_seen": (self._last_seen.dtype, ()),
        }

    def snapshot_max_bytes(self) -> int:
        """The most bytes a snapshot this store restores may take on disk: one
        of ``SNAPSHOT_OVERSIZE`` times its capacity, with room for the
        archive's headers. The bound a reader checks before it allocates
        anything."""
        row = sum(
            dtype.itemsize * math.prod(shape)
            for name, (dtype, shape) in self._snapshot_layout().items()
            if name not in _SNAPSHOT_HEADER
        )
        return SNAPSHOT_OVERSIZE * self.capacity * row + _SNAPSHOT_SLACK

    def snapshot(self) -> dict[str, npt.NDArray[np.generic]]:
        """The tracked peers as plain arrays (no objects: loadable with
        ``allow_pickle=False``)."""
        ids = list(self._slots)
        slots = np.fromiter(self._slots.values(), dtype=np.int64, count=len(ids))
        return {
            "format": np.array([SNAPSHOT_FORMAT], dtype=np.int64),
            "window": np.array([self.window], dtype=np.int64),
            "peer_ids": np.array(ids, dtype=f"<U{MAX_PEER_ID_LEN}"),
            "data": self._data[slots].copy(),
            "ts": self._ts[slots].copy(),
            "head": self._head[slots].copy(),
            "count": self._count[slots].copy(),
            "total": self._total[slots].copy(),
            "last_ts": self._last_ts[slots].copy(),
            "last_seen": self._last_seen[slots].copy(),
        }

    def _check_snapshot(self, snap: Mapping[str, npt.NDArray[np.generic]]) -> list[str]:
        """Check a snapshot against this store and the rules live input obeys.

        Rules: exactly the arrays :meth:`snapshot` writes, each of its dtype
        and shape, one row per peer, at most ``SNAPSHOT_OVERSIZE x capacity``
        peers, this format
        and window length; peer ids unique and valid (the live peer-id rule);
        every feature value finite and within its live range; ring positions
        consistent with the sample totals (``count = min(total, W)``,
        ``head = total mod W``); every timestamp finite, a window's filled
        rows in time order, its newest equal to ``last_ts``; ``last_seen``
        finite.

        Args:
            snap: arrays as written by :meth:`snapshot`, from anywhere.

        Returns:
            The peer ids, in row order.

        Raises:
            ValueError: naming the array and the rule it breaks.
        """
        layout = self._snapshot_layout()
        missing, extra = sorted(set(layout) - set(snap)), sorted(set(snap) - set(layout))
        if missing or extra:
            raise ValueError(f"snapshot: arrays missing {missing}, unexpected {extra}")
        ids_arr = snap["peer_ids"]
        n = ids_arr.shape[0] if ids_arr.ndim == 1 else -1
        for name, (dtype, shape) in layout.items():
            a = snap[name]
            want = shape if name in _SNAPSHOT_HEADER else (n, *shape)
            if a.dtype != dtype or a.shape != want:
                raise ValueError(
                    f"snapshot: {name}: expected {dtype} of shape {want}, got {a.dtype} {a.shape}"
                )
        if int(snap["format"][0]) != SNAPSHOT_FORMAT:
            raise ValueError(f"snapshot: format: expected {SNAPSHOT_FORMAT}")
        if int(snap["window"][0]) != self.window:
            raise ValueError(f"snapshot: window: expected {self.window} (the window length)")
        if n > SNAPSHOT_OVERSIZE * self.capacity:
            raise ValueError(
                f"snapshot: {n} peers, more than {SNAPSHOT_OVERSIZE} x max_peers "
                f"({SNAPSHOT_OVERSIZE * self.capacity})"
            )
        ids: list[str] = ids_arr.tolist()
        seen: dict[str, int] = {}
        for i, pid in enumerate(ids):
            try:
                check_peer_id(pid, f"peer_ids[{i}]")
            except InvalidArgument as exc:
                raise ValueError(f"snapshot: {exc}") from None
            if pid in seen:
                raise ValueError(f"snapshot: peer_ids[{i}]: duplicate of peer_ids[{seen[pid]}]")
            seen[pid] = i
        # The dtypes are checked: these are views, typed for the arithmetic.
        w = self.window
        data = np.asarray(snap["data"], dtype=np.float32)
        with np.errstate(invalid="ignore"):
            for f, feature in enumerate(SCHEMA):
                lo, hi = feature.low, feature.high
                bad = np.flatnonzero(~((data[:, :, f] >= lo) & (data[:, :, f] <= hi)).all(axis=1))
                if bad.size:
                    raise ValueError(
                        f"snapshot: data[{bad[0]}]: {feature.name} must be finite, "
                        f"within [{lo:g}, {hi:g}]"
                    )
        total, count, head = (
            np.asarray(snap[k], dtype=np.int64) for k in ("total", "count", "head")
        )
        bad = np.flatnonzero((total < 0) | (count != np.minimum(total, w)) | (head != total % w))
        if bad.size:
            raise ValueError(
                f"snapshot: peer {bad[0]}: needs total >= 0, count = min(total, {w}), "
                f"head = total mod {w}"
            )
        ts = np.asarray(snap["ts"], dtype=np.float64)
        order = (head[:, None] + np.arange(w)[None, :]) % w
        ordered = ts[np.arange(n)[:, None], order]
        filled = np.arange(w)[None, :] >= (w - count)[:, None]
        last_ts = snap["last_ts"]
        with np.errstate(invalid="ignore"):
            bad_ts = ~np.isfinite(ts).all(axis=1)
            bad_ts |= (filled[:, 1:] & (np.diff(ordered, axis=1) < 0)).any(axis=1)
            bad_ts |= np.where(count > 0, last_ts != ordered[:, -1], last_ts != -math.inf)
        bad = np.flatnonzero(bad_ts)
        if bad.size:
            raise ValueError(
                f"snapshot: ts[{bad[0]}]: a window's timestamps must be finite, in time "
                "order, the newest equal to last_ts"
            )
        bad = np.flatnonzero(~np.isfinite(snap["last_seen"]))
        if bad.size:
            raise ValueError(f"snapshot: last_seen[{bad[0]}]: must be finite")
        return ids

    def restore(
        self, snap: Mapping[str, npt.NDArray[np.generic]], now: float, max_age_s: float
    ) -> int:
        """Replace the store's peers with a snapshot's, dropping peers last
        seen more than ``max_age_s`` ago and, beyond capacity, the least
        recently seen. All or nothing: a snapshot that breaks a rule of
        :meth:`_check_snapshot` changes nothing.

        Args:
            snap: arrays as written by :meth:`snapshot`.
            now: unix seconds.
            max_age_s: age limit of a restored window.

        Returns:
            Peers restored.

        Raises:
            ValueError: the snapshot breaks a rule; the message names it.
        """
        ids = self._check_snapshot(snap)
        last_seen = np.asarray(snap["last_seen"], dtype=np.float64)
        fresh = np.flatnonzero(last_seen >= now - max_age_s)
        fresh = fresh[np.argsort(-last_seen[fresh], kind="stable")][: self.capacity]
        self._release(list(self._slots.values()))
        for j in fresh:
            slot = self._free.pop()
            self._slots[ids[j]] = slot
            self._peers[slot] = ids[j]
            self._used[slot] = True
        slots = np.array([self._slots[ids[j]] for j in fresh], dtype=np.int64)
        if slots.size:
            self._clear(slots, now)
            self._data[slots] = snap["data"][fresh]
            self._ts[slots] = snap["ts"][fresh]
            self._head[slots] = snap["head"][fresh]
            self._count[slots] = snap["count"][fresh]
            self._total[slots] = snap["total"][fresh]
            self._last_ts[slots] = snap["last_ts"][fresh]
            self._last_seen[slots] = last_seen[fresh]
        return int(slots.size)
