"""Core: the daemon's domain logic behind the RPCs, free of protobuf.

It owns the WindowStore, the Engine and the caches of their answers (per
peer, and per small request: :mod:`bwpredd.answers`), the WatchHub and the
stream admission count, and turns requests (peer ids, sample batches) into
domain answers, raising :mod:`bwpredd.errors` exceptions that the servicer
maps to status codes.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from bwpredd.advise import Advice, CodecTable, advise_many, rank
from bwpredd.answers import Answers, Replies, Reply, served
from bwpredd.config import Config
from bwpredd.eager import Eager
from bwpredd.engine import SOURCE_LABELS as _SOURCE_NAMES
from bwpredd.engine import Allocations, Engine, Forecasts, Source
from bwpredd.errors import InvalidArgument, PeerNotFound, ResourceExhausted
from bwpredd.livescore import Accuracy, LiveScores
from bwpredd.logging import get_logger
from bwpredd.manifest import MAX_HORIZON_S
from bwpredd.metrics import Metrics
from bwpredd.modeldir import LoadedModel
from bwpredd.recording import Recorder
from bwpredd.schema import BW, LAT, LOSS
from bwpredd.transfer import HorizonCurves
from bwpredd.validate import SampleBatch, check_peer_id, check_peer_ids, validate_batch
from bwpredd.watch import Watcher, WatchHub
from bwpredd.windows import PeerView, WindowStore

__all__ = ["WATCH_CHUNK", "Core", "IngestOutcome", "PeerSummary", "Stamp"]

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]
# (model epoch, slots, their WindowStore versions): see Core.stamp.
Stamp = tuple[int, list[int], list[int]]
MAX_PAGE = 1000
WATCH_CHUNK = 512  # peers forecast per step of a WatchForecasts stream
M = TypeVar("M")
log = get_logger(__name__)


@dataclass(frozen=True)
class IngestOutcome:
    """The answer to one ingest batch."""

    accepted: int
    rejections: list[tuple[int, str, str]]  # (index, field, reason), by index


@dataclass(frozen=True)
class PeerSummary:
    """One row of ListPeers."""

    peer_id: str
    samples_in_window: int
    sample_count: int
    last_seen: float


class Core:
    """The daemon's state and answers.

    Args:
        config: the daemon's configuration.
        engine: the model engine (may hold no model).
        metrics: where to count.
        clock: wall clock, unix seconds (tests pass their own).
        recorder: where accepted samples are recorded (None: nowhere).
    """

    def __init__(
        self,
        config: Config,
        engine: Engine,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        recorder: Recorder | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.metrics = metrics
        self.clock = clock
        self.recorder = recorder
        self.store = WindowStore(config.max_peers, engine.feature_defaults)
        self.scores = LiveScores(
            config.max_peers, config.guardrail_steps, config.guardrail_margin, config.guardrail
        )
        self.store.on_reset(self.scores.reset)
        if recorder is not None:
            peer_at = self.store.peer_at
            self.store.on_reset(
                lambda slots: recorder.assign(slots, [peer_at(s) or "" for s in slots.tolist()])
            )
        self.answers = Answers(self.store)
        # Answers computed right after a sample, for peers asked about alone.
        self.eager = (
            Eager(self.store, self.scores, self.answers, engine, metrics)
            if config.eager_answers
            else None
        )
        self.watch = WatchHub(config.max_peers, config.max_watchers, config.max_watchers_per_peer)
        self.codecs = CodecTable.load()
        self._forecast_replies: Replies[Any] = Replies(self)
        self._allocation_replies: Replies[Any] = Replies(self)
        # StreamSamples streams open: grpc's max_concurrent_streams is per
        # HTTP/2 connection; this caps them across all connections
        # (WatchForecasts streams are bounded by the WatchHub, so neither kind
        # can take the other's slots).
        self._open_streams = 0
        # Bound once: a labels() look-up per call costs more than the count.
        self._source_counters = {
            v: metrics.forecasts.labels(source=name) for v, name in _SOURCE_NAMES.items()
        }
        metrics.live_scores_from(self.scores.summary)

    @property
    def model_version(self) -> str:
        """The version of the model serving now (empty: none)."""
        return self.engine.version

    # -- ingest -------------------------------------------------------------------

    def ingest(self, batch: SampleBatch) -> IngestOutcome:
        """Validate and store a batch; the good samples are kept whatever the
        bad ones did.

        Raises:
            InvalidArgument: the batch is larger than ``max_batch_samples``.
        """
        n = len(batch)
        if n > self.config.max_batch_samples:
            raise InvalidArgument(
                "samples", f"at most {self.config.max_batch_samples} samples per request, got {n}"
            )
        now = self.clock()
        valid = validate_batch(
            batch,
            now,
            self.store,
            self.config.max_future_skew_s,
            self.config.max_sample_age_s,
        )
        reasons = valid.reasons
        result = self.store.ingest(valid.peer_ids, valid.rows, valid.ts, now)
        for j, (field, rule) in result.reasons.items():
            reasons[int(valid.index[j])] = (field, rule)
        stored = result.stored
        accepted = len(stored)
        if accepted and self.recorder is not None:
            self.recorder.add(stored.slots, stored.ts, stored.rows, stored.unsent)
        if accepted:
            slots = result.slots[result.accepted]
            self._score(slots, valid.rows[result.accepted, BW])
            if self.eager is not None:
                self.eager.samples(slots)
            if len(self.watch):
                ids = valid.peer_ids
                self.watch.publish(ids[i] for i in np.flatnonzero(result.accepted).tolist())
        if result.evicted:
            self.metrics.evictions.labels(cause="lru").inc(result.evicted)
        self.metrics.accepted.inc(accepted)
        rejections = [(i, f, f"{f}: {r}") for i, (f, r) in sorted(reasons.items())]
        for _, field, _ in rejections:
            self.metrics.rejected.labels(field=field).inc()
        self.metrics.peers.set(len(self.store))
        return IngestOutcome(accepted, rejections)

    def ingest_or_reject(self, batch: SampleBatch) -> IngestOutcome:
        """:meth:`ingest`, but a batch that breaks a batch-level rule (too
        many samples) has every sample rejected instead of raising, so the
        stream it came on goes on."""
        try:
            return self.ingest(batch)
        except InvalidArgument as exc:
            n = len(batch)
            self.metrics.rejected.labels(field=exc.field).inc(n)
            return IngestOutcome(0, [(i, exc.field, str(exc)) for i in range(n)])

    @contextlib.contextmanager
    def sample_stream(self) -> Iterator[None]:
        """Admit one StreamSamples stream for as long as the block runs.

        Raises:
            ResourceExhausted: ``max_concurrent_streams`` streams are open.
        """
        limit = self.config.max_concurrent_streams
        if self._open_streams >= limit:
            raise ResourceExhausted(
                "max_concurrent_streams", f"{limit} StreamSamples streams already open"
            )
        self._open_streams += 1
        try:
            yield
        finally:
            self._open_streams -= 1

    def _score(self, slots: I64, bandwidth: npt.NDArray[np.float64]) -> None:
        """Score pending forecasts against the newly arrived bandwidths and
        log guardrail switches."""
        changes = self.scores.score(slots, bandwidth)
        for which, slots_changed in (("on", changes.on), ("off", changes.off)):
            for slot in slots_changed.tolist():
                acc = self.scores.accuracy(slot)
                log.info(
                    "guardrail_" + which,
                    peer_id=self.store.peer_at(slot),
                    model_mae_mbps=round(acc.model_mae, 6),
                    baseline_mae_mbps=round(acc.baseline_mae, 6),
                    steps=acc.scored_steps,
                )

    # -- answers ------------------------------------------------------------------

    def _slots(self, peer_ids: list[str]) -> I64:
        check_peer_ids(peer_ids, self.config.max_batch_peers)
        get = self.store.slot
        slots = np.empty(len(peer_ids), dtype=np.int64)
        for i, pid in enumerate(peer_ids):
            slot = get(pid)
            if slot is None:
                raise PeerNotFound(pid)
            slots[i] = slot
        return slots

    def forecast(self, peer_ids: list[str]) -> Forecasts:
        """Forecasts for the named peers, in request order.

        Raises:
            InvalidArgument: a bad, duplicate or missing peer id, or too many.
            PeerNotFound: a peer with no window.
        """
        slots = self._slots(peer_ids)
        return self._forecast_slots(slots)

    def _forecast_slots(self, slots: I64, count: bool = True) -> Forecasts:
        """Forecasts of distinct slots, computed only where the cached answer
        is stale; each is recorded for live scoring and, with ``count``,
        counted as served (Allocate uses forecasts without serving them)."""
        answers = self.answers
        stale = answers.stale(slots)
        if stale.any():
            miss = slots[stale]
            windows, counts = self.store.gather(miss)
            answers.put(
                miss, self.engine.forecast(windows, counts, self.scores.fallback_mask(miss))
            )
        fc = answers.get(slots, self.engine.version)
        self.scores.record(slots, fc.model_point, fc.baseline, np.isfinite(fc.model_point))
        if count:
            self._count_sources(fc.source)
        return fc

    def allocate(self, peer_ids: list[str]) -> Allocations:
        """Allocations for the named peers, in request order.

        Raises:
            InvalidArgument: a bad, duplicate or missing peer id, or too many.
            PeerNotFound: a peer with no window.
        """
        slots = self._slots(peer_ids)
        fc = self._forecast_slots(slots, count=False)
        answers = self.answers
        stale = answers.alloc_stale(slots)
        if stale.any():
            miss = slots[stale]
            windows, counts = self.store.gather(miss)
            al = self.engine.allocate(
                windows, counts, answers.get(miss, fc.model_version), self.store.step_s(miss)
            )
            answers.put_allocations(miss, al.action, al.capacity)
        return Allocations(answers.action[slots], answers.capacity[slots], fc.source, fc)

    def _asked(self, peer_ids: Sequence[str], allocate: bool = False) -> None:
        """A question named ``peer_ids``: one peer alone marks its interest
        in eager answers (:mod:`bwpredd.eager`)."""
        if self.eager is not None and len(peer_ids) == 1:
            slot = self.store.slot(peer_ids[0])
            if slot is not None:
                self.eager.asked(slot, allocate)

    def close(self) -> None:
        """Stop eager answers (at shutdown, after the last call)."""
        if self.eager is not None:
            self.eager.close()

    def stamp(self, peer_ids: list[str]) -> Stamp:
        """Where the answers of these known peers stand now: compare it later
        with :meth:`unchanged` to know whether an answer built from them (a
        reply message, say) is still the one Forecast and Allocate would give.
        """
        slots = self._slots(peer_ids).tolist()
        version = self.store.version
        return self.answers.epoch, slots, [version[s] for s in slots]

    def unchanged(self, stamp: Stamp) -> bool:
        """True while no model swap, and no change to the windows of the peers
        in ``stamp`` (a sample, an eviction, an expiry, a restore), has
        happened since it was taken: a released slot's version moves too, so
        a stamp never outlives its peer."""
        epoch, slots, versions = stamp
        if epoch != self.answers.epoch:
            return False
        version = self.store.version
        return all(version[s] == v for s, v in zip(slots, versions, strict=True))

    def forecast_reply(
        self, peer_ids: Iterable[str], build: Callable[[list[str], Forecasts], M]
    ) -> Reply[M]:
        """The reply to a Forecast of ``peer_ids``: the one built last time
        while nothing behind it has changed, else ``build(peer_ids,
        forecasts)``. Counted as served either way.

        Raises:
            InvalidArgument: a bad, duplicate or missing peer id, or too many.
            PeerNotFound: a peer with no window.
        """
        key = tuple(peer_ids)
        replies = self._forecast_replies
        reply: Reply[M] | None = replies.get(key)
        if reply is not None:
            self._count_served(reply.served)
            return reply
        ids = list(key)
        fc = self.forecast(ids)
        self._asked(ids)
        return replies.put(key, build(ids, fc), fc.source)

    def allocation_reply(
        self, peer_ids: Iterable[str], build: Callable[[list[str], Allocations], M]
    ) -> Reply[M]:
        """The reply to an Allocate of ``peer_ids``: the one built last time
        while nothing behind it has changed, else ``build(peer_ids,
        allocations)``.

        Raises:
            InvalidArgument: a bad, duplicate or missing peer id, or too many.
            PeerNotFound: a peer with no window.
        """
        key = tuple(peer_ids)
        replies = self._allocation_replies
        reply: Reply[M] | None = replies.get(key)
        if reply is None:
            ids = list(key)
            al = self.allocate(ids)
            self._asked(ids, allocate=True)
            reply = replies.put(key, build(ids, al), al.source)
        return reply

    @contextlib.contextmanager
    def watching(self, peer_ids: list[str]) -> Iterator[AsyncIterator[tuple[list[str], Forecasts]]]:
        """Subscribe to forecast changes of ``peer_ids`` (empty: every peer)
        for as long as the block runs. The block iterates ``(peer ids,
        their forecasts)``: first every watched peer held now, then the peers
        that changed, in chunks of at most ``WATCH_CHUNK`` peers, so a
        watcher of every peer never holds the event loop for one model run
        over all of them.

        Raises:
            InvalidArgument: a bad or duplicate peer id, or too many.
            ResourceExhausted: too many watchers, in all or of one peer.
        """
        if peer_ids:
            check_peer_ids(peer_ids, self.config.max_batch_peers)
        watcher = self.watch.subscribe(peer_ids or None)
        self.metrics.watchers.inc()
        try:
            watcher.push(peer_ids or self.store.peer_ids())
            yield self._chunks(watcher)
        finally:
            watcher.close()
            self.metrics.watchers.dec()

    async def _chunks(self, watcher: Watcher) -> AsyncIterator[tuple[list[str], Forecasts]]:
        async for ids in watcher:
            for i in range(0, len(ids), WATCH_CHUNK):
                kept, fc = self._forecast_tracked(ids[i : i + WATCH_CHUNK])
                if fc is not None:
                    yield kept, fc

    def _forecast_tracked(self, peer_ids: list[str]) -> tuple[list[str], Forecasts | None]:
        """Forecasts of the peers still tracked among ``peer_ids`` (watchers:
        a peer evicted since it changed is skipped, not an error)."""
        kept = [p for p in peer_ids if p in self.store]
        if not kept:
            return [], None
        slots = np.array([self.store.slot(p) for p in kept], dtype=np.int64)
        return kept, self._forecast_slots(slots)

    def _horizon_curves(
        self, slots: I64, windows: F32, counts: I64
    ) -> tuple[I64, HorizonCurves] | None:
        """Horizon forecasts of the full windows among ``slots`` (rows into
        them), or None when the model declares no horizons or none is full."""
        full = np.flatnonzero(counts >= windows.shape[1])
        if not full.size:
            return None
        curves = self.engine.horizon_curves(windows[full], self.store.step_s(slots[full]))
        return None if curves is None else (full, curves)

    def forecast_horizon(
        self, peer_ids: list[str], horizon_s: float
    ) -> tuple[Forecasts, npt.NDArray[np.float64]]:
        """Mean bandwidth over the next ``horizon_s`` seconds per peer, in
        request order, and the horizon each answer covers (0 where the
        next-step forecast stands for it: no horizons in the model, or a
        window still filling).

        Raises:
            InvalidArgument: a bad horizon, or a bad, duplicate or missing
                peer id, or too many.
            PeerNotFound: a peer with no window.
        """
        if not (math.isfinite(horizon_s) and 0 < horizon_s <= MAX_HORIZON_S):
            raise InvalidArgument(
                "horizon_seconds", f"must be finite, > 0 and <= {MAX_HORIZON_S:g}, got {horizon_s}"
            )
        slots = self._slots(peer_ids)
        fc = self._forecast_slots(slots, count=False)  # counted as the reply's sources
        self._asked(peer_ids)
        windows, counts = self.store.gather(slots)
        covered = np.zeros(len(slots))
        found = self._horizon_curves(slots, windows, counts)
        if found is not None:
            rows, curves = found
            point, low, high = fc.point.copy(), fc.low.copy(), fc.high.copy()
            source = fc.source.copy()
            point[rows], low[rows], high[rows] = curves.at(horizon_s)
            source[rows] = Source.MODEL
            covered[rows] = horizon_s
            fc = replace(fc, point=point, low=low, high=high, source=source)
        self._count_sources(fc.source)
        return fc, covered

    def advise(
        self,
        peer_ids: list[str],
        payload_bytes: int,
        data_kind: str,
        compressibility: float | None,
    ) -> tuple[list[Advice], Forecasts]:
        """Transfer advice per peer, in request order (see bwpredd.advise),
        with the (next-step) forecasts it rests on; peers with a full window
        under a model that declares horizons get their transfer times from
        the horizon forecasts.

        Raises:
            InvalidArgument: a bad peer id, payload or hint.
            PeerNotFound: a peer with no window.
        """
        slots = self._slots(peer_ids)
        windows, counts = self.store.gather(slots)
        fc = self._forecast_slots(slots)
        self._asked(peer_ids)
        advice = advise_many(
            peer_ids,
            fc.point,
            fc.low,
            fc.high,
            windows[:, -1, LAT],
            payload_bytes=payload_bytes,
            data_kind=data_kind,
            compressibility=compressibility,
            live_error_ratio=self.scores.error_ratio(slots),
            table=self.codecs,
            packet_loss=windows[:, -1, LOSS],
            horizon=self._horizon_curves(slots, windows, counts),
        )
        return advice, fc

    def rank_peers(
        self,
        peer_ids: list[str],
        payload_bytes: int,
        data_kind: str,
        compressibility: float | None,
    ) -> tuple[list[Advice], Forecasts]:
        """Advice per candidate peer, fastest estimated transfer first, with
        the forecasts in request order."""
        advice, fc = self.advise(peer_ids, payload_bytes, data_kind, compressibility)
        return rank(advice), fc

    def _count_served(self, counts: list[tuple[int, int]]) -> None:
        """Count forecasts served: ``(source, n)`` pairs."""
        counters = self._source_counters
        for source, n in counts:
            counters[source].inc(n)

    def _count_sources(self, source: npt.NDArray[np.int8]) -> None:
        if len(source) == 1:
            self._source_counters[int(source[0])].inc()
            return
        self._count_served(served(source))

    def peer(self, peer_id: str) -> tuple[PeerView, Accuracy]:
        """One peer's window, counts and live accuracy.

        Raises:
            InvalidArgument: the id breaks the rule.
            PeerNotFound: the peer has no window.
        """
        check_peer_id(peer_id)
        view = self.store.view(peer_id)
        slot = self.store.slot(peer_id)
        if view is None or slot is None:
            raise PeerNotFound(peer_id)
        return view, self.scores.accuracy(slot)

    def list_peers(self, page_size: int, page_token: str) -> tuple[list[PeerSummary], str]:
        """A page of peers ordered by id, and the token of the next page.

        Args:
            page_size: 0 means the maximum (1000).
            page_token: empty, or the last id of the previous page.
        """
        size = MAX_PAGE if page_size == 0 else min(page_size, MAX_PAGE)
        if page_token:
            check_peer_id(page_token, "page_token")
        ids = (
            [p for p in self.store.peer_ids() if p > page_token]
            if page_token
            else (self.store.peer_ids())
        )
        page = ids[:size]
        if not page:
            return [], ""
        slots = np.array([self.store.slot(p) for p in page], dtype=np.int64)
        counts, totals, seen = self.store.summary(slots)
        rows = [
            PeerSummary(p, int(c), int(t), float(s))
            for p, c, t, s in zip(page, counts, totals, seen, strict=True)
        ]
        return rows, (page[-1] if len(ids) > size else "")

    # -- upkeep -------------------------------------------------------------------

    def swap_model(self, model: LoadedModel | None) -> None:
        """Serve ``model``; new peers take its feature defaults."""
        self.engine.swap(model)
        self.answers.forget_all()
        self.store.defaults = np.asarray(self.engine.feature_defaults, dtype=np.float32)
        self.metrics.set_model(self.engine.version)

    def expire_idle(self) -> int:
        """Drop idle peers (``idle_expiry_s``); returns how many."""
        n = self.store.expire_idle(self.clock(), self.config.idle_expiry_s)
        if n:
            self.metrics.evictions.labels(cause="idle").inc(n)
            self.metrics.peers.set(len(self.store))
        return n
