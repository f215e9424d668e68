"""``make bench``: measure the daemon against the floor of its own stack.

Every figure is a rate, or a ratio against a baseline measured in the same
run (these machines are noisy): the daemon runs as a separate process on a
unix socket with its production defaults (metrics on, one log line per RPC)
unless a row says otherwise, next to bare grpcio servers (sync and asyncio,
:mod:`bwpredd._bench_floor`) and a raw onnxruntime session in this process.
All processes are pinned to the same cores. The results go to
``<out>/bench.json`` (machine, figures, targets, pass/fail) and
``<out>/bench.md`` (a markdown table with the command that produced it).

``python -m bwpredd.bench [--quick] [--out DIR] [--only SECTIONS]
[--profile DIR]``; ``--profile`` records the daemon with py-spy under a
Forecast load and under the ingest load (numbers from a profiled run are
perturbed and are not written as results).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import importlib
import json
import multiprocessing as mp
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bwpredd._bench_floor import ECHO_METHOD, INGEST_METHOD, echo_request
from bwpredd._proto.bwpred.v1 import bwpred_pb2 as pb

__all__ = ["SECTIONS", "Plan", "main", "run", "summarize_profile"]

SERVICE = "bwpred.v1.BandwidthPredictorService"
FORECAST = f"/{SERVICE}/Forecast"
ALLOCATE = f"/{SERVICE}/Allocate"
WATCH = f"/{SERVICE}/WatchForecasts"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
MEMORY_TARGET = "RSS with full windows - empty"
SECTIONS = (
    "onnx",
    "startup",
    "latency",
    "batch",
    "ingest",
    "watchers",
    "concurrency",
    "memory",
    "threads",
)
MODEL = pb.FORECAST_SOURCE_MODEL
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
_T0 = time.perf_counter()
# The generated stubs use registered methods (a faster call path); so do the
# bench's raw byte-level calls, to the daemon and to the floors alike.
_REGISTERED: dict[str, Any] = {"_registered_method": True}
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 10),
    ("grpc.min_reconnect_backoff_ms", 10),
    ("grpc.max_reconnect_backoff_ms", 100),
]


@dataclass(frozen=True)
class Plan:
    """Sizes and durations of one run (full or ``--quick``)."""

    latency_calls: int
    variant_calls: int  # latency calls of the log-off and ort_threads=2 daemons
    batch_reps: int
    ingest_s: float
    floor_ingest_s: float
    concurrency_s: float
    startups: int
    torch_reps_1: int
    torch_reps_1000: int
    memory_peers: int = 100_000
    batch_peers: int = 1_000
    ingest_peers: int = 10_000
    ingest_batch: int = 1_000
    ingest_depth: int = 4
    clients: int = 16
    watchers: int = 1_000  # idle watch-all WatchForecasts streams in the watchers row
    # Full runs also load the log-off daemon and the sync floor with clients.
    every_variant: bool = True

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:  # a smoke test of every section, not a measurement
            return cls(
                300,
                200,
                6,
                2.0,
                1.0,
                2.0,
                2,
                50,
                3,
                memory_peers=20_000,
                clients=4,
                every_variant=False,
            )
        return cls(3000, 1000, 30, 10.0, 5.0, 10.0, 5, 300, 10)


def progress(message: str) -> None:
    """One progress line on stderr, stamped with the bench's elapsed time."""
    print(f"[{time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


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


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b > 0 else float("nan")


# -- machine ------------------------------------------------------------------------


def machine_info(cores: Sequence[int]) -> dict[str, Any]:
    """CPU model, core counts and the versions that matter."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import google.protobuf
    import onnxruntime
    from google.protobuf.internal import api_implementation

    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "cores_used": list(cores),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": f"{google.protobuf.__version__} ({api_implementation.Type()})",
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far (``schedstat``), ns."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


# -- data ---------------------------------------------------------------------------


def realistic_windows(n: int, seed: int = 0) -> F32:
    """``[n, 10, 4]`` plausible windows, 1 Mbit/s .. 10 Gbit/s, exactly
    representable as float32 so what the daemon stores equals this array."""
    rng = np.random.default_rng(seed)
    w = np.empty((n, 10, 4), dtype=np.float32)
    level = np.exp(rng.uniform(np.log(1.0), np.log(10_000.0), size=(n, 1)))
    walk = np.cumsum(rng.normal(0.0, 0.1, size=(n, 10)), axis=1)
    w[:, :, 0] = rng.uniform(0.2, 150.0, size=(n, 1)) * rng.uniform(0.9, 1.1, size=(n, 10))
    w[:, :, 1] = level * np.exp(walk)
    w[:, :, 2] = rng.uniform(0.0, 0.02, size=(n, 10))
    w[:, :, 3] = rng.uniform(0.95, 1.0, size=(n, 10))
    return w


def _sample(peer: str, row: Sequence[float]) -> pb.Sample:
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
            samples=[_sample(p, x) for p, x in zip(peers, rows, strict=True)]
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
        rows = realistic_windows(size, int(rng.integers(1 << 30)))[:, 0, :].tolist()
        req = pb.StreamSamplesRequest(
            samples=[
                _sample(f"{prefix}-{i:06d}", x) for i, x in zip(ids.tolist(), rows, strict=True)
            ]
        )
        out.append(req.SerializeToString())
    return out


# -- processes ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _health(address: str, service: str, deadline: float) -> None:
    """Wait until ``service`` is SERVING at ``address``."""
    with grpc.insecure_channel(address, options=_CHANNEL_OPTIONS) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        req = health_pb2.HealthCheckRequest(service=service)
        while True:
            try:
                resp = stub.Check(req, timeout=0.5, wait_for_ready=True)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address}: {service} not SERVING")
            time.sleep(0.005)


class Daemon:
    """``python -m bwpredd`` as a child process on a unix socket.

    Args:
        workdir: where the socket and the log go.
        name: names the socket and log files.
        env: ``BWPREDD_*`` settings over the production defaults (the bench
            only sets ``BWPREDD_LISTEN`` and a free ``BWPREDD_METRICS_ADDR``).
    """

    def __init__(self, workdir: Path, name: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.socket = workdir / name / "bwpredd.sock"
        self.address = f"unix:{self.socket}"
        self.log_path = workdir / f"{name}.log"
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("BWPREDD_") and k not in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY")
        }
        self.env.update(
            {
                "BWPREDD_LISTEN": self.address,
                "BWPREDD_METRICS_ADDR": f"127.0.0.1:{_free_port()}",
                **(env or {}),
            }
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> float:
        """Start and wait for health SERVING; return the seconds it took."""
        with self.log_path.open("ab") as log:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bwpredd"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            _health(self.address, SERVICE, time.monotonic() + timeout)
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"daemon {self.name} did not start; log: {self.log_path.read_text()[-2000:]}"
            ) from None
        self.startup_s = time.perf_counter() - t0
        return self.startup_s

    def rss_kb(self) -> int:
        return _rss_kb(self.pid)

    def startup_ms_logged(self) -> float | None:
        """The daemon's own ``startup_ms`` (model load to serving) from its log."""
        for line in reversed(self.log_path.read_text(errors="replace").splitlines()):
            if '"started"' in line:
                with contextlib.suppress(ValueError):
                    value = json.loads(line).get("startup_ms")
                    return float(value) if value is not None else None
        return None

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc, grace_s=15)

    def __enter__(self) -> Daemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Floor:
    """A bare grpcio server (:mod:`bwpredd._bench_floor`) as a child process.

    Args:
        workdir: where the socket goes.
        kind: ``sync`` (thread pool) or ``aio`` (asyncio).
    """

    def __init__(self, workdir: Path, kind: str) -> None:
        self.kind = kind
        self.address = f"unix:{workdir / f'floor-{kind}.sock'}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bwpredd._bench_floor", kind, self.address],
            stdout=subprocess.DEVNULL,
        )
        with grpc.insecure_channel(self.address, options=_CHANNEL_OPTIONS) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)

    def stop(self) -> None:
        _terminate(self.proc, grace_s=10)


def _terminate(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM a child still running; SIGKILL it if it outlives ``grace_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)


def raw_unary(channel: grpc.Channel, method: str) -> Callable[[bytes], bytes]:
    """A bytes-in, bytes-out unary call: the client does no protobuf work, so
    the daemon and the floors are timed through the very same client path."""
    call = channel.unary_unary(method, **_REGISTERED)
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
            c0 = _cpu_ns(pid)
            for _ in range(k):
                t0 = clock()
                fn()
                out.append(clock() - t0)
            cpu[name] += _cpu_ns(pid) - c0
        done += k
    return {
        name: (np.asarray(v, dtype=np.int64), round(cpu[name] / len(v) / 1e3, 1))
        for name, v in times.items()
    }


def _summaries(times: dict[str, tuple[npt.NDArray[np.int64], float]]) -> dict[str, Any]:
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
    with _channel(address) as channel:
        call = channel.stream_stream(
            INGEST_METHOD, response_deserializer=pb.StreamSamplesResponse.FromString, **_REGISTERED
        )
        c0, p0 = (_cpu_ns(pid) if pid else 0), time.process_time()
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
        server_cpu = (_cpu_ns(pid) - c0) / 1e9 if pid else 0.0
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
        with _channel(job.address) as channel:
            if job.role == "unary":
                call = raw_unary(channel, job.method)
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

                stream = channel.stream_stream(
                    INGEST_METHOD,
                    response_deserializer=pb.StreamSamplesResponse.FromString,
                    **_REGISTERED,
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
        cpu0 = _cpu_ns(pid)
        out = [self.results.get(timeout=duration + 120) for _ in self.jobs]
        cpu = (_cpu_ns(pid) - cpu0) / 1e9
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


# -- why ONNX (a child process: torch stays out of the daemon's runs) -----------------


def _onnx_vs_torch_worker(threads: int, reps_1: int, reps_1000: int, results: Any) -> None:
    try:
        results.put(_onnx_vs_torch(threads, reps_1, reps_1000))
    except Exception as exc:
        results.put({"error": f"{type(exc).__name__}: {exc}"})


def _time_fn(fn: Callable[[], object], reps: int, warmup: int) -> npt.NDArray[np.int64]:
    for _ in range(warmup):
        fn()
    out = np.empty(reps, dtype=np.int64)
    for i in range(reps):
        t0 = time.perf_counter_ns()
        fn()
        out[i] = time.perf_counter_ns() - t0
    return out


def _onnx_vs_torch(threads: int, reps_1: int, reps_1000: int) -> dict[str, Any]:
    from bwpredd.manifest import FORECASTER_INPUT, FORECASTER_OUTPUTS
    from bwpredd.modeldir import DEFAULT_MODEL_DIR, load_model

    pid = os.getpid()
    base_kb = _rss_kb(pid)
    t0 = time.perf_counter()
    model = load_model(DEFAULT_MODEL_DIR, threads)
    ort_load_s = time.perf_counter() - t0
    ort_kb = _rss_kb(pid)
    t0 = time.perf_counter()
    try:
        torch = importlib.import_module("torch")
        onnx = importlib.import_module("onnx")
        fmod = importlib.import_module("trainer.models.forecaster")
    except ImportError as exc:
        return {"skipped": f"torch or trainer not importable ({exc}); install the train extra"}
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # As many networks as the shipped graph holds (each has one LSTM node
    # per layer), so both sides compute the same thing.
    graph = onnx.load(str(DEFAULT_MODEL_DIR / model.manifest.forecaster.file))
    layers = len(fmod.ForecasterConfig().lstm_sizes)
    lstms = sum(node.op_type == "LSTM" for node in graph.graph.node)
    cfg = fmod.ForecasterConfig(residual=True, members=max(1, lstms // layers))
    net = fmod.Forecaster(cfg).eval()
    torch_load_s = time.perf_counter() - t0
    torch_kb = _rss_kb(pid)
    windows = realistic_windows(1000, seed=7)
    names = list(FORECASTER_OUTPUTS)
    out: dict[str, Any] = {
        "threads": threads,
        "architecture": str(cfg),
        "ort_import_and_load_s": round(ort_load_s, 3),
        "torch_import_and_build_s": round(torch_load_s, 3),
        "ort_rss_mb": round((ort_kb - base_kb) / 1024, 1),
        "torch_extra_rss_mb": round((torch_kb - ort_kb) / 1024, 1),
    }
    for batch, reps in ((1, reps_1), (1000, reps_1000)):
        w = np.ascontiguousarray(windows[:batch])
        tw = torch.from_numpy(w)
        sess = model.forecaster

        def ort_run(sess: Any = sess, w: F32 = w) -> object:
            return sess.run(names, {FORECASTER_INPUT: w})

        def torch_run(tw: Any = tw) -> object:
            with torch.inference_mode():
                return net(tw)

        o = _time_fn(ort_run, reps, warmup=max(3, reps // 10))
        t = _time_fn(torch_run, reps, warmup=max(3, reps // 10))
        out[f"batch_{batch}"] = {
            "onnxruntime": latency_summary(o),
            "torch_eager": latency_summary(t),
            "torch_over_ort_p50": _ratio(float(np.median(t)), float(np.median(o))),
        }
    return out


def onnx_vs_torch(threads: int, reps_1: int, reps_1000: int) -> dict[str, Any]:
    """Forecaster through onnxruntime vs torch eager, in a spawned child."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    p = ctx.Process(target=_onnx_vs_torch_worker, args=(threads, reps_1, reps_1000, results))
    p.start()
    out: dict[str, Any] = results.get(timeout=300)
    p.join(timeout=30)
    return out


# -- profiling ----------------------------------------------------------------------


_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m.group('fn')} ({path})"


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Top frames of a py-spy ``--format raw`` (collapsed stacks) file.

    Args:
        path: the collapsed-stack file.
        top: rows per table.

    Returns:
        ``{"samples", "self": [(frame, share)], "inclusive": [(frame, share)]}``
        with shares of all samples; frames keyed by function and file.
    """
    self_n: collections.Counter[str] = collections.Counter()
    incl_n: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_name(f) for f in stack.split(";")]
        total += n
        self_n[frames[-1]] += n
        for f in set(frames):
            incl_n[f] += n

    def rows(c: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(k / total, 4)) for f, k in c.most_common(top)] if total else []

    return {"samples": total, "self": rows(self_n), "inclusive": rows(incl_n)}


@contextlib.contextmanager
def py_spy(pid: int, out: Path | None, name: str) -> Iterator[None]:
    """Record ``pid`` with py-spy (collapsed stacks) while the block runs."""
    if out is None:
        yield
        return
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"{name}.txt"
    proc = subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        if raw.exists():
            summary = summarize_profile(raw)
            (out / f"{name}.summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            progress(f"profile {name}: {summary['samples']} samples -> {raw}")


# -- the sections -------------------------------------------------------------------


@dataclass
class Fixture:
    """What every daemon instance is loaded with before it is measured."""

    batch_peers: list[str]
    batch_windows: F32
    batch_fill: list[bytes]
    ingest_load: list[bytes]
    conc_ingest: list[bytes]
    forecast_one: list[bytes]  # one ForecastRequest per batch peer

    @classmethod
    def make(cls, plan: Plan) -> Fixture:
        peers = [f"batch-{i:04d}" for i in range(plan.batch_peers)]
        windows = realistic_windows(plan.batch_peers)
        return cls(
            batch_peers=peers,
            batch_windows=windows,
            batch_fill=window_batches(peers, windows),
            ingest_load=random_batches(24, plan.ingest_batch, plan.ingest_peers, seed=1),
            conc_ingest=random_batches(40, 100, plan.ingest_peers, seed=2),
            forecast_one=[pb.ForecastRequest(peer_ids=[p]).SerializeToString() for p in peers],
        )


def _check_model_sources(raw: bytes, expected: int) -> int:
    resp = pb.ForecastResponse.FromString(raw)
    got = sum(1 for f in resp.forecasts if f.source == MODEL)
    if len(resp.forecasts) != expected:
        raise RuntimeError(f"Forecast answered {len(resp.forecasts)} peers, not {expected}")
    return got


def latency_section(
    daemon: Daemon, floors: dict[str, Floor], fx: Fixture, calls: int
) -> dict[str, Any]:
    """Forecast and Allocate for one peer vs bare echoes of the same sizes."""
    peer = fx.batch_peers[0]
    with _channel(daemon.address) as dch:
        fc = raw_unary(dch, FORECAST)
        al = raw_unary(dch, ALLOCATE)
        fc_req = pb.ForecastRequest(peer_ids=[peer]).SerializeToString()
        al_req = pb.AllocateRequest(peer_ids=[peer]).SerializeToString()
        fc_resp, al_resp = fc(fc_req), al(al_req)
        if _check_model_sources(fc_resp, 1) != 1:
            raise RuntimeError("latency: the peer is not answered by the MODEL")
        if pb.AllocateResponse.FromString(al_resp).allocations[0].source != MODEL:
            raise RuntimeError("latency: the allocation is not from the MODEL")
        hc = raw_unary(dch, HEALTH_CHECK)
        hc_req = health_pb2.HealthCheckRequest(service="").SerializeToString()
        cold_req = pb.ForecastRequest(peer_ids=[COLD_PEER]).SerializeToString()
        targets: dict[str, Target] = {
            "forecast": (lambda: fc(fc_req), daemon.pid),
            "allocate": (lambda: al(al_req), daemon.pid),
            # The daemon's own server answering its cheapest RPC: what the
            # grpc.aio stack costs in this process before any handler work.
            "daemon_health_check": (lambda: hc(hc_req), daemon.pid),
            # A cold-start peer: the whole Forecast path minus the model.
            "forecast_cold_start": (lambda: fc(cold_req), daemon.pid),
        }
        channels = []
        for kind, floor in floors.items():
            ch = _channel(floor.address)
            channels.append(ch)
            echo = raw_unary(ch, ECHO_METHOD)
            fe = echo_request(len(fc_req), len(fc_resp))
            ae = echo_request(len(al_req), len(al_resp))
            pid = floor.proc.pid
            targets[f"echo_{kind}_forecast_size"] = (functools.partial(echo, fe), pid)
            targets[f"echo_{kind}_allocate_size"] = (functools.partial(echo, ae), pid)
        try:
            times = time_interleaved(targets, calls, block=100)
        finally:
            for ch in channels:
                ch.close()
    out: dict[str, Any] = {
        "calls": calls,
        "bytes": {
            "forecast": [len(fc_req), len(fc_resp)],
            "allocate": [len(al_req), len(al_resp)],
        },
    }
    out.update(_summaries(times))
    fresh = pb.ForecastRequest(peer_ids=[FRESH_PEER]).SerializeToString()
    fresh_al = pb.AllocateRequest(peer_ids=[FRESH_PEER]).SerializeToString()
    out["fresh"] = _fresh_latency(
        daemon,
        floors["aio"],
        {
            "forecast": (FORECAST, fresh, len(fc_resp)),
            "allocate": (ALLOCATE, fresh_al, len(al_resp)),
        },
        max(50, calls // 3),
    )
    for rpc in ("forecast", "allocate"):
        floors_p50 = {k: out[f"echo_{k}_{rpc}_size"]["p50_us"] for k in floors}
        best = min(floors_p50, key=lambda k: floors_p50[k])
        out[f"{rpc}_floor"] = best
        out[f"{rpc}_p50_ratio"] = _ratio(out[rpc]["p50_us"], floors_p50[best])
        out[f"{rpc}_p99_ratio"] = _ratio(
            out[rpc]["p99_us"], out[f"echo_{best}_{rpc}_size"]["p99_us"]
        )
        out[f"{rpc}_p50_overhead_us"] = round(out[rpc]["p50_us"] - floors_p50[best], 1)
        floor_cpu = out[f"echo_{best}_{rpc}_size"]["server_cpu_us"]
        out[f"{rpc}_server_cpu_ratio"] = _ratio(out[rpc]["server_cpu_us"], floor_cpu)
        out[f"{rpc}_handler_cpu_us"] = round(
            out[rpc]["server_cpu_us"] - out["daemon_health_check"]["server_cpu_us"], 1
        )
    return out


def _fresh_latency(
    daemon: Daemon,
    floor: Floor,
    rpcs: dict[str, tuple[str, bytes, int]],
    calls: int,
) -> dict[str, Any]:
    """Forecast and Allocate right after a new sample for the peer: no cached
    answer, the model runs. Each timed call follows an untimed PushSamples and
    is paired with an echo of the same sizes, timed alongside.

    Args:
        rpcs: per name, ``(method, request bytes, reply size)``.
    """
    pushes = [
        pb.PushSamplesRequest(
            samples=[pb.Sample(peer_id=FRESH_PEER, bandwidth_mbps=50.0 + (i % 97), latency_ms=20.0)]
        ).SerializeToString()
        for i in range(calls + 10)
    ]
    clock = time.perf_counter_ns
    out: dict[str, Any] = {}
    with _channel(daemon.address) as dch, _channel(floor.address) as ech:
        push = raw_unary(dch, f"/{SERVICE}/PushSamples")
        for raw in pushes[calls:]:  # a full window: the model answers
            push(raw)
        echo = raw_unary(ech, ECHO_METHOD)
        for rpc, (method, req, size) in rpcs.items():
            call = raw_unary(dch, method)
            echo_req = echo_request(len(req), size)
            own: list[int] = []
            floor_ns: list[int] = []
            for i in range(calls):
                push(pushes[i])
                t0 = clock()
                call(req)
                t1 = clock()
                echo(echo_req)
                floor_ns.append(clock() - t1)
                own.append(t1 - t0)
            mine = latency_summary(np.asarray(own, dtype=np.int64))
            base = latency_summary(np.asarray(floor_ns, dtype=np.int64))
            out[rpc] = {**mine, "echo_p50_us": base["p50_us"]}
            out[f"{rpc}_p50_ratio"] = _ratio(mine["p50_us"], base["p50_us"])
    return out


def raw_model(threads: int) -> Any:
    """The embedded default model, loaded exactly as the daemon loads it."""
    from bwpredd.modeldir import DEFAULT_MODEL_DIR, load_model

    return load_model(DEFAULT_MODEL_DIR, threads)


def batch_section(
    daemon: Daemon, floors: dict[str, Floor], fx: Fixture, plan: Plan, threads: int
) -> dict[str, Any]:
    """Forecast for every batch peer in one call vs raw onnxruntime on the same
    windows in this process (same session options: the daemon's own loader)."""
    from bwpredd.manifest import FORECASTER_INPUT, FORECASTER_OUTPUTS

    model = raw_model(threads)
    sess = model.forecaster
    names = list(FORECASTER_OUTPUTS)
    windows = np.ascontiguousarray(fx.batch_windows)
    req = pb.ForecastRequest(peer_ids=fx.batch_peers).SerializeToString()
    with _channel(daemon.address) as dch:
        fc = raw_unary(dch, FORECAST)
        resp = fc(req)
        n_model = _check_model_sources(resp, len(fx.batch_peers))
        parsed = pb.ForecastResponse.FromString(resp)
        mine = sess.run(names, {FORECASTER_INPUT: windows})[0][:, 0]
        theirs = np.array([f.bandwidth_mbps for f in parsed.forecasts])
        parity = float(np.max(np.abs(theirs - mine) / np.maximum(np.abs(mine), 1e-3)))
        targets: dict[str, Target] = {
            "daemon_rpc": (lambda: fc(req), daemon.pid),
            "raw_onnxruntime": (lambda: sess.run(names, {FORECASTER_INPUT: windows}), os.getpid()),
        }
        channels = []
        for kind, floor in floors.items():
            ch = _channel(floor.address)
            channels.append(ch)
            echo = raw_unary(ch, ECHO_METHOD)
            payload = echo_request(len(req), len(resp))
            targets[f"echo_{kind}_same_size"] = (
                functools.partial(echo, payload),
                floor.proc.pid,
            )
        try:
            times = time_interleaved(targets, plan.batch_reps, block=5, warmup=3)
        finally:
            for ch in channels:
                ch.close()
    out: dict[str, Any] = {
        "peers": len(fx.batch_peers),
        "ort_threads": threads,
        "reps": plan.batch_reps,
        "bytes": [len(req), len(resp)],
        "model_sourced": n_model,
        "max_rel_diff_vs_raw": parity,
    }
    out.update(_summaries(times))
    raw = out["raw_onnxruntime"]["p50_us"]
    out["ratio_p50"] = _ratio(out["daemon_rpc"]["p50_us"], raw)
    best_echo = min(out[f"echo_{k}_same_size"]["p50_us"] for k in floors)
    out["rpc_floor_p50_us"] = best_echo
    out["daemon_minus_raw_minus_rpc_floor_us"] = round(
        out["daemon_rpc"]["p50_us"] - raw - best_echo, 1
    )
    out["server_cpu_ratio"] = _ratio(
        out["daemon_rpc"]["server_cpu_us"], out["raw_onnxruntime"]["server_cpu_us"]
    )
    return out


def ingest_section(
    daemon: Daemon | None, floors: dict[str, Floor], fx: Fixture, plan: Plan
) -> dict[str, Any]:
    """StreamSamples, 1,000-sample batches over 10,000 peers, pipelined."""
    out: dict[str, Any] = {
        "batch_samples": plan.ingest_batch,
        "peers": plan.ingest_peers,
        "depth": plan.ingest_depth,
    }
    for kind, floor in floors.items():
        progress(f"ingest: minimal {kind} server, {plan.floor_ingest_s:g} s")
        r = stream_ingest(
            floor.address,
            fx.ingest_load,
            plan.ingest_depth,
            duration=plan.floor_ingest_s,
            pid=floor.proc.pid,
        )
        out[f"floor_{kind}"] = r.as_dict()
    if daemon is not None:
        progress(f"ingest: daemon, {plan.ingest_s:g} s")
        r = stream_ingest(
            daemon.address,
            fx.ingest_load,
            plan.ingest_depth,
            duration=plan.ingest_s,
            pid=daemon.pid,
        )
        out["daemon"] = r.as_dict()
        out["all_accepted"] = r.rejected == 0 and r.accepted == r.batches * plan.ingest_batch
        best = max(out[f"floor_{k}"]["samples_per_s"] for k in floors) if floors else 0
        out["daemon_over_best_floor"] = _ratio(r.rate, best)
        cheapest = min(out[f"floor_{k}"]["server_cpu_us_per_sample"] for k in floors)
        out["daemon_cpu_per_sample_over_floor"] = _ratio(
            out["daemon"]["server_cpu_us_per_sample"], cheapest
        )
    return out


def _gauge(d: Daemon, name: str) -> float:
    """One unlabelled sample of the daemon's /metrics."""
    import urllib.request

    url = f"http://{d.env['BWPREDD_METRICS_ADDR']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


def _settle(pid: int, timeout_s: float = 300.0) -> float:
    """Wait until the daemon's CPU use falls under 5% of a core over 1 s;
    return the seconds it took."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        c0 = _cpu_ns(pid)
        time.sleep(1.0)
        if _cpu_ns(pid) - c0 < 0.05e9:
            break
    return time.perf_counter() - t0


def watchers_section(workdir: Path, fx: Fixture, plan: Plan) -> dict[str, Any]:
    """The ingest load on a daemon with ``plan.watchers`` watch-all
    WatchForecasts streams open that never read, against the same load on
    the same daemon before they opened (the daemon allows that many
    watchers; its defaults refuse them)."""
    n = plan.watchers
    env = {"BWPREDD_MAX_WATCHERS": str(n), "BWPREDD_MAX_WATCHERS_PER_PEER": str(n)}
    out: dict[str, Any] = {"watchers": n, "peers": plan.ingest_peers}
    with Daemon(workdir, "watchers", env) as d:
        fill(d.address, fx.ingest_load)
        progress(f"watchers: plain ingest, {plan.ingest_s:g} s")
        plain = stream_ingest(
            d.address, fx.ingest_load, plan.ingest_depth, duration=plan.ingest_s, pid=d.pid
        )
        rss_before = d.rss_kb()
        progress(f"watchers: opening {n} watch-all streams that never read")
        # Without BDP probing the client's windows stay at 64 KiB, so each
        # stream stops the daemon after ~1,000 forecasts instead of ~60,000.
        options = [*_CHANNEL_OPTIONS, ("grpc.http2.bdp_probe", 0)]
        with grpc.insecure_channel(d.address, options=options) as ch:
            call = ch.unary_stream(WATCH, **_REGISTERED)
            request = pb.WatchForecastsRequest().SerializeToString()
            # In waves: each new watcher first sends its ~1,000 forecasts,
            # and a call the daemon has not taken up within 30 s is cancelled
            # (grpc.server_max_unrequested_time_in_server).
            calls: list[Any] = []
            t0 = time.perf_counter()
            while len(calls) < n:
                calls += [call(request, timeout=3600) for _ in range(min(50, n - len(calls)))]
                deadline = time.monotonic() + 60
                while _gauge(d, "bwpredd_watchers") < len(calls) and time.monotonic() < deadline:
                    if any(c.done() for c in calls):  # refused or failed
                        break
                    time.sleep(0.2)
            out["settle_s"] = round(time.perf_counter() - t0 + _settle(d.pid), 1)
            out["watchers_open"] = int(_gauge(d, "bwpredd_watchers"))
            out["watchers_failed"] = sorted({c.code().name for c in calls if c.done()})
            rss_open = d.rss_kb()
            progress(f"watchers: ingest with {out['watchers_open']} open, {plan.ingest_s:g} s")
            watched = stream_ingest(
                d.address, fx.ingest_load, plan.ingest_depth, duration=plan.ingest_s, pid=d.pid
            )
            rss_after = d.rss_kb()
            for c in calls:
                c.cancel()
    out["plain"] = plain.as_dict()
    out["watched"] = watched.as_dict()
    out["all_accepted"] = not plain.rejected and not watched.rejected
    out["ratio"] = _ratio(watched.rate, plain.rate)
    out["cpu_per_sample_ratio"] = _ratio(
        out["watched"]["server_cpu_us_per_sample"], out["plain"]["server_cpu_us_per_sample"]
    )
    out["rss_before_mb"] = round(rss_before / 1024, 1)
    out["rss_watchers_open_mb"] = round((rss_open - rss_before) / 1024, 1)
    out["rss_after_ingest_mb"] = round((rss_after - rss_before) / 1024, 1)
    return out


def memory_section(workdir: Path, plan: Plan) -> dict[str, Any]:
    """RSS of a daemon with ``memory_peers`` full windows over the same
    daemon empty (VmRSS from /proc)."""
    n = plan.memory_peers
    peers = [f"mem-{i:06d}" for i in range(n)]
    block = 1000
    blocks = [
        pb.StreamSamplesRequest(
            samples=[_sample(p, (20.0, 100.0 + i % 7, 0.001, 0.99)) for i, p in enumerate(chunk)]
        ).SerializeToString()
        for chunk in (peers[i : i + block] for i in range(0, n, block))
    ]
    with Daemon(workdir, "memory") as d:
        time.sleep(0.5)
        empty = d.rss_kb()
        payloads = [b for _ in range(10) for b in blocks]  # 10 samples per peer
        r = fill(d.address, payloads)
        time.sleep(0.5)
        full = d.rss_kb()
        with _channel(d.address) as ch:
            fc = raw_unary(ch, FORECAST)
            resp = pb.ForecastResponse.FromString(
                fc(pb.ForecastRequest(peer_ids=[peers[0], peers[-1]]).SerializeToString())
            )
            windows_full = all(f.samples_in_window == 10 for f in resp.forecasts)
    return {
        "peers": n,
        "samples": r.accepted,
        "windows_full": windows_full,
        "rss_empty_mb": round(empty / 1024, 1),
        "rss_full_mb": round(full / 1024, 1),
        "delta_mb": round((full - empty) / 1024, 1),
        "fill_samples_per_s": round(r.rate),
    }


def startup_section(workdir: Path, plan: Plan) -> dict[str, Any]:
    """Process start to Health SERVING (the service, not just the server)."""
    times, own = [], []
    for i in range(plan.startups):
        d = Daemon(workdir, f"startup-{i}")
        try:
            times.append(d.start())
            own.append(d.startup_ms_logged())
        finally:
            d.stop()
    logged = [x for x in own if x is not None]
    return {
        "runs": [round(t, 3) for t in times],
        "median_s": round(float(np.median(times)), 3),
        "daemon_startup_ms_median": round(float(np.median(logged)), 1) if logged else None,
        "note": "daemon_startup_ms: the daemon's own startup() (model load to serving); "
        "the rest is interpreter start and imports",
    }


COLD_PEER = "cold-0"  # one sample: answered by the baseline, no model run
FRESH_PEER = "fresh-0"  # gets a new sample before each timed call


def _fill_daemon(d: Daemon, fx: Fixture) -> None:
    fill(d.address, fx.batch_fill)
    cold = pb.StreamSamplesRequest(samples=[_sample(COLD_PEER, (20.0, 100.0, 0.0, 1.0))])
    fill(d.address, [cold.SerializeToString()])


# -- the run ------------------------------------------------------------------------


def _target(name: str, value: float, op: str, limit: float, unit: str) -> dict[str, Any]:
    ok = value <= limit if op == "<=" else value >= limit
    return {"name": name, "value": value, "op": op, "target": limit, "unit": unit, "pass": ok}


def run(plan: Plan, sections: Sequence[str], profile: Path | None = None) -> dict[str, Any]:
    """Run the chosen sections; return everything measured."""
    res: dict[str, Any] = {}
    fx = Fixture.make(plan)
    pool: ClientPool | None = None
    if "concurrency" in sections and profile is None:
        progress(f"concurrency: forking {plan.clients} client processes")
        pool = ClientPool(plan.clients)
    with tempfile.TemporaryDirectory(prefix="bwbench-") as tmp, contextlib.ExitStack() as stack:
        if pool is not None:
            stack.callback(pool.close)
        work = Path(tmp)
        if profile is not None:
            _profile_runs(work, fx, plan, profile)
            return res
        if "onnx" in sections:
            progress("why ONNX: onnxruntime vs torch eager (child process)")
            res["onnx_vs_torch"] = onnx_vs_torch(1, plan.torch_reps_1, plan.torch_reps_1000)
        if "startup" in sections:
            progress(f"start-up: {plan.startups} starts")
            res["startup"] = startup_section(work, plan)
        if "memory" in sections:
            progress(f"memory: {plan.memory_peers} peers x 10 samples")
            res["memory"] = memory_section(work, plan)
        if "watchers" in sections:
            res["watchers"] = watchers_section(work, fx, plan)
        floors: dict[str, Floor] = {}
        try:
            progress("floors: sync and asyncio bare servers")
            floors = {k: Floor(work, k) for k in ("sync", "aio")}
            _daemon_runs(work, floors, pool=pool, fx=fx, plan=plan, sections=sections, res=res)
        finally:
            for f in floors.values():
                f.stop()
    return res


def _daemon_runs(
    work: Path,
    floors: dict[str, Floor],
    *,
    pool: ClientPool | None,
    fx: Fixture,
    plan: Plan,
    sections: Sequence[str],
    res: dict[str, Any],
) -> None:
    def mixed(address: str, pid: int, method: str, payloads: list[bytes]) -> dict[str, Any]:
        assert pool is not None
        return pool.mixed(
            address=address,
            pid=pid,
            duration=plan.concurrency_s,
            method=method,
            unary_payloads=payloads,
            ingest_payloads=fx.conc_ingest,
        )

    if {"latency", "batch", "ingest", "concurrency"} & set(sections):
        with Daemon(work, "defaults") as d:
            progress(f"daemon (defaults: log_rpcs on, ort_threads 1) pid {d.pid}")
            _fill_daemon(d, fx)
            if "latency" in sections:
                progress(f"latency: {plan.latency_calls} calls per target")
                res["latency"] = latency_section(d, floors, fx, plan.latency_calls)
            if "batch" in sections:
                progress(f"batch: Forecast x{plan.batch_peers} peers, {plan.batch_reps} calls")
                res["batch"] = batch_section(d, floors, fx, plan, threads=1)
            if "ingest" in sections:
                res["ingest"] = ingest_section(d, floors, fx, plan)
            if pool is not None:
                progress(f"concurrency: daemon, {plan.concurrency_s:g} s")
                res["concurrency"] = mixed(d.address, d.pid, FORECAST, fx.forecast_one)
                with _channel(d.address) as ch:
                    reply = len(raw_unary(ch, FORECAST)(fx.forecast_one[0]))
                echo = [echo_request(len(fx.forecast_one[0]), reply)]
                for kind, floor in floors.items():
                    if kind == "sync" and not plan.every_variant:
                        continue
                    progress(f"concurrency: {kind} floor (echo + minimal ingest)")
                    res[f"concurrency_floor_{kind}"] = mixed(
                        floor.address, floor.proc.pid, ECHO_METHOD, echo * plan.clients
                    )
    if plan.every_variant and {"latency", "concurrency"} & set(sections):
        with Daemon(work, "log-off", {"BWPREDD_LOG_RPCS": "false"}) as d:
            progress(f"daemon (log_rpcs off) pid {d.pid}")
            _fill_daemon(d, fx)
            if "latency" in sections:
                progress("latency, log_rpcs off")
                res["latency_log_off"] = latency_section(d, floors, fx, plan.variant_calls)
            if pool is not None and plan.every_variant:
                progress("concurrency, log_rpcs off")
                res["concurrency_log_off"] = mixed(d.address, d.pid, FORECAST, fx.forecast_one)
    if "threads" in sections:
        with Daemon(work, "threads-2", {"BWPREDD_ORT_THREADS": "2"}) as d:
            progress(f"daemon (ort_threads 2) pid {d.pid}")
            _fill_daemon(d, fx)
            res["batch_threads_2"] = batch_section(d, floors, fx, plan, threads=2)
            res["latency_threads_2"] = latency_section(d, floors, fx, plan.variant_calls)


def _profile_runs(work: Path, fx: Fixture, plan: Plan, out: Path) -> None:
    """py-spy on the daemon under a Forecast load, an Allocate load and the
    ingest load (log_rpcs on, then off for the unary loads)."""
    for name, env in (("defaults", {}), ("log-off", {"BWPREDD_LOG_RPCS": "false"})):
        with Daemon(work, f"profile-{name}", env) as d:
            _fill_daemon(d, fx)
            with _channel(d.address) as ch:
                for rpc, method, req_type in (
                    ("forecast", FORECAST, pb.ForecastRequest),
                    ("allocate", ALLOCATE, pb.AllocateRequest),
                ):
                    call = raw_unary(ch, method)
                    req = req_type(peer_ids=[fx.batch_peers[0]]).SerializeToString()
                    progress(f"profile {rpc} ({name}): {plan.ingest_s:g} s")
                    with py_spy(d.pid, out, f"{rpc}-{name}"):
                        end = time.perf_counter() + plan.ingest_s
                        n = 0
                        while time.perf_counter() < end:
                            call(req)
                            n += 1
                    progress(f"  {n / plan.ingest_s:.0f} calls/s under the profiler")
            if name == "defaults":
                progress(f"profile ingest: {plan.ingest_s:g} s")
                with py_spy(d.pid, out, "ingest"):
                    r = stream_ingest(
                        d.address, fx.ingest_load, plan.ingest_depth, duration=plan.ingest_s
                    )
                progress(f"  {r.rate:.0f} samples/s under the profiler")
                batch = pb.ForecastRequest(peer_ids=fx.batch_peers).SerializeToString()
                with _channel(d.address) as ch, py_spy(d.pid, out, "batch"):
                    call = raw_unary(ch, FORECAST)
                    end = time.perf_counter() + plan.ingest_s
                    while time.perf_counter() < end:
                        call(batch)


def targets_of(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, judged on the production-default daemon."""
    t: list[dict[str, Any]] = []
    if "latency" in res:
        lat = res["latency"]
        t.append(_target("Forecast p50 / floor p50", lat["forecast_p50_ratio"], "<=", 1.3, "x"))
        t.append(_target("Allocate p50 / floor p50", lat["allocate_p50_ratio"], "<=", 1.3, "x"))
    if "batch" in res:
        t.append(_target("Forecast x1000 / raw ORT", res["batch"]["ratio_p50"], "<=", 1.25, "x"))
    if "ingest" in res and "daemon" in res["ingest"]:
        ing = res["ingest"]
        rate = ing["daemon"]["samples_per_s"] if ing["all_accepted"] else 0
        t.append(_target("ingest accepted samples/s", rate, ">=", 250_000, "/s"))
    if "memory" in res:
        # 64 MB for 100,000 peers (the windows alone are 16 MB); pro rata
        # for the quick run's smaller table.
        limit = round(64 * res["memory"]["peers"] / 100_000, 1)
        t.append(_target(MEMORY_TARGET, res["memory"]["delta_mb"], "<=", limit, "MB"))
    if "startup" in res:
        t.append(_target("start to SERVING (median)", res["startup"]["median_s"], "<=", 2.0, "s"))
    return t


def _row(*cells: str) -> list[str]:
    """figure, daemon, baseline, ratio, target, result."""
    return list(cells)


def table_rows(res: dict[str, Any]) -> list[list[str]]:
    """The printed/markdown table: figure, daemon, baseline, ratio, target, pass."""
    rows: list[list[str]] = []
    judged = {t["name"]: t for t in targets_of(res)}

    def verdict(name: str) -> str:
        return ("PASS" if judged[name]["pass"] else "FAIL") if name in judged else ""

    for key, tag in (("latency", ""), ("latency_log_off", " (log_rpcs off)")):
        if key not in res:
            continue
        lat = res[key]
        for rpc, label in (("forecast", "Forecast"), ("allocate", "Allocate")):
            floor = lat[f"{rpc}_floor"]
            fl = lat[f"echo_{floor}_{rpc}_size"]
            ratio = lat[f"{rpc}_p50_ratio"]
            name = f"{label} p50 / floor p50"
            rows.append(
                _row(
                    f"{label} 1 peer p50/p99{tag}",
                    f"{lat[rpc]['p50_us']:.0f}/{lat[rpc]['p99_us']:.0f} us",
                    f"{fl['p50_us']:.0f}/{fl['p99_us']:.0f} us ({floor} echo)",
                    f"{ratio:.2f}x / {lat[f'{rpc}_p99_ratio']:.2f}x",
                    "p50 <= 1.3x",
                    verdict(name) if not tag else ("pass" if ratio <= 1.3 else "fail"),
                )
            )
        rows.append(
            _row(
                f"  server CPU per call{tag}: Forecast, Allocate",
                f"{lat['forecast']['server_cpu_us']:.0f}, "
                f"{lat['allocate']['server_cpu_us']:.0f} us",
                f"{lat['echo_' + lat['forecast_floor'] + '_forecast_size']['server_cpu_us']:.0f} us"
                " echo",
                f"{lat['forecast_server_cpu_ratio']:.2f}x, {lat['allocate_server_cpu_ratio']:.2f}x",
                "",
                "",
            )
        )
        rows.append(
            _row(
                f"  daemon CPU: Health.Check / Forecast cold-start{tag}",
                f"{lat['daemon_health_check']['server_cpu_us']:.0f} / "
                f"{lat['forecast_cold_start']['server_cpu_us']:.0f} us",
                f"p50 {lat['daemon_health_check']['p50_us']:.0f} / "
                f"{lat['forecast_cold_start']['p50_us']:.0f} us",
                f"handler {lat['forecast_handler_cpu_us']:.0f}, "
                f"{lat['allocate_handler_cpu_us']:.0f} us",
                "",
                "",
            )
        )
        fresh = lat["fresh"]
        rows.append(
            _row(
                f"  after each new sample (model runs){tag}: Forecast, Allocate p50",
                f"{fresh['forecast']['p50_us']:.0f}, {fresh['allocate']['p50_us']:.0f} us",
                f"{fresh['forecast']['echo_p50_us']:.0f}, "
                f"{fresh['allocate']['echo_p50_us']:.0f} us aio echo",
                f"{fresh['forecast_p50_ratio']:.2f}x, {fresh['allocate_p50_ratio']:.2f}x",
                "",
                "",
            )
        )
        sync_us = lat["echo_sync_forecast_size"]["p50_us"]
        aio_us = lat["echo_aio_forecast_size"]["p50_us"]
        rows.append(
            _row(
                f"  echo floors{tag}: asyncio vs sync p50",
                f"{aio_us:.0f} us aio",
                f"{sync_us:.0f} us sync",
                f"{_ratio(aio_us, sync_us):.2f}x",
                "",
                "",
            )
        )
    for key, tag in (("batch", ""), ("batch_threads_2", " (ort_threads 2)")):
        if key not in res:
            continue
        b = res[key]
        rows.append(
            _row(
                f"Forecast x{b['peers']} p50{tag}",
                f"{b['daemon_rpc']['p50_us'] / 1e3:.2f} ms",
                f"{b['raw_onnxruntime']['p50_us'] / 1e3:.2f} ms raw ORT",
                f"{b['ratio_p50']:.2f}x",
                "<= 1.25x",
                verdict("Forecast x1000 / raw ORT") if not tag else "",
            )
        )
    if "latency_threads_2" in res:
        lt = res["latency_threads_2"]
        rows.append(
            _row(
                "Forecast 1 peer p50 (ort_threads 2)",
                f"{lt['forecast']['p50_us']:.0f} us",
                f"{lt['echo_' + lt['forecast_floor'] + '_forecast_size']['p50_us']:.0f} us",
                f"{lt['forecast_p50_ratio']:.2f}x",
                "",
                "",
            )
        )
    if "ingest" in res:
        ing = res["ingest"]
        floors = {
            k: ing[f"floor_{k}"]["samples_per_s"] for k in ("sync", "aio") if f"floor_{k}" in ing
        }
        if "daemon" in ing:
            dm = ing["daemon"]
            rows.append(
                _row(
                    "StreamSamples accepted samples/s",
                    f"{dm['samples_per_s']:,}" + ("" if ing["all_accepted"] else " (REJECTS)"),
                    ", ".join(f"{v:,} {k} floor" for k, v in floors.items()),
                    f"{ing['daemon_over_best_floor']:.2f}x",
                    ">= 250,000/s",
                    verdict("ingest accepted samples/s"),
                )
            )
            al = dm["ack_latency"]
            rows.append(
                _row(
                    f"  ack latency p50/p99 (depth {ing['depth']})",
                    f"{al['p50_us'] / 1e3:.1f}/{al['p99_us'] / 1e3:.1f} ms",
                    "",
                    "",
                    "",
                    "",
                )
            )
        if "daemon" in ing:
            rows.append(
                _row(
                    "  server CPU per sample",
                    f"{ing['daemon']['server_cpu_us_per_sample']:.2f} us",
                    ", ".join(
                        f"{ing[f'floor_{k}']['server_cpu_us_per_sample']:.2f} us {k}"
                        for k in floors
                    ),
                    f"{ing['daemon_cpu_per_sample_over_floor']:.2f}x",
                    "",
                    "",
                )
            )
    if "watchers" in res:
        w = res["watchers"]
        rows.append(
            _row(
                f"ingest with {w['watchers']:,} idle watch-all watchers",
                f"{w['watched']['samples_per_s']:,} samples/s"
                + ("" if w["all_accepted"] else " (REJECTS)"),
                f"{w['plain']['samples_per_s']:,} samples/s, none open (same daemon)",
                f"{w['ratio']:.2f}x",
                "",
                f"{w['watchers_open']:,} open, RSS +{w['rss_after_ingest_mb']:.0f} MB",
            )
        )
    if "memory" in res:
        m = res["memory"]
        rows.append(
            _row(
                f"RSS {m['peers']:,} full windows - empty",
                f"{m['delta_mb']:.1f} MB",
                f"{m['rss_empty_mb']:.1f} MB empty",
                "",
                f"<= {64 * m['peers'] / 100_000:g} MB",
                verdict(MEMORY_TARGET),
            )
        )
    if "startup" in res:
        s = res["startup"]
        rows.append(
            _row(
                "start to Health SERVING (median)",
                f"{s['median_s']:.2f} s",
                f"{s['daemon_startup_ms_median']} ms in startup()",
                "",
                "<= 2 s",
                verdict("start to SERVING (median)"),
            )
        )
    if "onnx_vs_torch" in res and "batch_1" in res["onnx_vs_torch"]:
        o = res["onnx_vs_torch"]
        for batch in (1, 1000):
            b = o[f"batch_{batch}"]
            rows.append(
                _row(
                    f"forecaster batch {batch}: torch eager vs ORT",
                    f"{b['torch_eager']['p50_us']:.0f} us torch",
                    f"{b['onnxruntime']['p50_us']:.0f} us ORT",
                    f"{b['torch_over_ort_p50']:.2f}x",
                    "",
                    "",
                )
            )
    for key, tag in (
        ("concurrency", ""),
        ("concurrency_log_off", " (log_rpcs off)"),
        ("concurrency_floor_sync", " sync floor"),
        ("concurrency_floor_aio", " aio floor"),
    ):
        if key not in res:
            continue
        c = res[key]
        ul, il = c["unary_latency"], c["ingest_ack_latency"]
        rows.append(
            _row(
                f"{c['clients']} clients mixed{tag}",
                f"{c['unary_per_s']:,} unary/s + {c['samples_per_s']:,} samples/s",
                f"unary p50/p99 {ul.get('p50_us', 0) / 1e3:.1f}/{ul.get('p99_us', 0) / 1e3:.1f} ms",
                f"ack p50/p99 {il.get('p50_us', 0) / 1e3:.1f}/{il.get('p99_us', 0) / 1e3:.1f} ms",
                f"{c['server_cpu_cores']:.2f} server cores",
                "ERR" if c["errors"] or c["rejected"] else "",
            )
        )
    return rows


HEADER = ["figure", "daemon", "baseline", "ratio", "target", "result"]


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [HEADER, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(rows: list[list[str]], report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "## make bench",
        "",
        f"`{report['command']}` on {m['cpu_model']}, {m['logical_cpus']} logical CPUs "
        f"(all processes pinned to {m['cores_used']}), Python {m['python']}, grpcio "
        f"{m['grpcio']}, onnxruntime {m['onnxruntime']}; {report['finished']}"
        + (" (quick run)" if report["quick"] else "")
        + f"; load average {m['load_average_1_5_15_before'][0]} before, "
        f"{m['load_average_1_5_15_after'][0]} after.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" for _ in HEADER) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    lines += [
        "",
        "Floors: bare grpcio echo servers (sync thread pool and asyncio) answering with "
        "messages of the daemon's request and reply sizes, and a minimal ingest server that "
        "only validates and writes numpy windows (`bwpredd/_bench_floor.py`). All calls go "
        "through the same sync grpcio client with pre-serialized bytes. The daemon runs with "
        "its production defaults (metrics HTTP on, one log line per RPC) unless a row says "
        "otherwise; every figure is in `bench.json`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m bwpredd.bench``.

    Args:
        argv: arguments (``sys.argv[1:]`` when None).
    """
    parser = argparse.ArgumentParser(prog="python -m bwpredd.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short run (smoke test)")
    parser.add_argument("--out", default="reports", help="where bench.json/bench.md go")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    parser.add_argument("--cores", default="", help="CPUs to pin to (default: the first 2)")
    parser.add_argument("--profile", default="", help="py-spy the daemon into DIR instead")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    sections = [s for s in args.only.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown sections {sorted(unknown)}")
    available = sorted(os.sched_getaffinity(0))
    cores = [int(c) for c in args.cores.split(",")] if args.cores else available[:2]
    # Children inherit the affinity: daemon, floors and clients share these cores.
    os.sched_setaffinity(0, cores)
    plan = Plan.make(args.quick)
    command = "python -m bwpredd.bench" + (" " + shlex.join(argv) if argv else "")
    if argv is None and sys.argv[1:]:
        command = "python -m bwpredd.bench " + shlex.join(sys.argv[1:])
    started = time.perf_counter()
    load_before = [round(x, 2) for x in os.getloadavg()]
    profile = Path(args.profile) if args.profile else None
    res = run(plan, sections, profile)
    if profile is not None:
        progress(f"profiles in {profile}")
        return 0
    report: dict[str, Any] = {
        "command": command,
        "quick": args.quick,
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": round(time.perf_counter() - started, 1),
        "machine": {
            **machine_info(cores),
            # Other work on the machine inflates wall times; server CPU per
            # call/sample (the *_cpu_* figures) is robust to it.
            "load_average_1_5_15_before": load_before,
            "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        },
        "plan": dataclasses.asdict(plan),
        "results": res,
        "targets": targets_of(res),
    }
    rows = table_rows(res)
    print(render_text(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (out / "bench.md").write_text(render_markdown(rows, report))
    failed = [t["name"] for t in report["targets"] if not t["pass"]]
    progress(
        f"wrote {out / 'bench.json'} and {out / 'bench.md'} in {report['duration_s']} s; "
        + (f"targets missed: {', '.join(failed)}" if failed else "all targets met")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
