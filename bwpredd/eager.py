"""Eager answers: a peer's forecast (and allocation) computed right after its
new sample, off the request path, when the peer is likely to be asked about.

A DWCP worker that measures a link, pushes the sample and then asks about
that one peer leaves about half a round trip between the sample's acceptance
and the question's arrival. :class:`Eager` spends it: when a sample is
accepted for a peer of *interest*, the peer's forecast (and, if it was asked
for one, its allocation) is computed on a worker thread (onnxruntime releases
the GIL) and stored in the per-peer answer cache (:class:`bwpredd.answers.Answers`).
A question that arrives while that computation is in flight waits for it
(:meth:`Eager.wait`) instead of computing again; one that arrives when none
is pending is answered inline, as without eager answers.

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

**Batching.** One worker thread, one job at a time. Peers noted while a job
runs wait for the next one, which takes every peer then waiting (at most
``EAGER_MAX_BATCH``) in one batched model run.

**Correctness.** A job copies its inputs on the event loop when it starts
(windows, counts, guardrail mask, steps) and records each slot's window
version (:attr:`WindowStore.versions`), the answer cache's model epoch and
the model itself. Its results are stored on the event loop, and only for the
slots whose version is still the recorded one, and only while the epoch and
the model are unchanged: a new sample while in flight, an LRU eviction, an
idle expiry, a restore (each bumps the slot's version) or a model swap drops
the result. A slot whose answer is already current (computed inline
meanwhile) keeps it. Nothing else writes: every answer served is still read
through the same version check as without eager answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from bwpredd.answers import REPLY_CACHE_PEERS, Answers
from bwpredd.engine import Engine, Forecasts
from bwpredd.livescore import LiveScores
from bwpredd.logging import RateLimitedLine, get_logger
from bwpredd.metrics import Metrics
from bwpredd.modeldir import LoadedModel
from bwpredd.state import step_seconds
from bwpredd.windows import WindowStore

__all__ = ["EAGER_INTEREST_UPDATES", "EAGER_MAX_BATCH", "Eager", "compute", "take"]

EAGER_INTEREST_UPDATES = 2
EAGER_MAX_BATCH = 64  # peers in one job at most: a waiter waits for one job
# "Never asked": far enough below any window version that the difference
# never fits the interest window, and no int64 overflow.
_NEVER = -(2**62)
I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
BOOL = npt.NDArray[np.bool_]
log = get_logger(__name__)


def take(fc: Forecasts, rows: I64) -> Forecasts:
    """The forecasts of ``rows`` of ``fc``."""
    return replace(
        fc,
        point=fc.point[rows],
        low=fc.low[rows],
        high=fc.high[rows],
        source=fc.source[rows],
        baseline=fc.baseline[rows],
        model_point=fc.model_point[rows],
        counts=fc.counts[rows],
    )


def compute(
    model: LoadedModel | None,
    windows: F32,
    counts: I64,
    *,
    fallback: BOOL,
    alloc_rows: I64,
    step_s: F32,
) -> tuple[Forecasts, I64, F32]:
    """What Core computes inline for these windows: their forecasts and, for
    ``alloc_rows``, their allocations (actions and reference capacities).
    Pure: runs on the worker thread on copies.

    Args:
        model: the model the job started with.
        windows: ``[k, W, WIDTH]`` as :meth:`WindowStore.gather` gives them.
        counts: ``[k]`` real rows per window.
        fallback: ``[k]`` the guardrail's mask.
        alloc_rows: rows whose allocation is wanted too.
        step_s: ``[len(alloc_rows)]`` seconds between samples of those rows.
    """
    engine = Engine(model)
    fc = engine.forecast(windows, counts, fallback)
    if not alloc_rows.size:
        return fc, np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    al = engine.allocate(windows[alloc_rows], counts[alloc_rows], take(fc, alloc_rows), step_s)
    return fc, al.action, al.capacity


@dataclass(eq=False)
class _Job:
    slots: I64
    versions: I64  # each slot's window version when the job copied it
    alloc_rows: I64  # rows (into slots) whose allocation is computed too
    epoch: int  # Answers.epoch when the job was submitted
    model: LoadedModel | None
    done: asyncio.Event
    started: bool = False  # set by the worker thread as it begins


def _run(
    job: _Job, windows: F32, counts: I64, fallback: BOOL, times: F64
) -> tuple[Forecasts, I64, F32]:
    """:func:`compute` for ``job``, on the worker thread (``times``: the
    sample times of the rows whose allocation is wanted)."""
    job.started = True
    rows = job.alloc_rows
    step = step_seconds(times, counts[rows]) if rows.size else np.empty(0, np.float32)
    return compute(job.model, windows, counts, fallback=fallback, alloc_rows=rows, step_s=step)


class Eager:
    """Interest in peers, and the worker that computes their answers early.

    Lives on the event loop: every method but :func:`compute` runs there.

    Args:
        store: the windows.
        scores: the live scores (the guardrail's mask).
        answers: the per-peer answer cache the results go to.
        engine: the engine whose current model the jobs use.
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
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._running: _Job | None = None
        self._queue: dict[int, None] = {}  # slots waiting for the next job, in order
        self._queue_done = asyncio.Event()
        # slot -> (the window version its pending answer is for, set when done)
        self._waits: dict[int, tuple[int, asyncio.Event]] = {}
        self._stored = metrics.eager.labels(outcome="stored")
        self._dropped = metrics.eager.labels(outcome="dropped")
        self._failed = RateLimitedLine(log, "eager_answers_failed", 60.0)
        store.on_reset(self.reset)

    @property
    def busy(self) -> bool:
        """True while some answer is pending (queued or in flight)."""
        return bool(self._waits)

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
        the peers of interest among them, and start a job if none runs.
        Must run on the event loop."""
        if not self._asked or self._closed:
            return
        now = self.store.versions[slots]
        latest = np.maximum(self._forecast_at[slots], self._allocate_at[slots])
        wanted = slots[now - latest <= EAGER_INTEREST_UPDATES]
        if not wanted.size:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # called off the event loop (a test): no worker
            return
        version = self.store.version
        queue, waits, done = self._queue, self._waits, self._queue_done
        for slot in wanted.tolist():
            queue[slot] = None
            waits[slot] = (version[slot], done)
        if self._running is None:
            # Now, from inside the ingesting call: the job's inputs cost
            # tens of microseconds to copy, and started after the reply
            # (call_soon) it began hundreds of microseconds later, too late
            # for the question that follows the reply.
            self._start()

    def _start(self) -> None:
        """Start a job on the peers waiting (at most ``EAGER_MAX_BATCH``),
        skipping those released or changed since they were queued."""
        queue, waits, store = self._queue, self._waits, self.store
        version = store.version
        while queue:
            done = self._queue_done
            taken = list(itertools.islice(queue, EAGER_MAX_BATCH))
            for slot in taken:
                del queue[slot]
            # The peers left behind wait for a later job, on an event of their
            # own: a waiter woken by this job's finds them still pending and
            # waits again.
            self._queue_done = asyncio.Event()
            for slot in queue:
                waits[slot] = (waits[slot][0], self._queue_done)
            slots: list[int] = []
            for slot in taken:
                expected = waits[slot][0]
                # Released or changed since it was queued without a sample
                # (an eviction, an expiry, a restore): nothing to compute.
                if store.peer_at(slot) is None or version[slot] != expected:
                    del waits[slot]
                else:
                    slots.append(slot)
            if slots:
                arr = np.asarray(slots, dtype=np.int64)
                want_alloc = store.versions[arr] - self._allocate_at[arr] <= EAGER_INTEREST_UPDATES
                self._submit(arr, np.flatnonzero(want_alloc), done)
                return
            done.set()

    def _submit(self, slots: I64, alloc_rows: I64, done: asyncio.Event) -> None:
        """Copy the inputs of ``slots`` and run the job on the worker."""
        store, answers = self.store, self.answers
        windows, counts = store.gather(slots)
        times = store.times(slots[alloc_rows]) if alloc_rows.size else np.empty((0, 0))
        job = _Job(
            slots,
            store.versions[slots].copy(),
            alloc_rows,
            answers.epoch,  # read before the model: a swap between them drops the job
            self.engine.model,
            done,
        )
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="bwpredd-eager")
        loop = asyncio.get_running_loop()
        future = self._executor.submit(
            _run, job, windows, counts, self.scores.fallback_mask(slots), times
        )
        self._running = job

        def finished(f: Future[tuple[Forecasts, I64, F32]]) -> None:  # on the worker
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                loop.call_soon_threadsafe(self._finish, job, f)

        future.add_done_callback(finished)

    def _finish(self, job: _Job, future: Future[tuple[Forecasts, I64, F32]]) -> None:
        """Store a job's results that are still current; wake its waiters;
        start the next job. On the event loop."""
        self._running = None
        answers, store = self.answers, self.store
        if future.cancelled():  # closed
            pass
        elif (exc := future.exception()) is not None:
            # A bug: the questions compute inline instead.
            self._failed.warning(error=f"{type(exc).__name__}: {exc}", peers=len(job.slots))
        else:
            fc, action, capacity = future.result()
            slots = job.slots
            current = store.versions[slots] == job.versions
            if answers.epoch != job.epoch or self.engine.model is not job.model:
                current[:] = False
            # A forecast a question computed inline meanwhile stays, and so
            # does its allocation's input: an allocation is stored only with
            # the forecast it was computed from.
            store_fc = current & answers.stale(slots)
            n, k = int(store_fc.sum()), len(slots)
            if n == k:  # the common case: no rows to pick
                answers.put(slots, fc)
            elif n:
                answers.put(slots[store_fc], take(fc, np.flatnonzero(store_fc)))
            if job.alloc_rows.size and n:
                keep = store_fc[job.alloc_rows]
                if n < k:
                    action, capacity = action[keep], capacity[keep]
                answers.put_allocations(slots[job.alloc_rows[keep]], action, capacity)
            if n:
                self._stored.inc(n)
            if n < k:
                self._dropped.inc(k - n)
        waits = self._waits
        for slot in job.slots.tolist():
            entry = waits.get(slot)
            if entry is not None and entry[1] is job.done:
                del waits[slot]
        job.done.set()
        if self._queue and not self._closed:
            self._start()

    # -- questions ------------------------------------------------------------------

    def wait(self, peer_ids: Sequence[str]) -> Awaitable[None] | None:
        """Something to await before answering a question about
        ``peer_ids`` (requests of at most ``REPLY_CACHE_PEERS`` peers): the
        jobs computing their answers for the windows they hold now, if any
        and if the worker is at work; else None (answer inline). A job the
        worker thread has not begun is not waited for: on a machine with no
        idle core the thread may not run for a while, and the question would
        wait for nothing. Unknown peers are skipped: the answer names them."""
        running = self._running
        if running is None or not running.started or len(peer_ids) > REPLY_CACHE_PEERS:
            return None
        pending = self._pending(peer_ids)
        return None if not pending else self._settle(pending)

    def _pending(self, peer_ids: Sequence[str]) -> list[tuple[int, int]]:
        """``(slot, version)`` of the peers whose answer for their current
        window is queued or in flight."""
        waits, version, slot_of = self._waits, self.store.version, self.store.slot
        out: list[tuple[int, int]] = []
        for pid in peer_ids:
            slot = slot_of(pid)
            if slot is None:
                continue
            entry = waits.get(slot)
            if entry is not None and entry[0] == version[slot]:
                out.append((slot, entry[0]))
        return out

    async def _settle(self, pending: list[tuple[int, int]]) -> None:
        """Wait until none of ``pending`` (slot, version) is pending any
        more at that version: a new sample meanwhile ends the wait (the
        question answers the newest window, inline if need be)."""
        waits = self._waits
        while pending:
            entry = waits.get(pending[0][0])
            if entry is None or entry[1].is_set():  # not expected: never spin
                return
            await entry[1].wait()
            pending = [(s, v) for s, v in pending if (e := waits.get(s)) is not None and e[0] == v]

    def close(self) -> None:
        """Stop: no new job, every waiter woken (it answers inline); a job in
        flight finishes on its thread, its results unused."""
        self._closed = True
        for _, done in self._waits.values():
            done.set()
        self._waits.clear()
        self._queue.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
