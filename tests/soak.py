"""Soak: mixed load from several processes against a real daemon, with faults.

``python -m tests.soak --minutes 3`` (or ``make soak DURATION=3``) starts
``python -m bwpredd`` on a unix socket with a state directory and a copy of the
default model directory, then runs, until the time is up:

- *steady* workers (processes), each owning a set of peers: PushSamples and
  lock-step StreamSamples with a small share of deliberately bad samples, some
  streams cancelled mid-flight. Every good sample carries a unique increasing
  bandwidth per peer, and the worker remembers what was acked (accepted), what
  was refused, and what is uncertain (sent on a call that failed);
- a *fading* cohort fed only during the warm-up and then left idle, so idle
  expiry must forget it;
- a *churn* worker trickling new peer ids, and id floods on demand (LRU);
- a *reader* (Forecast, Allocate, GetPeer, ListPeers, Advise) and a *watcher*
  (WatchForecasts, cancelled and reopened now and then);
- a *checker* owning a few peers that it feeds, leaves idle past the expiry
  time and feeds again (the id floods evict some too): it checks every
  Forecast and Allocate answer against one computed afresh from the window
  GetPeer shows just before and after, and that a removed peer is NOT_FOUND;

and injects faults: clients killed with SIGKILL mid-stream, SIGHUP reloads, a
corrupt model pushed (one flipped byte) then reverted, id floods, and a restart
with SIGTERM (drain, snapshot, restore). At the end every verified peer's
window is compared with what its worker had acked; a peer may be missing only
if it was evicted, which the eviction counters (summed over daemon lifetimes)
must explain. Resident memory is sampled every second; its growth per hour is
the slope after warm-up over the longest daemon lifetime. A summary table is
printed and ``reports/soak.json`` and ``reports/soak.md`` are written.

Workers send their results as JSON over pipes. Loopback and unix sockets only.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import math
import multiprocessing as mp
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client.parser import text_string_to_metric_families

from bwpredd.client import Client, channel_for, pb
from bwpredd.engine import Engine
from bwpredd.modeldir import DEFAULT_MODEL_DIR, load_model
from bwpredd.state import step_seconds

REPO = Path(__file__).resolve().parents[1]
WINDOW = 10
KEEP_ACCEPTED = 48  # accepted values remembered per peer (newest)
LATENCY_CAP = 100_000  # latencies kept per RPC (reservoir)
BASE_BW = 1000.0  # bandwidth = BASE_BW + sequence number: exact in float32
BAD_SHARE = 0.03
BAD_CAUSES = ("bandwidth_nan", "latency_negative", "loss_over_one", "peer_id_space", "ts_future")
BAD_FIELD = {
    "bandwidth_nan": "bandwidth_mbps",
    "latency_negative": "latency_ms",
    "loss_over_one": "packet_loss",
    "peer_id_space": "peer_id",
    "ts_future": "timestamp",
}


@dataclass(frozen=True)
class Plan:
    """Sizes and timings of one soak run."""

    minutes: float
    workers: int = 4
    peers_per_worker: int = 150
    fading_peers: int = 100
    churn_per_s: float = 40.0
    headroom: int = 2500  # max_peers - verified peers
    idle_expiry_s: float = 20.0
    snapshot_interval_s: float = 5.0
    grace_period_s: float = 5.0
    call_timeout_s: float = 10.0

    @property
    def seconds(self) -> float:
        return self.minutes * 60.0

    @property
    def warmup_s(self) -> float:
        return min(60.0, max(15.0, 0.15 * self.seconds))

    @property
    def verified_peers(self) -> int:
        return self.workers * self.peers_per_worker + self.fading_peers

    @property
    def max_peers(self) -> int:
        return self.verified_peers + self.headroom


# -- small helpers --------------------------------------------------------------------------


class Reservoir:
    """At most ``cap`` values, uniformly sampled from everything added."""

    def __init__(self, cap: int = LATENCY_CAP, seed: int = 0) -> None:
        self.cap = cap
        self.values: list[float] = []
        self.seen = 0
        self.slowest: list[tuple[float, float]] = []  # min-heap of (ms, unix time)
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        item = (value, round(time.time() - value / 1e3, 3))  # (ms, when it started)
        if len(self.slowest) < 5:
            heapq.heappush(self.slowest, item)
        elif value > self.slowest[0][0]:
            heapq.heapreplace(self.slowest, item)
        self.seen += 1
        if len(self.values) < self.cap:
            self.values.append(value)
        else:
            j = self._rng.randrange(self.seen)
            if j < self.cap:
                self.values[j] = value


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    whole = math.floor(seconds)
    ts.seconds, ts.nanos = int(whole), int((seconds - whole) * 1e9)
    return ts


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}
    arr = np.asarray(values)
    return {
        "n": len(values),
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p99_ms": round(float(np.percentile(arr, 99)), 3),
        "max_ms": round(float(arr.max()), 3),
    }


def requests_from(q: queue.Queue[pb.StreamSamplesRequest | None]) -> Iterator[Any]:
    """A request iterator fed from a queue (None ends it); bounded by the queue."""
    while (item := q.get()) is not None:
        yield item


# -- steady worker --------------------------------------------------------------------------


@dataclass
class PeerTrack:
    """What one worker knows about one of its peers."""

    seq: int = 0
    accepted: deque[float] = field(default_factory=lambda: deque(maxlen=KEEP_ACCEPTED))
    total: int = 0
    uncertain: list[float] = field(default_factory=list)
    refused: int = 0  # good samples the daemon refused (should stay 0)


class Steady:
    """One steady worker's state and load (runs in its own process)."""

    def __init__(self, idx: int, plan: Plan, target: str, fading_until: float) -> None:
        self.idx = idx
        self.plan = plan
        self.rng = random.Random(1000 + idx)
        self.client = Client(channel_for(target), timeout=plan.call_timeout_s)
        self.peers = {f"w{idx}-p{j:04d}": PeerTrack() for j in range(plan.peers_per_worker)}
        self.fading: dict[str, PeerTrack] = {}
        if idx == 0:
            self.fading = {f"fade-{j:04d}": PeerTrack() for j in range(plan.fading_peers)}
        self.fading_until = fading_until
        self.lat: dict[str, Reservoir] = defaultdict(lambda: Reservoir(seed=idx))
        self.calls: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.bad_sent: Counter[str] = Counter()
        self.bad_rejected: Counter[str] = Counter()
        self.bad_unacked: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()
        self.samples_sent = 0
        self.streams_cancelled = 0

    def track(self, pid: str) -> PeerTrack:
        return self.peers.get(pid) or self.fading[pid]

    def make_batch(self) -> tuple[list[pb.Sample], list[tuple[str, float] | str]]:
        """A batch and, per sample, ``(peer, value)`` for a good sample or the
        cause name for a deliberately bad one."""
        pool = list(self.peers)
        if self.fading and time.time() < self.fading_until:
            pool += list(self.fading)
        n = self.rng.randint(1, 40)
        timed = self.rng.random() < 0.5
        now = time.time()
        samples: list[pb.Sample] = []
        tags: list[tuple[str, float] | str] = []
        for pid in self.rng.sample(pool, min(n, len(pool))):
            if self.rng.random() < BAD_SHARE:
                cause = self.rng.choice(BAD_CAUSES)
                samples.append(bad_sample(pid, cause, now))
                tags.append(cause)
                self.bad_sent[cause] += 1
                continue
            t = self.track(pid)
            t.seq += 1
            value = BASE_BW + t.seq
            s = pb.Sample(peer_id=pid, bandwidth_mbps=value)
            if self.rng.random() < 0.7:
                s.latency_ms = self.rng.uniform(0.1, 200.0)
            if self.rng.random() < 0.5:
                s.packet_loss = self.rng.uniform(0.0, 0.05)
                s.reliability = self.rng.uniform(0.9, 1.0)
            if timed:
                s.timestamp.CopyFrom(timestamp(now))
            samples.append(s)
            tags.append((pid, value))
        self.samples_sent += len(samples)
        return samples, tags

    def settle(self, tags: list[tuple[str, float] | str], ack: Any) -> None:
        """Record an ack: accepted values, refusals by cause."""
        refused = {r.index: r.field for r in ack.rejections}
        for i, tag in enumerate(tags):
            if isinstance(tag, str):
                if refused.get(i) == BAD_FIELD[tag]:
                    self.bad_rejected[tag] += 1
                else:
                    self.unexpected[f"bad {tag} not rejected as {BAD_FIELD[tag]}"] += 1
                continue
            pid, value = tag
            t = self.track(pid)
            if i in refused:
                t.refused += 1
                self.unexpected[f"good sample rejected ({refused[i]})"] += 1
            else:
                t.accepted.append(value)
                t.total += 1

    def unsure(self, tags: list[tuple[str, float] | str]) -> None:
        """A call failed: its good samples may or may not have been stored."""
        for tag in tags:
            if isinstance(tag, str):
                self.bad_unacked[tag] += 1
            else:
                self.track(tag[0]).uncertain.append(tag[1])

    def push(self) -> None:
        samples, tags = self.make_batch()
        self.calls["PushSamples"] += 1
        start = time.perf_counter()
        try:
            ack = self.client.push(samples)
        except grpc.RpcError as err:
            self.errors[f"PushSamples {err.code().name}"] += 1
            self.unsure(tags)
            time.sleep(0.2)
            return
        self.lat["PushSamples"].add((time.perf_counter() - start) * 1e3)
        self.settle(tags, ack)

    def stream(self) -> None:
        """A lock-step stream of a few batches; sometimes cancelled with the
        last batch unacknowledged (the client vanishes mid-stream)."""
        q: queue.Queue[pb.StreamSamplesRequest | None] = queue.Queue()
        self.calls["StreamSamples"] += 1
        call = self.client.stub.StreamSamples(
            requests_from(q), timeout=self.plan.call_timeout_s * 3
        )
        cancel_at = self.rng.randint(1, 12) if self.rng.random() < 0.15 else -1
        batches = self.rng.randint(1, 12)
        try:
            for b in range(batches):
                samples, tags = self.make_batch()
                q.put(pb.StreamSamplesRequest(samples=samples))
                if b == cancel_at:
                    call.cancel()
                    self.streams_cancelled += 1
                    self.unsure(tags)
                    return
                start = time.perf_counter()
                try:
                    ack = next(call)
                except (grpc.RpcError, StopIteration) as err:
                    code = err.code().name if isinstance(err, grpc.RpcError) else "ENDED_EARLY"
                    self.errors[f"StreamSamples {code}"] += 1
                    self.unsure(tags)
                    time.sleep(0.2)
                    return
                self.lat["StreamSamples batch"].add((time.perf_counter() - start) * 1e3)
                self.settle(tags, ack)
            q.put(None)
            with contextlib.suppress(grpc.RpcError):
                for _ in call:
                    self.unexpected["stream ack without a batch"] += 1
        finally:
            q.put(None)

    def result(self) -> dict[str, Any]:
        def peers(d: dict[str, PeerTrack]) -> dict[str, Any]:
            return {
                pid: {
                    "accepted": list(t.accepted),
                    "total": t.total,
                    "uncertain": t.uncertain,
                    "refused": t.refused,
                }
                for pid, t in d.items()
            }

        return {
            "kind": "steady",
            "idx": self.idx,
            "peers": peers(self.peers),
            "fading": peers(self.fading),
            "latency": {k: r.values for k, r in self.lat.items()},
            "slowest": {k: r.slowest for k, r in self.lat.items()},
            "calls": dict(self.calls),
            "errors": dict(self.errors),
            "bad_sent": dict(self.bad_sent),
            "bad_rejected": dict(self.bad_rejected),
            "bad_unacked": dict(self.bad_unacked),
            "unexpected": dict(self.unexpected),
            "samples_sent": self.samples_sent,
            "streams_cancelled": self.streams_cancelled,
        }


def bad_sample(pid: str, cause: str, now: float) -> pb.Sample:
    if cause == "bandwidth_nan":
        return pb.Sample(peer_id=pid, bandwidth_mbps=math.nan)
    if cause == "latency_negative":
        return pb.Sample(peer_id=pid, bandwidth_mbps=5.0, latency_ms=-1.0)
    if cause == "loss_over_one":
        return pb.Sample(peer_id=pid, bandwidth_mbps=5.0, packet_loss=1.5)
    if cause == "peer_id_space":
        return pb.Sample(peer_id=f"{pid} x", bandwidth_mbps=5.0)
    return pb.Sample(peer_id=pid, bandwidth_mbps=5.0, timestamp=timestamp(now + 3600))


@dataclass(frozen=True)
class Job:
    """What every client process needs to know."""

    plan: Plan
    target: str
    t_end: float  # unix time the load stops
    fading_until: float  # unix time the fading cohort stops being fed


def steady_main(idx: int, job: Job, stop: Event, out: Connection) -> None:
    worker = Steady(idx, job.plan, job.target, job.fading_until)
    ops = 0
    while not stop.is_set() and time.time() < job.t_end and ops < 10_000_000:
        ops += 1
        if worker.rng.random() < 0.6:
            worker.push()
        else:
            worker.stream()
        time.sleep(worker.rng.uniform(0.0, 0.004))
    worker.client.close()
    out.send_bytes(json.dumps(worker.result()).encode())
    out.close()


# -- churn, reader, watcher, vandal -------------------------------------------------------


def churn_main(job: Job, stop: Event, flood: Event, flood_size: Any, out: Connection) -> None:
    """New peer ids at a steady trickle; a burst of ``flood_size`` new ids on ``flood``."""
    plan, target, t_end = job.plan, job.target, job.t_end
    client = Client(channel_for(target), timeout=plan.call_timeout_s)
    n = 0
    errors: Counter[str] = Counter()
    accepted = floods = 0
    lat = Reservoir(seed=99)
    while not stop.is_set() and time.time() < t_end and n < 50_000_000:
        if flood.is_set():
            flood.clear()
            floods += 1
            size = int(flood_size.value)
            ids = [f"flood-{floods}-{i}" for i in range(size)]
        else:
            ids = [f"churn-{n + i}" for i in range(max(1, int(plan.churn_per_s / 4)))]
        n += len(ids)
        for chunk in range(0, len(ids), 2000):
            start = time.perf_counter()
            try:
                ack = client.push(
                    pb.Sample(peer_id=p, bandwidth_mbps=50.0) for p in ids[chunk : chunk + 2000]
                )
                accepted += ack.accepted
                lat.add((time.perf_counter() - start) * 1e3)
            except grpc.RpcError as err:
                errors[f"PushSamples {err.code().name}"] += 1
        time.sleep(0.25)
    client.close()
    result = {
        "kind": "churn",
        "ids": n,
        "accepted": accepted,
        "floods": floods,
        "errors": dict(errors),
        "latency": {"PushSamples (churn)": lat.values},
        "slowest": {"PushSamples (churn)": lat.slowest},
    }
    out.send_bytes(json.dumps(result).encode())
    out.close()


def reader_main(job: Job, stop: Event, out: Connection) -> None:
    """Lookups over the steady peers; what answered, how fast, from which source."""
    plan, target, t_end = job.plan, job.target, job.t_end
    rng = random.Random(7)
    client = Client(channel_for(target), timeout=plan.call_timeout_s)
    ids = [f"w{w}-p{j:04d}" for w in range(plan.workers) for j in range(plan.peers_per_worker)]
    lat: dict[str, Reservoir] = defaultdict(lambda: Reservoir(seed=7))
    calls: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    ops = 0
    while not stop.is_set() and time.time() < t_end and ops < 10_000_000:
        ops += 1
        pick = rng.sample(ids, rng.randint(1, 32))
        kind = rng.choice(["Forecast", "Forecast", "Allocate", "GetPeer", "ListPeers", "Advise"])
        calls[kind] += 1
        start = time.perf_counter()
        try:
            if kind == "Forecast":
                for fc in client.forecast(pick):
                    sources[pb.ForecastSource.Name(fc.source)] += 1
                    versions[fc.model_version or "(none)"] += 1
            elif kind == "Allocate":
                client.allocate(pick)
            elif kind == "GetPeer":
                client.peer(pick[0])
            elif kind == "ListPeers":
                client.stub.ListPeers(pb.ListPeersRequest(page_size=100), timeout=client.timeout)
            else:
                client.stub.Advise(
                    pb.AdviseRequest(peer_id=pick[0], payload_bytes=1 << 30),
                    timeout=client.timeout,
                )
        except grpc.RpcError as err:
            # Until every steady peer has had a sample, NOT_FOUND is expected.
            early = time.time() < job.fading_until and err.code() == grpc.StatusCode.NOT_FOUND
            errors[f"{kind} {err.code().name}{' (warm-up)' if early else ''}"] += 1
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                time.sleep(0.2)
            continue
        lat[kind].add((time.perf_counter() - start) * 1e3)
        time.sleep(rng.uniform(0.0, 0.003))
    client.close()
    result = {
        "kind": "reader",
        "latency": {k: r.values for k, r in lat.items()},
        "slowest": {k: r.slowest for k, r in lat.items()},
        "calls": dict(calls),
        "errors": dict(errors),
        "sources": dict(sources),
        "versions": dict(versions),
    }
    out.send_bytes(json.dumps(result).encode())
    out.close()


def watcher_main(job: Job, stop: Event, out: Connection) -> None:
    """WatchForecasts on every peer, cancelled and reopened every few seconds."""
    plan, target, t_end = job.plan, job.target, job.t_end
    rng = random.Random(11)
    client = Client(channel_for(target), timeout=plan.call_timeout_s)
    received = opened = cancelled = 0
    errors: Counter[str] = Counter()
    while not stop.is_set() and time.time() < t_end and opened < 100_000:
        opened += 1
        call = client.stub.WatchForecasts(pb.WatchForecastsRequest(), timeout=60)
        until = time.time() + rng.uniform(1.0, 6.0)

        def cancel_later(c: Any = call, at: float = until) -> None:
            while time.time() < at and not stop.is_set():
                time.sleep(0.05)
            c.cancel()

        killer = threading.Thread(target=cancel_later, daemon=True)
        killer.start()
        try:
            for _ in call:
                received += 1
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED:
                cancelled += 1
            else:
                errors[f"WatchForecasts {err.code().name}"] += 1
                time.sleep(0.2)
        killer.join(timeout=10)
    client.close()
    result = {
        "kind": "watcher",
        "received": received,
        "opened": opened,
        "cancelled": cancelled,
        "errors": dict(errors),
    }
    out.send_bytes(json.dumps(result).encode())
    out.close()


def _window_of(peer: pb.Peer) -> tuple[Any, Any, Any]:
    """GetPeer's window as the daemon's arrays: ``[1, W, 4]`` padded at the
    front, counts ``[1]``, timestamps ``[1, W]``."""
    n = len(peer.window)
    window = np.zeros((1, WINDOW, 4), dtype=np.float32)
    stamps = np.zeros((1, WINDOW), dtype=np.float64)
    for k, s in enumerate(peer.window):
        window[0, WINDOW - n + k] = (s.latency_ms, s.bandwidth_mbps, s.packet_loss, s.reliability)
        stamps[0, WINDOW - n + k] = s.timestamp.seconds + s.timestamp.nanos * 1e-9
    return window, np.array([n], dtype=np.int64), stamps


def _same_window(a: pb.Peer, b: pb.Peer) -> bool:
    return (
        a.sample_count == b.sample_count
        and list(a.window) == list(b.window)
        and a.live_accuracy.guardrail_active == b.live_accuracy.guardrail_active
    )


def _answer_problem(engine: Engine, peer: pb.Peer, fc: Any, al: Any) -> str | None:
    """Why the answers ``fc`` and ``al`` are not the ones computed afresh
    from ``peer``'s window (None when they are)."""
    window, counts, stamps = _window_of(peer)
    guard = np.array([peer.live_accuracy.guardrail_active])
    ref = engine.forecast(window, counts, guard)
    ref_al = engine.allocate(window, counts, ref, step_seconds(stamps, counts))
    got = np.array([fc.bandwidth_mbps, fc.low_mbps, fc.high_mbps])
    want = np.array([ref.point[0], ref.low[0], ref.high[0]], dtype=np.float64)
    if fc.samples_in_window != len(peer.window):
        return f"samples_in_window {fc.samples_in_window}, window holds {len(peer.window)}"
    if fc.source != int(ref.source[0]) or not np.allclose(got, want, rtol=1e-4):
        return f"forecast {got.tolist()} source {fc.source}, window gives {want.tolist()}"
    if al.action != int(ref_al.action[0]) or not math.isclose(
        al.reference_capacity_mbps, float(ref_al.capacity[0]), rel_tol=1e-4
    ):
        return (
            f"allocation {al.action} at {al.reference_capacity_mbps:.6g}, window gives "
            f"{int(ref_al.action[0])} at {float(ref_al.capacity[0]):.6g}"
        )
    return None


def checker_main(job: Job, model_dir: str, stop: Event, out: Connection) -> None:
    """Answers against windows, through evictions, expiry and returns.

    Owns ``chk-*`` peers nobody else writes. A peer is fed a few samples at a
    time; now and then it naps past ``idle_expiry_s`` (so expiry removes it)
    and is fed again afterwards (it returns into whatever slot is free). Each
    check reads GetPeer, then Forecast and Allocate, then GetPeer again: if
    the window was the same both times, the answers must be the ones computed
    afresh from it by the same model; if the peer was absent both times, both
    calls must be NOT_FOUND. Anything in between (a change raced the check)
    is counted as skipped.
    """
    plan, target, t_end = job.plan, job.target, job.t_end
    rng = random.Random(13)
    engine = Engine(load_model(Path(model_dir), 1))
    client = Client(channel_for(target), timeout=plan.call_timeout_s)
    ids = [f"chk-{i:02d}" for i in range(24)]
    nap_until = dict.fromkeys(ids, 0.0)
    level = {p: 10.0 ** rng.uniform(-1, 4) for p in ids}
    last_ts = dict.fromkeys(ids, 0.0)
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    problems: list[str] = []

    def get(p: str) -> pb.Peer | None:
        try:
            return client.peer(p)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def answer(p: str) -> tuple[Any, Any] | None:
        """Forecast and Allocate, or None if both were NOT_FOUND."""
        got: list[Any] = []
        for call in (client.forecast, client.allocate):
            try:
                got.append(call([p])[0])
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                got.append(None)
        if got[0] is None and got[1] is None:
            return None
        return got[0], got[1]

    ops = 0
    while not stop.is_set() and time.time() < t_end and ops < 10_000_000:
        ops += 1
        p = rng.choice(ids)
        now = time.time()
        try:
            if now >= nap_until[p] and rng.random() < 0.5:
                if rng.random() < 0.03:
                    nap_until[p] = now + plan.idle_expiry_s * rng.uniform(1.5, 2.5)
                    counts["naps"] += 1
                    continue
                batch = []
                for _ in range(rng.randint(1, 4)):
                    last_ts[p] = max(last_ts[p] + 0.001, time.time())
                    bw = level[p] * rng.uniform(0.6, 1.4)
                    batch.append(
                        pb.Sample(
                            peer_id=p,
                            bandwidth_mbps=bw,
                            latency_ms=rng.uniform(1, 80),
                            timestamp=timestamp(last_ts[p]),
                        )
                    )
                client.push(batch)
                counts["pushes"] += 1
                continue
            before = get(p)
            answers = answer(p)
            after = get(p)
            if before is None and after is None:
                if answers is None:
                    counts["removed_not_found"] += 1
                else:
                    counts["removed_but_answered"] += 1
                    problems.append(f"{p}: answered while absent: {answers[0]}")
            elif before is not None and after is not None and _same_window(before, after):
                if answers is None or answers[0] is None or answers[1] is None:
                    counts["present_but_not_found"] += 1
                    problems.append(f"{p}: NOT_FOUND while GetPeer shows it")
                elif answers[0].model_version != engine.version:
                    counts["skipped_other_model"] += 1
                elif (why := _answer_problem(engine, before, *answers)) is not None:
                    counts["mismatches"] += 1
                    problems.append(f"{p}: {why}")
                else:
                    counts["answers_checked"] += 1
            else:
                counts["skipped_changed"] += 1
        except grpc.RpcError as err:
            errors[f"checker {err.code().name}"] += 1
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                time.sleep(0.2)
        time.sleep(rng.uniform(0.0, 0.01))
    client.close()
    result = {
        "kind": "checker",
        "counts": dict(counts),
        "problems": problems[:20],
        "errors": dict(errors),
    }
    out.send_bytes(json.dumps(result).encode())
    out.close()


def vandal_main(target: str, seed: int) -> None:
    """Stream good samples for throw-away peers as fast as possible, never
    reading an ack, until SIGKILLed by the soak."""
    client = Client(channel_for(target), timeout=60)

    def batches() -> Iterator[pb.StreamSamplesRequest]:
        for i in range(1_000_000):
            yield pb.StreamSamplesRequest(
                samples=[
                    pb.Sample(peer_id=f"vandal-{seed}-{j}", bandwidth_mbps=float(i + 1))
                    for j in range(20)
                ]
            )

    with contextlib.suppress(grpc.RpcError):
        for _ in client.stub.StreamSamples(batches(), timeout=60):
            time.sleep(10)  # read (almost) nothing: acks pile up in flow control


# -- the daemon --------------------------------------------------------------------------------


class Daemon:
    """``python -m bwpredd`` as a child process, with its metrics scraped."""

    def __init__(self, plan: Plan, work: Path) -> None:
        self.plan = plan
        self.work = work
        self.listen = f"unix:{work}/run/bwpredd.sock"
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.lifetimes: list[dict[str, Any]] = []  # final scrape + exit of each process
        self.log = (work / "daemon.log").open("ab")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BWPREDD_")}
        env.update(
            {
                "BWPREDD_LISTEN": self.listen,
                "BWPREDD_STATE_DIR": str(self.work / "state"),
                "BWPREDD_MODEL_DIR": str(self.work / "model"),
                "BWPREDD_SNAPSHOT_INTERVAL_S": str(self.plan.snapshot_interval_s),
                "BWPREDD_MAX_PEERS": str(self.plan.max_peers),
                "BWPREDD_IDLE_EXPIRY_S": str(self.plan.idle_expiry_s),
                "BWPREDD_GRACE_PERIOD_S": str(self.plan.grace_period_s),
                "BWPREDD_METRICS_ADDR": f"127.0.0.1:{self.metrics_port}",
                "BWPREDD_LOG_RPCS": "false",
                "BWPREDD_LOG_FORMAT": "json",
            }
        )
        return env

    def start(self) -> float:
        """Start and wait for SERVING; returns seconds to ready."""
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bwpredd"],
            env=self.env(),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        self.started_at = time.time()
        deadline = time.monotonic() + 60
        with Client(channel_for(self.listen), timeout=2) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited at start-up: {self.proc.returncode}")
                with contextlib.suppress(grpc.RpcError):
                    if client.health() == "SERVING":
                        return time.monotonic() - t0
                time.sleep(0.05)
        raise RuntimeError("daemon not SERVING after 60 s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def scrape(self) -> dict[str, float]:
        """Every sample of the metrics endpoint as ``name{labels}`` -> value."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
        return out

    def metric(self, key: str) -> float:
        with contextlib.suppress(OSError):
            return self.scrape().get(key, 0.0)
        return math.nan

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, float]:
        """Scrape, signal, wait; returns (exit code, seconds to exit)."""
        assert self.proc is not None
        last: dict[str, float] = {}
        with contextlib.suppress(OSError):
            last = self.scrape()
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=self.plan.grace_period_s + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=10)
        took = time.monotonic() - t0
        self.lifetimes.append(
            {"pid": self.proc.pid, "exit": code, "stop_s": round(took, 3), "metrics": last}
        )
        return code, took

    def reap_crash(self) -> int | None:
        """If the daemon died on its own, record it and return its exit code."""
        if self.proc is not None and self.proc.poll() is not None:
            self.lifetimes.append(
                {"pid": self.proc.pid, "exit": self.proc.returncode, "crashed": True, "metrics": {}}
            )
            code = self.proc.returncode
            self.proc = None
            return code
        return None

    def totals(self, prefix: str) -> dict[str, float]:
        """Counters starting with ``prefix``, summed over every lifetime."""
        out: dict[str, float] = defaultdict(float)
        for life in self.lifetimes:
            for k, v in life["metrics"].items():
                if k.startswith(prefix):
                    out[k] += v
        return dict(out)


def wait_metric(daemon: Daemon, key: str, above: float, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = daemon.metric(key)
        if not math.isnan(value) and value > above:
            return True
        time.sleep(0.2)
    return False


# -- faults ------------------------------------------------------------------------------------


class Faults:
    """The faults the parent injects, each recorded with its outcome."""

    def __init__(
        self, daemon: Daemon, work: Path, target: str, flood: Event, flood_size: Any
    ) -> None:
        self.daemon = daemon
        self.work = work
        self.target = target
        self.flood = flood
        self.flood_size = flood_size
        self.log: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.vandal_seed = 0
        self.started = time.time()
        self.ctx = mp.get_context("spawn")

    def begin(self) -> None:
        self.started = time.time()

    def record(self, kind: str, ok: bool, **detail: Any) -> None:
        self.counts[kind] += 1
        if not ok:
            self.failed[kind] += 1
        took = round(time.time() - self.started, 3)
        self.log.append(
            {"t": round(self.started, 3), "took_s": took, "fault": kind, "ok": ok, **detail}
        )

    def sighup(self) -> None:
        key = "bwpredd_model_reloads_total{outcome=ok}"
        before = self.daemon.metric(key)
        os.kill(self.daemon.pid, signal.SIGHUP)
        self.record("sighup reload", wait_metric(self.daemon, key, before))

    def corrupt_model(self) -> None:
        """Flip one byte of the served forecaster, SIGHUP (must be refused and
        the old model keep serving), then put it back and SIGHUP again."""
        path = self.work / "model" / "forecaster.onnx"
        original = path.read_bytes()
        blob = bytearray(original)
        blob[len(blob) // 2] ^= 0xFF
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(bytes(blob))
        os.replace(tmp, path)
        failed_key = "bwpredd_model_reloads_total{outcome=failed}"
        before = self.daemon.metric(failed_key)
        os.kill(self.daemon.pid, signal.SIGHUP)
        refused = wait_metric(self.daemon, failed_key, before)
        with Client(channel_for(self.target), timeout=5) as c:
            try:
                kept = c.health("bwpredd.model") == "SERVING"
            except grpc.RpcError:
                kept = False
        tmp.write_bytes(original)
        os.replace(tmp, path)
        ok_key = "bwpredd_model_reloads_total{outcome=ok}"
        before_ok = self.daemon.metric(ok_key)
        os.kill(self.daemon.pid, signal.SIGHUP)
        reverted = wait_metric(self.daemon, ok_key, before_ok)
        self.record(
            "corrupt model pushed and reverted",
            refused and kept and reverted,
            refused=refused,
            old_model_kept=kept,
            reverted=reverted,
        )

    def vandal(self, rng: random.Random) -> None:
        """A client process streaming without reading, SIGKILLed mid-stream."""
        self.vandal_seed += 1
        proc = self.ctx.Process(target=vandal_main, args=(self.target, self.vandal_seed))
        proc.start()
        time.sleep(rng.uniform(0.5, 1.5))
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=10)
        with Client(channel_for(self.target), timeout=5) as c:
            try:
                up = c.health() == "SERVING"
            except grpc.RpcError:
                up = False
        self.record("client killed mid-stream", up and self.daemon.alive())

    def id_flood(self, verified: int) -> None:
        """Fill the table and evict some of the (older) throw-away peers by LRU,
        at most half of them, so verified peers, seen every few ms, are never the
        least recently seen: any verified peer missing afterwards is a loss."""
        key = "bwpredd_peer_evictions_total{cause=lru}"
        before = self.daemon.metric(key)
        peers = self.daemon.metric("bwpredd_peers{}")
        if math.isnan(peers):
            self.record("peer id flood", False, error="no metrics")
            return
        spare = max(0, int(peers) - verified)
        evict = max(20, min(400, spare // 2))
        self.flood_size.value = self.daemon.plan.max_peers - int(peers) + evict
        self.flood.set()
        ok = wait_metric(self.daemon, key, before, timeout=30)
        self.record("peer id flood", ok, size=int(self.flood_size.value), evict_target=evict)

    def restart(self) -> None:
        code, took = self.daemon.stop(signal.SIGTERM)
        ready = self.daemon.start()
        restored = self.daemon.metric("bwpredd_peers{}")
        self.record(
            "SIGTERM restart",
            code == 0,
            exit_code=code,
            drain_s=round(took, 3),
            ready_s=round(ready, 3),
            peers_restored=restored,
        )


# -- verification ----------------------------------------------------------------------------


def check_peer(track: dict[str, Any], peer: pb.Peer | None) -> tuple[str, int, str]:
    """Compare what a worker acked with what the daemon holds.

    Returns ``(status, samples lost, note)``; status is ``intact``,
    ``evicted`` (missing), ``recreated`` (evicted, then new samples), ``never``
    (nothing was acked) or ``lost``.
    """
    accepted: list[float] = track["accepted"]
    uncertain = set(track["uncertain"])
    total: int = track["total"]
    if peer is None:
        return ("evicted", 0, "") if total else ("never", 0, "")
    window = [s.bandwidth_mbps for s in peer.window]
    # A value from a failed call may land late (after a later acked call on
    # another HTTP/2 stream), so only the certain values must be in order.
    certain = [v for v in window if v not in uncertain]
    if any(b <= a for a, b in itertools.pairwise(certain)):
        return "lost", 0, f"window out of order: {window}"
    floor = accepted[0] if len(accepted) == KEEP_ACCEPTED else -math.inf
    phantom = [v for v in window if v not in accepted and v not in uncertain and v >= floor]
    if phantom:
        return "lost", 0, f"values never sent or acked: {phantom}"
    recreated = peer.sample_count < total
    # Every acked value newer than the oldest certain value of a full (or
    # re-created) window must be in it; a short window must hold them all.
    full = len(window) == WINDOW or recreated
    newest_floor = min(certain) if full and certain else -math.inf
    lost = [a for a in accepted if a >= newest_floor and a not in window]
    if lost:
        return "lost", len(lost), f"acked but missing: {lost[:5]} (window {window})"
    if not recreated and peer.sample_count > total + len(uncertain):
        return "lost", 0, f"sample_count {peer.sample_count} > acked {total} + uncertain"
    return ("recreated" if recreated else "intact"), 0, ""


def verify(target: str, steady: list[dict[str, Any]]) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    by_cohort: dict[str, Counter[str]] = {"steady": Counter(), "fading": Counter()}
    lost_samples = 0
    notes: list[str] = []
    acked = 0
    with Client(channel_for(target), timeout=10) as client:
        for res in steady:
            for cohort in ("peers", "fading"):
                for pid, track in res[cohort].items():
                    acked += track["total"]
                    try:
                        peer: pb.Peer | None = client.peer(pid)
                    except grpc.RpcError as err:
                        if err.code() != grpc.StatusCode.NOT_FOUND:
                            raise
                        peer = None
                    status, lost, note = check_peer(track, peer)
                    statuses[status] += 1
                    by_cohort["steady" if cohort == "peers" else "fading"][status] += 1
                    lost_samples += lost
                    if note and len(notes) < 20:
                        notes.append(f"{pid}: {note}")
    return {
        "acked_samples": acked,
        "statuses": dict(statuses),
        "by_cohort": {k: dict(v) for k, v in by_cohort.items()},
        "lost_samples": lost_samples,
        "notes": notes,
    }


# -- the run -----------------------------------------------------------------------------------


@dataclass
class RssTrace:
    points: list[tuple[float, int, int]] = field(default_factory=list)  # (t, pid, KiB)

    def growth(self, warmup_s: float, started: dict[int, float]) -> dict[str, Any]:
        """Linear-fit growth after warm-up over the longest daemon lifetime."""
        by_pid: dict[int, list[tuple[float, int]]] = defaultdict(list)
        for t, pid, kib in self.points:
            if t - started[pid] >= warmup_s:
                by_pid[pid].append((t, kib))
        if not by_pid:
            return {"pct_per_hour": math.nan, "window_s": 0.0}
        pid, pts = max(by_pid.items(), key=lambda kv: kv[1][-1][0] - kv[1][0][0] if kv[1] else 0)
        if len(pts) < 5:
            return {"pct_per_hour": math.nan, "window_s": 0.0}
        t = np.array([p[0] for p in pts]) - pts[0][0]
        kib = np.array([p[1] for p in pts], dtype=float)
        coef, cov = np.polyfit(t, kib, 1, cov=True)
        slope, se = float(coef[0]), float(math.sqrt(cov[0, 0]))  # KiB/s
        per_hour = 3600 / kib.mean() * 100
        return {
            "pid": pid,
            "window_s": round(float(t[-1]), 1),
            "start_mib": round(kib[0] / 1024, 1),
            "end_mib": round(kib[-1] / 1024, 1),
            "min_mib": round(kib.min() / 1024, 1),
            "max_mib": round(kib.max() / 1024, 1),
            "slope_kib_per_s": round(slope, 3),
            "pct_per_hour": round(slope * per_hour, 2),
            # +-2 standard errors of the slope; RSS moves in steps (allocator
            # arenas), so on short windows this band is wide and honest.
            "pct_per_hour_low": round((slope - 2 * se) * per_hour, 2),
            "pct_per_hour_high": round((slope + 2 * se) * per_hour, 2),
        }


def rss_verdict(growth: dict[str, Any], target: float = 5.0) -> str:
    """ok when the whole band is under the target; FAILED when the whole band
    is over it on a window of 5 minutes or more; otherwise inconclusive."""
    low, high = growth.get("pct_per_hour_low", math.nan), growth.get("pct_per_hour_high", math.nan)
    if high < target:
        return "ok"
    if low > target and growth.get("window_s", 0.0) >= 300:
        return "FAILED"
    return "inconclusive"


def handling_p99(metrics: dict[str, float]) -> dict[str, float]:
    """Per unary method, the histogram bucket bound holding the server-side
    99th percentile of handling time (last daemon lifetime): the daemon's own
    time, without the client's queueing and scheduling."""
    buckets: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for key, value in metrics.items():
        if not key.startswith("grpc_server_handling_seconds_bucket{"):
            continue
        labels = dict(kv.split("=", 1) for kv in key[key.index("{") + 1 : -1].split(","))
        if labels.get("grpc_type") == "unary":
            buckets[labels["grpc_method"]].append((float(labels["le"]), value))
    out: dict[str, float] = {}
    for method, pts in buckets.items():
        pts.sort()
        total = pts[-1][1]
        if total:
            out[method] = next(le for le, n in pts if n >= 0.99 * total)
    return dict(sorted(out.items()))


def near(log: list[dict[str, Any]], start: float, ms: float) -> dict[str, Any]:
    """The last fault that began before a slow call ended (its likely cause)."""
    before = [f for f in log if f["t"] <= start + ms / 1e3]
    if not before:
        return {}
    f = before[-1]
    return {"last_fault": f["fault"], "call_start_minus_fault_start_s": round(start - f["t"], 1)}


def schedule(plan: Plan) -> list[tuple[float, str]]:
    """Fault times (seconds from the start): cycles of faults between the
    warm-up and the last 15 s, one SIGTERM restart per ~10 minutes placed late
    so the first daemon lifetime is long enough to measure memory."""
    start, end = plan.warmup_s, plan.seconds - 15.0
    cycle = ["vandal", "sighup", "flood", "vandal", "corrupt", "vandal"]
    every = max(6.0, min(60.0, (end - start) / (2 * len(cycle))))
    times: list[tuple[float, str]] = []
    t, i = start, 0
    while t < end and i < 10_000:
        times.append((t, cycle[i % len(cycle)]))
        t += every
        i += 1
    restarts = max(1, round(plan.minutes / 10))
    for k in range(restarts):
        at = start + (end - start) * (0.75 + 0.2 * k / restarts)
        times.append((at, "restart"))
    return sorted(times)


def run(plan: Plan, out_dir: Path) -> dict[str, Any]:
    """Run the soak; the daemon and every client process are gone on return
    (also on an error or Ctrl-C). The work directory (daemon log, state) is
    kept when the run fails."""
    work = Path(tempfile.mkdtemp(prefix="bwpredd-soak-"))
    shutil.copytree(DEFAULT_MODEL_DIR, work / "model")
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    daemon = Daemon(plan, work)
    procs: list[tuple[Any, Connection]] = []
    passed = False
    try:
        report = _run(plan, daemon, ctx, stop, procs)
        passed = bool(report["passed"])
        write_reports(report, out_dir)
        return report
    finally:
        stop.set()
        for p, _ in procs:
            p.join(timeout=1)
            if p.is_alive():
                p.kill()
        if daemon.alive() and daemon.proc is not None:
            daemon.proc.kill()
            daemon.proc.wait(timeout=10)
        daemon.log.close()
        if passed:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"soak: kept {work} (daemon.log, state/) for a look", flush=True)


def _run(
    plan: Plan,
    daemon: Daemon,
    ctx: Any,
    stop: Event,
    procs: list[tuple[Any, Connection]],
) -> dict[str, Any]:
    work = daemon.work
    flood = ctx.Event()
    flood_size = ctx.Value("i", 0)
    t_start = time.time()
    ready_s = daemon.start()
    started: dict[int, float] = {daemon.pid: daemon.started_at}
    target = daemon.listen
    t_end = t_start + plan.seconds
    fading_until = t_start + plan.warmup_s

    def spawn(fn: Callable[..., None], *args: Any) -> None:
        receiver, sender = ctx.Pipe(duplex=False)
        p = ctx.Process(target=fn, args=(*args, sender), daemon=True)
        p.start()
        sender.close()
        procs.append((p, receiver))

    job = Job(plan, target, t_end, fading_until)
    for i in range(plan.workers):
        spawn(steady_main, i, job, stop)
    spawn(churn_main, job, stop, flood, flood_size)
    spawn(reader_main, job, stop)
    spawn(watcher_main, job, stop)
    spawn(checker_main, job, str(work / "model"), stop)

    faults = Faults(daemon, work, target, flood, flood_size)
    plan_faults = schedule(plan)
    rng = random.Random(3)
    rss = RssTrace()
    crashes = 0
    health_failures = 0
    last_sample = 0.0
    ticks = 0
    print(
        f"soak: {plan.minutes:g} min, {plan.workers} steady workers x {plan.peers_per_worker} "
        f"peers + {plan.fading_peers} fading, max_peers {plan.max_peers}, "
        f"{len(plan_faults)} faults scheduled; work dir {work}",
        flush=True,
    )
    with Client(channel_for(target), timeout=5) as probe:
        while time.time() < t_end and ticks < 1_000_000:
            ticks += 1
            now = time.time()
            if (code := daemon.reap_crash()) is not None:
                crashes += 1
                print(f"soak: daemon died (exit {code}); restarting", flush=True)
                daemon.start()
                started[daemon.pid] = daemon.started_at
            if now - last_sample >= 1.0:
                last_sample = now
                if (kib := rss_kib(daemon.pid)) is not None:
                    rss.points.append((now, daemon.pid, kib))
                try:
                    probe.health()
                except grpc.RpcError:
                    health_failures += 1
            while plan_faults and now - t_start >= plan_faults[0][0]:
                _, kind = plan_faults.pop(0)
                faults.begin()
                if kind == "vandal":
                    faults.vandal(rng)
                elif kind == "sighup":
                    faults.sighup()
                elif kind == "corrupt":
                    faults.corrupt_model()
                elif kind == "flood":
                    faults.id_flood(plan.workers * plan.peers_per_worker)
                elif kind == "restart":
                    faults.restart()
                    started[daemon.pid] = daemon.started_at
                print(f"soak: t+{now - t_start:5.0f}s {faults.log[-1]}", flush=True)
            time.sleep(0.1)
    stop.set()
    results: list[dict[str, Any]] = []
    for p, conn in procs:
        if conn.poll(plan.call_timeout_s * 4 + 30):
            results.append(json.loads(conn.recv_bytes().decode()))
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    steady = [r for r in results if r["kind"] == "steady"]
    verdict = verify(target, steady)
    final_metrics = daemon.scrape()
    faults.begin()
    code, took = daemon.stop(signal.SIGTERM)
    faults.record("final SIGTERM", code == 0, exit_code=code, drain_s=round(took, 3))
    report = summarise(
        plan,
        daemon,
        faults,
        results,
        verdict,
        rss=rss,
        started=started,
        crashes=crashes,
        health_failures=health_failures,
        ready_s=ready_s,
        t_start=t_start,
    )
    report["final_metrics_sample"] = {
        k: v for k, v in final_metrics.items() if k.startswith("bwpredd_")
    }
    report["server_handling_p99_le_s"] = handling_p99(final_metrics)
    return report


def summarise(
    plan: Plan,
    daemon: Daemon,
    faults: Faults,
    results: list[dict[str, Any]],
    verdict: dict[str, Any],
    *,
    rss: RssTrace,
    started: dict[int, float],
    crashes: int,
    health_failures: int,
    ready_s: float,
    t_start: float,
) -> dict[str, Any]:
    latency: dict[str, list[float]] = defaultdict(list)
    calls: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    bad_sent: Counter[str] = Counter()
    bad_rejected: Counter[str] = Counter()
    bad_unacked: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    samples_sent = streams_cancelled = 0
    extra: dict[str, Any] = {}
    slow: list[tuple[float, float, str]] = []
    for r in results:
        for k, v in r.get("latency", {}).items():
            latency[k] += v
        for k, v in r.get("slowest", {}).items():
            slow += [(ms, at, k) for ms, at in v]
        calls.update(r.get("calls", {}))
        errors.update(r.get("errors", {}))
        if r["kind"] == "steady":
            bad_sent.update(r["bad_sent"])
            bad_rejected.update(r["bad_rejected"])
            bad_unacked.update(r["bad_unacked"])
            unexpected.update(r["unexpected"])
            samples_sent += r["samples_sent"]
            streams_cancelled += r["streams_cancelled"]
        else:
            extra[r["kind"]] = {
                k: v for k, v in r.items() if k not in ("latency", "slowest", "kind")
            }
    evictions = daemon.totals("bwpredd_peer_evictions_total")
    rejected = daemon.totals("bwpredd_samples_rejected_total")
    accepted = daemon.totals("bwpredd_samples_accepted_total")
    evicted_total = sum(evictions.values())
    steady_status = verdict["by_cohort"]["steady"]
    fading_status = verdict["by_cohort"]["fading"]
    missing = fading_status.get("evicted", 0) + fading_status.get("recreated", 0)
    growth = rss.growth(plan.warmup_s, started)
    workers_reported = sum(1 for r in results if r["kind"] == "steady")
    checker: dict[str, int] = extra.get("checker", {}).get("counts", {})
    ok = {True: "ok", False: "FAILED"}
    checks_ok = {
        "samples lost = 0": verdict["lost_samples"] == 0
        and verdict["statuses"].get("lost", 0) == 0,
        "steady peers all intact": set(steady_status) == {"intact"},
        "missing (fading) peers explained by evictions": missing <= evicted_total,
        "no unexpected rejections": not unexpected,
        "every deliberately bad sample rejected": bad_sent == bad_rejected + bad_unacked,
        "daemon never crashed": crashes == 0,
        "every SIGTERM exited 0": all(life.get("exit") == 0 for life in daemon.lifetimes),
        "every fault survived": not faults.failed,
        "one model version served throughout (the corrupt one never)": len(
            [v for v in extra.get("reader", {}).get("versions", {}) if v != "(none)"]
        )
        == 1,
        "all workers reported": workers_reported == plan.workers,
        "every answer checked matches its window; removed peers NOT_FOUND": (
            checker.get("answers_checked", 0) > 0
            and checker.get("removed_not_found", 0) > 0
            and not any(
                checker.get(k, 0)
                for k in ("mismatches", "removed_but_answered", "present_but_not_found")
            )
        ),
    }
    checks = {name: ok[bool(passed)] for name, passed in checks_ok.items()}
    checks["RSS growth < 5%/h after warm-up"] = rss_verdict(growth)
    return {
        "plan": asdict(plan) | {"max_peers": plan.max_peers, "warmup_s": plan.warmup_s},
        "passed": "FAILED" not in checks.values(),
        "checks": checks,
        "inputs": {
            "samples_sent_by_steady_workers": samples_sent,
            "bad_samples_sent": dict(bad_sent),
            "bad_samples_rejected_as_expected": dict(bad_rejected),
            "bad_samples_on_failed_calls": dict(bad_unacked),
            "calls": dict(calls),
            "streams_cancelled_mid_flight": streams_cancelled,
            "daemon_samples_accepted_total": sum(accepted.values()),
            "daemon_samples_rejected_by_field": rejected,
            **extra,
        },
        "faults": {
            "counts": dict(faults.counts),
            "failed": dict(faults.failed),
            "log": faults.log,
            "daemon_crashes": crashes,
            "health_check_failures": health_failures,
            "daemon_lifetimes": [
                {k: v for k, v in life.items() if k != "metrics"} for life in daemon.lifetimes
            ],
            "first_ready_s": round(ready_s, 3),
        },
        "verification": verdict | {"evictions_by_cause": evictions},
        "errors_by_cause": dict(errors),
        "unexpected": dict(unexpected),
        "latency": {k: percentiles(v) for k, v in sorted(latency.items())},
        "slowest_calls": [
            {"ms": round(ms, 1), "rpc": k, "t_s": round(at - t_start, 1)} | near(faults.log, at, ms)
            for ms, at, k in sorted(slow, reverse=True)[:10]
        ],
        "rss": growth,
        "rss_trace_kib": [
            [round(t - rss.points[0][0], 1), pid, kib] for t, pid, kib in rss.points[::5]
        ]
        if rss.points
        else [],
    }


def table(report: dict[str, Any]) -> str:
    """The summary as a markdown table."""
    v, f, i = report["verification"], report["faults"], report["inputs"]
    rate = i["daemon_samples_accepted_total"] / (report["plan"]["minutes"] * 60)
    rows: list[tuple[str, str]] = [
        ("duration", f"{report['plan']['minutes']:g} min"),
        ("verdict", "PASS" if report["passed"] else "FAIL"),
        ("samples sent (steady workers)", f"{i['samples_sent_by_steady_workers']:,}"),
        (
            "samples accepted by the daemon (all clients)",
            f"{i['daemon_samples_accepted_total']:,.0f}",
        ),
        (
            "ingest rate (accepted by the daemon)",
            f"{rate:,.0f} samples/s",
        ),
        ("samples acked to verified peers", f"{v['acked_samples']:,}"),
        (
            "deliberately bad samples (rejected / on failed calls / sent)",
            f"{sum(i['bad_samples_rejected_as_expected'].values()):,} / "
            f"{sum(i['bad_samples_on_failed_calls'].values()):,} / "
            f"{sum(i['bad_samples_sent'].values()):,}",
        ),
        ("samples lost", str(v["lost_samples"])),
        ("verified peers", ", ".join(f"{k} {n}" for k, n in sorted(v["statuses"].items()))),
        (
            "evictions (lru / idle)",
            f"{v['evictions_by_cause'].get('bwpredd_peer_evictions_total{cause=lru}', 0):,.0f} / "
            f"{v['evictions_by_cause'].get('bwpredd_peer_evictions_total{cause=idle}', 0):,.0f}",
        ),
        ("faults survived", ", ".join(f"{k} x{n}" for k, n in f["counts"].items())),
        ("faults failed", ", ".join(f"{k} x{n}" for k, n in f["failed"].items()) or "none"),
        ("streams cancelled mid-flight", str(i["streams_cancelled_mid_flight"])),
        (
            "answers checked against their windows (ok / mismatched / skipped)",
            f"{_chk(i, 'answers_checked'):,} / {_chk(i, 'mismatches'):,} / "
            f"{_chk(i, 'skipped_changed') + _chk(i, 'skipped_other_model'):,}",
        ),
        (
            "removed peers asked (NOT_FOUND / answered)",
            f"{_chk(i, 'removed_not_found'):,} / {_chk(i, 'removed_but_answered'):,}",
        ),
        ("daemon crashes", str(f["daemon_crashes"])),
        (
            "client errors by cause",
            ", ".join(f"{k} {n}" for k, n in sorted(report["errors_by_cause"].items())) or "none",
        ),
    ]
    rss = report["rss"]
    rows.append(
        (
            "RSS after warm-up",
            f"{rss.get('start_mib', '?')} -> {rss.get('end_mib', '?')} MiB over "
            f"{rss.get('window_s', 0):g} s (min {rss.get('min_mib', '?')}, max "
            f"{rss.get('max_mib', '?')}); slope {rss.get('pct_per_hour', math.nan):+.1f} %/h "
            f"[{rss.get('pct_per_hour_low', math.nan):+.1f}, "
            f"{rss.get('pct_per_hour_high', math.nan):+.1f}]",
        )
    )
    for name, lat in report["latency"].items():
        rows.append(
            (
                f"latency {name}",
                f"p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms, "
                f"max {lat['max_ms']:.1f} ms (n={lat['n']:,})",
            )
        )
    for name, outcome in report["checks"].items():
        rows.append((f"check: {name}", outcome))
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'what':<{width}} | result |", f"|{'-' * (width + 2)}|--------|"]
    lines += [f"| {k:<{width}} | {val} |" for k, val in rows]
    return "\n".join(lines)


def _chk(inputs: dict[str, Any], key: str) -> int:
    return int(inputs.get("checker", {}).get("counts", {}).get(key, 0))


def write_reports(report: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "soak.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    md = [
        "# Soak",
        "",
        f"`python -m tests.soak --minutes {report['plan']['minutes']:g}` "
        "(`make soak DURATION=minutes`): several client processes against one daemon "
        "subprocess, with faults injected (see `tests/soak.py`). Memory growth is the "
        "linear slope after warm-up over the longest daemon lifetime, extrapolated to "
        "an hour; on short runs it is a rough figure.",
        "",
        table(report),
        "",
    ]
    md += [
        "## Server-side handling time, p99 (histogram bucket bound, last daemon lifetime)",
        "",
        ", ".join(
            f"{m} <= {le * 1e3:g} ms" for m, le in report["server_handling_p99_le_s"].items()
        ),
        "",
        "## Slowest calls",
        "",
        "| ms | rpc | at (s) | last fault before it |",
        "|---|---|---|---|",
    ]
    for c in report["slowest_calls"]:
        fault = (
            f"{c['last_fault']} ({c['call_start_minus_fault_start_s']:+g} s)"
            if "last_fault" in c
            else "none"
        )
        md.append(f"| {c['ms']:g} | {c['rpc']} | {c['t_s']:g} | {fault} |")
    md.append("")
    if report["verification"]["notes"]:
        md += ["## Notes", ""] + [f"- {n}" for n in report["verification"]["notes"]] + [""]
    (out_dir / "soak.md").write_text("\n".join(md))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to run the load")
    parser.add_argument("--workers", type=int, default=4, help="steady worker processes")
    parser.add_argument("--peers-per-worker", type=int, default=150)
    parser.add_argument("--out", type=Path, default=REPO / "reports", help="report directory")
    args = parser.parse_args(argv)
    if not 0.5 <= args.minutes <= 24 * 60:
        parser.error("--minutes: between 0.5 and 1440")
    plan = Plan(minutes=args.minutes, workers=args.workers, peers_per_worker=args.peers_per_worker)
    report = run(plan, args.out)
    print()
    print(table(report))
    print(f"\nwrote {args.out / 'soak.json'} and {args.out / 'soak.md'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
