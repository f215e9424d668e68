"""The soak's client processes: steady workers that remember what was
acknowledged, the churn of new peer ids, a reader, a watcher, and the vandal
that the soak kills mid-stream.

Each ``*_main`` runs in its own spawned process and sends its result as JSON
over a pipe when the load ends.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import random
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from typing import Any

import grpc

from bench.soak.common import (
    BAD_CAUSES,
    BAD_FIELD,
    BAD_SHARE,
    BASE_BW,
    KEEP_ACCEPTED,
    Plan,
    Reservoir,
    requests_from,
    timestamp,
)
from bwpredd.client import Client, channel_for, pb

__all__ = [
    "Job",
    "Steady",
    "bad_sample",
    "churn_main",
    "reader_main",
    "steady_main",
    "vandal_main",
    "watcher_main",
]

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
