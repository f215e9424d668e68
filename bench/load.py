"""The bench's load generators and statistics: raw byte-level calls timed
through one client path, pipelined StreamSamples, and a pool of client
processes for mixed load.

Every call carries pre-serialized bytes, so the client does no protobuf work
and the daemon and the bare floors (:mod:`bench.floor`) are timed alike.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import multiprocessing as mp
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from bench.floor import INGEST_METHOD
from bench.harness import channel, synthetic_windows
from bwpredd._proto.bwpred.v1 import bwpred_pb2 as pb

__all__ = [
    "REGISTERED",
    "ClientPool",
    "StreamResult",
    "Target",
    "cpu_ns",
    "fill",
    "latency_summary",
    "random_batches",
    "ratio",
    "raw_unary",
    "sample_message",
    "stream_ingest",
    "summaries",
    "time_interleaved",
    "window_batches",
]

F32 = npt.NDArray[np.float32]
# The generated stubs use registered methods (a faster call path); so do the
# bench's raw byte-level calls, to the daemon and to the floors alike.
REGISTERED: dict[str, Any] = {"_registered_method": True}


# -- statistics ---------------------------------------------------------------------


def _us(ns: npt.NDArray[np.int64], q: float) -> float:
    return round(float(np.percentile(ns, q)) / 1e3, 1)


def latency_summary(ns: npt.NDArray[np.int64]) -> dict[str, float]:
    """p50/p99/mean in microseconds of per-call times in nanoseconds."""
    return {
        "n": int(ns.size),
        "p50_us": _us(ns, 50),
        "p99_us": _us(ns, 99),
        "mean_us": round(float(ns.mean()) / 1e3, 1),
    }


def ratio(a: float, b: float) -> float:
    """``a / b`` to 3 decimals (NaN when ``b`` is not positive)."""
    return round(a / b, 3) if b > 0 else float("nan")


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far (``schedstat``), ns."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


# -- payloads -----------------------------------------------------------------------


def sample_message(peer: str, row: Sequence[float]) -> pb.Sample:
    """A Sample of every feature from one window row."""
    lat, bw, loss, rel = (float(v) for v in row)
    return pb.Sample(
        peer_id=peer, latency_ms=lat, bandwidth_mbps=bw, packet_loss=loss, reliability=rel
    )


def window_batches(peers: Sequence[str], windows: F32) -> list[bytes]:
    """One StreamSamplesRequest per window row: sending them in order fills
    every peer's window with exactly ``windows`` (no timestamps: the daemon
    stamps arrival time, which keeps every batch in order)."""
    out = []
    for r in range(windows.shape[1]):
        rows = windows[:, r, :].tolist()
        req = pb.StreamSamplesRequest(
            samples=[sample_message(p, x) for p, x in zip(peers, rows, strict=True)]
        )
        out.append(req.SerializeToString())
    return out


def random_batches(
    n_batches: int, size: int, n_peers: int, prefix: str = "ing", seed: int = 1
) -> list[bytes]:
    """Batches of ``size`` samples, peers drawn with replacement from
    ``n_peers`` (a peer may appear twice in a batch, as in real traffic)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        ids = rng.integers(0, n_peers, size=size)
        rows = synthetic_windows(size, int(rng.integers(1 << 30)))[:, 0, :].tolist()
        req = pb.StreamSamplesRequest(
            samples=[
                sample_message(f"{prefix}-{i:06d}", x)
                for i, x in zip(ids.tolist(), rows, strict=True)
            ]
        )
        out.append(req.SerializeToString())
    return out


# -- calls --------------------------------------------------------------------------


def raw_unary(ch: grpc.Channel, method: str) -> Callable[[bytes], bytes]:
    """A bytes-in, bytes-out unary call: the client does no protobuf work, so
    the daemon and the floors are timed through the very same client path."""
    call = ch.unary_unary(method, **REGISTERED)
    # wait_for_ready: a connection that is slow to come up on a loaded
    # machine delays the first call instead of failing it.
    bound: Callable[[bytes], bytes] = functools.partial(call, timeout=60, wait_for_ready=True)
    return bound


# -- load generators ----------------------------------------------------------------


Target = tuple[Callable[[], object], int]  # (one call, pid of the server answering it)


def time_interleaved(
    targets: dict[str, Target], n: int, block: int, warmup: int = 50
) -> dict[str, tuple[npt.NDArray[np.int64], float]]:
    """Call every target ``n`` times, sequentially, in interleaved blocks of
    ``block`` calls so slow drifts of the machine hit all targets alike.

    Returns:
        Per target, each call's time in nanoseconds and the server's CPU
        time per call in microseconds (robust to other load on the machine).
    """
    clock = time.perf_counter_ns
    for fn, _ in targets.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[int]] = {name: [] for name in targets}
    cpu: dict[str, int] = dict.fromkeys(targets, 0)
    done = 0
    while done < n:
        k = min(block, n - done)
        for name, (fn, pid) in targets.items():
            out = times[name]
            c0 = cpu_ns(pid)
            for _ in range(k):
                t0 = clock()
                fn()
                out.append(clock() - t0)
            cpu[name] += cpu_ns(pid) - c0
        done += k
    return {
        name: (np.asarray(v, dtype=np.int64), round(cpu[name] / len(v) / 1e3, 1))
        for name, v in times.items()
    }


def summaries(times: dict[str, tuple[npt.NDArray[np.int64], float]]) -> dict[str, Any]:
    """:func:`latency_summary` and the server CPU per call of each target."""
    return {
        name: {**latency_summary(ns), "server_cpu_us": cpu} for name, (ns, cpu) in times.items()
    }


@dataclass
class StreamResult:
    """What one StreamSamples load saw."""

    batches: int
    accepted: int
    rejected: int
    seconds: float
    ack_ns: npt.NDArray[np.int64]
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "seconds": round(self.seconds, 3),
            "samples_per_s": round(self.rate),
            "ack_latency": latency_summary(self.ack_ns) if self.ack_ns.size else {},
            "server_cpu_us_per_sample": round(self.server_cpu_s / max(self.accepted, 1) * 1e6, 3),
            "server_cpu_cores": round(self.server_cpu_s / self.seconds, 2) if self.seconds else 0,
            "client_cpu_cores": round(self.client_cpu_s / self.seconds, 2) if self.seconds else 0,
        }


def stream_ingest(
    address: str,
    payloads: Sequence[bytes],
    depth: int,
    *,
    duration: float | None = None,
    total: int | None = None,
    pid: int | None = None,
) -> StreamResult:
    """Pre-serialized batches on one StreamSamples call, ``depth`` in flight.

    Args:
        address: the server.
        payloads: serialized ``StreamSamplesRequest`` s, sent in a cycle.
        depth: batches sent and not yet acked, at most.
        duration: stop sending after this many seconds, or
        total: after this many batches.
        pid: the server's, to account its CPU time.
    """
    sem = threading.Semaphore(depth)
    sent: collections.deque[int] = collections.deque()
    stop = threading.Event()
    clock = time.perf_counter_ns
    limit = total if total is not None else 1 << 62

    def requests() -> Iterator[bytes]:
        i = 0
        while i < limit:
            sem.acquire()
            if stop.is_set():
                return
            sent.append(clock())
            yield payloads[i % len(payloads)]
            i += 1

    acks: list[int] = []
    accepted = rejected = 0
    with channel(address) as ch:
        call = ch.stream_stream(
            INGEST_METHOD, response_deserializer=pb.StreamSamplesResponse.FromString, **REGISTERED
        )
        c0, p0 = (cpu_ns(pid) if pid else 0), time.process_time()
        t0 = clock()
        end = t0 + int((duration or 0) * 1e9) if duration else None
        for resp in call(requests(), timeout=600, wait_for_ready=True):
            now = clock()
            acks.append(now - sent.popleft())
            sem.release()
            accepted += resp.accepted
            rejected += resp.rejected
            if end is not None and now >= end and not stop.is_set():
                stop.set()
                sem.release()
        t1 = clock()
        server_cpu = (cpu_ns(pid) - c0) / 1e9 if pid else 0.0
        client_cpu = time.process_time() - p0
    return StreamResult(
        len(acks),
        accepted,
        rejected,
        (t1 - t0) / 1e9,
        np.asarray(acks, dtype=np.int64),
        server_cpu,
        client_cpu,
    )


def fill(address: str, payloads: Sequence[bytes], depth: int = 4) -> StreamResult:
    """Send every payload once, in order, and check all were accepted."""
    result = stream_ingest(address, payloads, depth, total=len(payloads))
    if result.rejected:
        raise RuntimeError(f"fill: {result.rejected} samples rejected")
    return result


# -- concurrency: a pool of client processes (no client GIL) -------------------------


@dataclass(frozen=True)
class Job:
    """One client's part of a concurrency run."""

    role: str  # "unary" or "ingest"
    address: str
    method: str  # the unary method (ingest always uses StreamSamples)
    payloads: list[bytes]
    start_at: float  # time.time() at which to start
    duration: float


def _run_job(job: Job) -> tuple[str, int, int, int, bytes, str]:
    clock = time.perf_counter_ns
    lat: list[int] = []
    calls = samples = rejected = 0
    error = ""
    try:
        with channel(job.address) as ch:
            if job.role == "unary":
                call = raw_unary(ch, job.method)
                for p in job.payloads[:5]:
                    call(p)
                time.sleep(max(0.0, job.start_at - time.time()))
                end = clock() + int(job.duration * 1e9)
                while True:
                    t0 = clock()
                    call(job.payloads[calls % len(job.payloads)])
                    t1 = clock()
                    lat.append(t1 - t0)
                    calls += 1
                    if t1 >= end:
                        break
            else:
                queue: collections.deque[bytes | None] = collections.deque()
                ready = threading.Semaphore(0)

                def requests() -> Iterator[bytes]:
                    while True:
                        ready.acquire()
                        item = queue.popleft()
                        if item is None:
                            return
                        yield item

                stream = ch.stream_stream(
                    INGEST_METHOD,
                    response_deserializer=pb.StreamSamplesResponse.FromString,
                    **REGISTERED,
                )
                acks = iter(stream(requests(), timeout=600, wait_for_ready=True))
                time.sleep(max(0.0, job.start_at - time.time()))
                end = clock() + int(job.duration * 1e9)
                while True:
                    t0 = clock()
                    queue.append(job.payloads[calls % len(job.payloads)])
                    ready.release()
                    resp = next(acks)
                    t1 = clock()
                    lat.append(t1 - t0)
                    samples += resp.accepted
                    rejected += resp.rejected
                    calls += 1
                    if t1 >= end:
                        break
                queue.append(None)
                ready.release()
                for _ in acks:
                    pass
    except Exception as exc:  # reported to the parent, which marks the row
        error = f"{type(exc).__name__}: {exc}"
    return job.role, calls, samples, rejected, np.asarray(lat, np.int64).tobytes(), error


def _client_worker(jobs: Any, results: Any) -> None:
    results.put("ready")
    while (job := jobs.get()) is not None:
        results.put(_run_job(job))


class ClientPool:
    """``n`` client processes (spawned once, reused by every run).

    Args:
        n: clients.
    """

    def __init__(self, n: int) -> None:
        # Forked before this process has touched gRPC (no channel yet), so
        # the children start at once and with gRPC uninitialised.
        ctx = mp.get_context("fork")
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(n)]
        self.procs = [
            ctx.Process(target=_client_worker, args=(q, self.results), daemon=True)
            for q in self.jobs
        ]
        for p in self.procs:
            p.start()
        for _ in self.procs:  # imported and waiting: spawning is not measured
            self.results.get(timeout=120)

    def close(self) -> None:
        for q in self.jobs:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()

    def mixed(
        self,
        *,
        address: str,
        pid: int,
        duration: float,
        method: str,
        unary_payloads: list[bytes],
        ingest_payloads: list[bytes],
    ) -> dict[str, Any]:
        """Half the clients stream samples (one batch in flight each), half
        call ``method`` for one peer, all at once for ``duration`` seconds."""
        n = len(self.jobs)
        start_at = time.time() + 1.5  # the workers connect and warm up first
        for i, q in enumerate(self.jobs):
            if i % 2 == 0:
                q.put(Job("ingest", address, method, ingest_payloads, start_at, duration))
            else:
                q.put(Job("unary", address, method, unary_payloads[i::n], start_at, duration))
        time.sleep(max(0.0, start_at - time.time()))
        cpu0 = cpu_ns(pid)
        out = [self.results.get(timeout=duration + 120) for _ in self.jobs]
        cpu = (cpu_ns(pid) - cpu0) / 1e9
        errors = [e for *_, e in out if e]
        lat: dict[str, list[npt.NDArray[np.int64]]] = {"unary": [], "ingest": []}
        calls = {"unary": 0, "ingest": 0}
        samples = rejected = 0
        for role, k, s, r, blob, _ in out:
            lat[role].append(np.frombuffer(blob, dtype=np.int64))
            calls[role] += k
            samples += s
            rejected += r
        ul, il = (np.concatenate(lat[r]) for r in ("unary", "ingest"))
        return {
            "clients": n,
            "ingest_clients": (n + 1) // 2,
            "ingest_batch_samples": len(
                pb.StreamSamplesRequest.FromString(ingest_payloads[0]).samples
            ),
            "seconds": duration,
            "rpcs_per_s": round((calls["unary"] + calls["ingest"]) / duration),
            "unary_per_s": round(calls["unary"] / duration),
            "ingest_acks_per_s": round(calls["ingest"] / duration),
            "samples_per_s": round(samples / duration),
            "rejected": rejected,
            "server_cpu_cores": round(cpu / duration, 2),
            "unary_latency": latency_summary(ul) if ul.size else {},
            "ingest_ack_latency": latency_summary(il) if il.size else {},
            "errors": errors,
        }
