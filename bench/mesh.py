"""The bench's mesh-node section: a node of a 1,000-node mesh, its 999 peers
sending one sample a second each, and every peer's allocation refreshed once
a second, one Allocate per peer or one batched Allocate per tick."""

from __future__ import annotations

import collections
import functools
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import SERVICE, Daemon, channel, synthetic_windows
from bench.load import (
    REGISTERED,
    cpu_ns,
    fill,
    latency_summary,
    raw_unary,
    sample_message,
    window_batches,
)
from bench.report import progress
from bench.scenarios import ALLOCATE, Plan, _settle
from bwpredd._proto.bwpred.v1 import bwpred_pb2 as pb

__all__ = ["MESH_TICK_S", "mesh_section"]


# -- a node of a 1,000-node mesh -------------------------------------------------------

# Samples leave in 50 ms batches, as the Go client's Ingester sends them
# (DefaultFlushInterval): paced at 10 ms, the bare gRPC floor alone spends
# about 0.8 ms of CPU per message.
MESH_TICK_S = 0.05
MESH_MAX_IN_FLIGHT = 256  # per-peer calls past this are dropped and counted, not queued


def _mesh_pushes(peers: list[str], ticks: int, seconds: int, seed: int) -> list[bytes]:
    """One StreamSamplesRequest per tick over ``seconds``: each peer's sample
    falls in its own tick of every second (peer ``i`` in tick
    ``i * ticks // len(peers)``)."""
    rng = np.random.default_rng(seed)
    slot = np.arange(len(peers)) * ticks // len(peers)
    out = []
    for _ in range(seconds):
        for t in range(ticks):
            idx = np.flatnonzero(slot == t)
            bw = 50.0 * np.exp(rng.normal(0.0, 0.3, idx.size))
            samples = [
                sample_message(peers[i], (20.0 + 5.0 * rng.random(), b, 0.0, 1.0))
                for i, b in zip(idx, bw, strict=True)
            ]
            out.append(pb.StreamSamplesRequest(samples=samples).SerializeToString())
    return out


def _mesh_run(
    daemon: Daemon, peers: list[str], pushes: list[bytes], pattern: str, seconds: int
) -> dict[str, Any]:
    """Send ``pushes`` on the tick clock for ``seconds``, on one open
    StreamSamples stream as a worker's ingest keeps one (the Go client's
    ``Ingester``), and refresh every
    peer's allocation once a second in ``pattern``: ``"none"`` (samples
    only), ``"per_peer"`` (one Allocate per peer right after the tick that
    carried its sample, issued without waiting: open loop) or ``"batched"``
    (one Allocate for all peers at the start of each second). Returns the
    daemon's CPU share of one core and the p50/p99 of the Allocates."""
    ticks = round(1 / MESH_TICK_S)
    slot = np.arange(len(peers)) * ticks // len(peers)
    by_tick = [
        [
            pb.AllocateRequest(peer_ids=[peers[i]]).SerializeToString()
            for i in np.flatnonzero(slot == t)
        ]
        for t in range(ticks)
    ]
    everyone = pb.AllocateRequest(peer_ids=peers).SerializeToString()
    lat_ns: list[int] = []
    failed: list[str] = []
    dropped = 0
    in_flight = [0]
    clock = time.perf_counter_ns

    def done(t0: int, fut: Any) -> None:  # a grpc call future
        in_flight[0] -= 1
        if fut.exception() is not None:
            failed.append(fut.code().name)
        else:
            lat_ns.append(clock() - t0)

    with channel(daemon.address) as ch:
        outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        acks = ch.stream_stream(f"/{SERVICE}/StreamSamples", **REGISTERED)(iter(outbox.get, None))
        drain = threading.Thread(target=collections.deque, args=(acks, 0), daemon=True)
        drain.start()
        push = outbox.put
        alloc = ch.unary_unary(ALLOCATE, **REGISTERED)
        call = raw_unary(ch, ALLOCATE)
        call(by_tick[0][0])  # the connection is up before the clock starts
        cpu0, start = cpu_ns(daemon.pid), time.perf_counter()
        for n, raw in enumerate(pushes[: seconds * ticks]):
            tick = n % ticks
            delay = start + n * MESH_TICK_S - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            push(raw)
            if pattern == "per_peer":
                for req in by_tick[tick]:
                    if in_flight[0] >= MESH_MAX_IN_FLIGHT:
                        dropped += 1
                        continue
                    in_flight[0] += 1
                    t0 = clock()
                    alloc.future(req, timeout=60).add_done_callback(functools.partial(done, t0))
            elif pattern == "batched" and tick == 0:
                t0 = clock()
                call(everyone)
                lat_ns.append(clock() - t0)
        deadline = time.perf_counter() + 60
        while in_flight[0] > 0 and time.perf_counter() < deadline:
            time.sleep(0.01)
        outbox.put(None)  # the stream ends once every batch is acknowledged
        drain.join(timeout=60)
        wall = time.perf_counter() - start
        cpu = cpu_ns(daemon.pid) - cpu0
    out: dict[str, Any] = {
        "pattern": pattern,
        "seconds": round(wall, 2),
        "samples": len(peers) * seconds,
        "daemon_cpu_share": round(cpu / 1e9 / wall, 4),
        "allocate_calls": len(lat_ns),
        "dropped": dropped,
        "failed": sorted(set(failed)),
    }
    if lat_ns:
        out |= latency_summary(np.asarray(lat_ns, dtype=np.int64))
    return out


def mesh_section(workdir: Path, plan: Plan) -> dict[str, Any]:
    """A node of a 1,000-node mesh: ``plan.mesh_peers`` peers, one sample
    per peer per second spread over the second (50 ms batches on one
    StreamSamples stream), and every
    peer's allocation refreshed once a second, one Allocate per peer right
    after its sample or one batched Allocate per second; against the same
    samples with no Allocate. Every pattern runs ``plan.mesh_s`` seconds on
    one daemon with production defaults; the per-peer pattern runs again on
    a daemon with eager answers off (``per_peer_eager_off``)."""
    n, seconds = plan.mesh_peers, max(1, round(plan.mesh_s))
    peers = [f"mesh-{i:04d}" for i in range(n)]
    out: dict[str, Any] = {"peers": n, "seconds_per_pattern": seconds, "tick_ms": MESH_TICK_S * 1e3}
    with Daemon(workdir, "mesh") as d:
        fill(d.address, window_batches(peers, synthetic_windows(n, seed=3)))
        pushes = _mesh_pushes(peers, round(1 / MESH_TICK_S), seconds, seed=4)
        # The batched pattern before the per-peer one: a peer asked about
        # alone stays of interest for eager answers (bwpredd.eager) for two
        # more updates, which a node using one pattern never carries over.
        for pattern in ("none", "batched", "per_peer"):
            progress(f"mesh: {n} peers at 1 Hz, allocations {pattern}, {seconds} s")
            _settle(d.pid, timeout_s=30)
            out[pattern] = _mesh_run(d, peers, pushes, pattern, seconds)
    with Daemon(workdir, "mesh-eager-off", {"BWPREDD_EAGER_ANSWERS": "false"}) as d:
        fill(d.address, window_batches(peers, synthetic_windows(n, seed=3)))
        progress(f"mesh: {n} peers at 1 Hz, allocations per_peer, eager_answers off, {seconds} s")
        _settle(d.pid, timeout_s=30)
        out["per_peer_eager_off"] = _mesh_run(d, peers, pushes, "per_peer", seconds)
    return out
