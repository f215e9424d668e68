"""Eager answers: a peer's forecast (and allocation) computed right after its
new samples, before the question about it arrives, when the peer is likely
to be asked about.

A DWCP worker that measures a link, pushes the sample and then asks about
that one peer leaves the daemon idle for about half a round trip between
the sample's acceptance and the question's arrival. :class:`Eager` spends
it: when samples are accepted for a peer of *interest*, its forecast (and,
if it was asked for one, its allocation) is computed in a callback the event
loop runs right after the ingesting call has handed its reply to grpc, and
stored in the per-peer answer cache (:class:`bwpredd.answers.Answers`). The
question then finds its answer there. One that arrives before the callback
has run is answered inline, as without eager answers, and the callback
skips what that computed.

What it buys is less than the question's own latency shows: on two cores
the callback, holding the GIL, often delays the ingesting call's reply
(grpc's poller thread needs the GIL to finish sending it), so a worker that
pushes and then asks gains 5-15% on the pair where the question alone gains
about 25% (``reports/profile.md``, section 6).

Why on the event loop and not a worker thread: both were built and measured
(``reports/profile.md``, section 5). On the bench's two cores, shared with
the client, a worker thread computing while the reply and the question
travel slowed that round trip by about what it computed (more runnable
threads than cores, a thread wake-up and a hand-back per job), and took the
after-sample Forecast from 1.96x to 1.72x the echo; the loop, idle at that
moment anyway, took it to 1.55x. The loop is never held longer than one
batch (``EAGER_MAX_BATCH`` peers), as for any batched request.

**Interest.** A peer is of interest while a Forecast, Allocate, Advise or
RankPeers naming it alone came after one of its last
``EAGER_INTEREST_UPDATES`` (2) updates, an update being an ingest request
that carried samples for it (one sample, or several sent together): an ask
after update ``n`` makes updates ``n + 1`` and ``n + 2`` eager, and each ask
renews it. Only an Allocate makes the allocation eager too. A request
naming several peers marks none, so the recommended many-peer pattern (one
batched Allocate per tick) costs no extra work. The rule counts updates, not
seconds: whatever the sample rate, a peer asked once costs at most two
computations that nobody asks for, and a peer asked after every update gets
every answer ready.

**Batching.** The peers noted by every ingest call before the callback runs
are computed together, at most ``EAGER_MAX_BATCH`` per callback (the rest in
the next one, so other calls get the loop in between).

**Correctness.** The callback computes exactly what a question would: the
forecasts of the peers whose cached forecast is stale, from the windows,
guardrail mask and model of that moment, then the allocations of those that
want one from the forecasts just stored, through the same
:class:`~bwpredd.engine.Engine` calls as :class:`~bwpredd.core.Core`, and
stores them with the same window-version check. It runs on the event loop,
so nothing changes a window or the model while it computes. A peer queued
whose window changed since without a new sample (an LRU eviction, an idle
expiry, a restore: each moves the slot's version), or whose slot is free, is
skipped; a model swap between the sample and the callback is seen as the
model the callback runs with. Live scoring records a forecast when it is
served, not when it is computed, as before.
"""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import numpy.typing as npt

from bwpredd.answers import Answers
from bwpredd.engine import Engine, Forecasts
from bwpredd.livescore import LiveScores
from bwpredd.logging import RateLimitedLine, get_logger
from bwpredd.metrics import Metrics
from bwpredd.windows import WindowStore

__all__ = ["EAGER_INTEREST_UPDATES", "EAGER_MAX_BATCH", "Eager"]

EAGER_INTEREST_UPDATES = 2
EAGER_MAX_BATCH = 64  # peers per callback at most: the loop is held for one batch
# "Never asked": far enough below any window version that the difference
# never fits the interest window, and no int64 overflow.
_NEVER = -(2**62)
I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]
BOOL = npt.NDArray[np.bool_]
log = get_logger(__name__)


class Eager:
    """Interest in peers, and the computation of their answers right after
    their samples. Lives on the event loop.

    Args:
        store: the windows.
        scores: the live scores (the guardrail's mask).
        answers: the per-peer answer cache the results go to.
        engine: the engine that answers (its current model).
        metrics: where ``eager_answers_total`` is counted.
    """

    def __init__(
        self,
        store: WindowStore,
        scores: LiveScores,
        answers: Answers,
        engine: Engine,
        metrics: Metrics,
    ) -> None:
        self.store = store
        self.scores = scores
        self.answers = answers
        self.engine = engine
        capacity = store.capacity
        # The slot's window version (WindowStore.versions: one step per ingest
        # request that carried samples for it) when it was last asked about
        # alone; reset for a new peer.
        self._forecast_at = np.full(capacity, _NEVER, dtype=np.int64)
        self._allocate_at = np.full(capacity, _NEVER, dtype=np.int64)
        self._asked = False  # any peer ever: until then ingest checks nothing
        self._closed = False
        self._queue: dict[int, int] = {}  # slot -> its window version when noted, in order
        self._scheduled = False  # a _run callback is due on the loop
        self._failed = RateLimitedLine(log, "eager_answers_failed", 60.0)
        self._computed = metrics.eager.labels(outcome="computed")
        self._skipped = metrics.eager.labels(outcome="skipped")
        store.on_reset(self.reset)

    @property
    def pending(self) -> int:
        """Peers waiting for the callback."""
        return len(self._queue)

    # -- interest -------------------------------------------------------------------

    def reset(self, slots: I64) -> None:
        """A slot given to a new peer starts with no interest (``on_reset``)."""
        self._forecast_at[slots] = _NEVER
        self._allocate_at[slots] = _NEVER

    def asked(self, slot: int, allocate: bool) -> None:
        """The peer in ``slot`` was asked about alone (an Allocate if
        ``allocate``)."""
        version = self.store.version[slot]
        if allocate:
            self._allocate_at[slot] = version
        else:
            self._forecast_at[slot] = version
        self._asked = True

    # -- samples --------------------------------------------------------------------

    def samples(self, slots: I64) -> None:
        """New samples were accepted for ``slots`` (repeats allowed): queue
        the peers of interest among them for the callback. On the event loop
        (elsewhere, a test's direct call, it does nothing)."""
        if not self._asked or self._closed:
            return
        now = self.store.versions[slots]
        latest = np.maximum(self._forecast_at[slots], self._allocate_at[slots])
        wanted = slots[now - latest <= EAGER_INTEREST_UPDATES]
        if not wanted.size:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        version, queue = self.store.version, self._queue
        for slot in wanted.tolist():
            queue.pop(slot, None)  # to the back, with its new version
            queue[slot] = version[slot]
        if not self._scheduled:
            # call_soon: the ingesting handler hands its reply to grpc before
            # the loop gets to it, so the computation overlaps the round trip.
            self._scheduled = True
            loop.call_soon(self._run)

    def _run(self) -> None:
        """Compute the answers of the peers queued (at most
        ``EAGER_MAX_BATCH``); schedule the rest."""
        self._scheduled = False
        if self._closed:
            return
        queue, store = self._queue, self.store
        taken = list(itertools.islice(queue.items(), EAGER_MAX_BATCH))
        for slot, _ in taken:
            del queue[slot]
        if queue:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)
        version = store.version
        # A slot released, reassigned or restored since it was noted (its
        # version moved without a new sample noting it again): skipped.
        slots = [s for s, v in taken if version[s] == v and store.peer_at(s) is not None]
        arr = np.asarray(slots, dtype=np.int64)
        alloc = store.versions[arr] - self._allocate_at[arr] <= EAGER_INTEREST_UPDATES
        try:
            done = self.compute(arr, alloc) if slots else 0
        except Exception as exc:  # a bug: the questions compute inline instead
            self._failed.warning(error=f"{type(exc).__name__}: {exc}", peers=len(slots))
            done = 0
        if done:
            self._computed.inc(done)
        if done < len(taken):
            self._skipped.inc(len(taken) - done)

    def compute(self, slots: I64, alloc: BOOL) -> int:
        """Compute and store what a question about ``slots`` would: their
        stale forecasts, then the stale allocations of those with ``alloc``.
        Returns how many peers it computed anything for.

        Args:
            slots: ``[k]`` distinct slots holding peers.
            alloc: ``[k]`` whether each one's allocation is wanted too.
        """
        engine, store, answers = self.engine, self.store, self.answers
        stale = answers.stale(slots)
        al_stale = alloc & answers.alloc_stale(slots)
        miss = slots[stale]
        fc: Forecasts | None = None
        if miss.size:
            windows, counts = store.gather(miss)
            fc = engine.forecast(windows, counts, self.scores.fallback_mask(miss))
            answers.put(miss, fc)
        al_miss = slots[al_stale]
        if al_miss.size:
            # The same peers as the forecasts just computed (an Allocate's
            # peer, the common case): their windows and forecasts as they are.
            if fc is None or not np.array_equal(stale, al_stale):
                windows, counts = store.gather(al_miss)
                fc = answers.get(al_miss, engine.version)
            al = engine.allocate(windows, counts, fc, store.step_s(al_miss))
            answers.put_allocations(al_miss, al.action, al.capacity)
        return int(np.count_nonzero(stale | al_stale))

    def close(self) -> None:
        """Stop: nothing queued is computed."""
        self._closed = True
        self._queue.clear()
