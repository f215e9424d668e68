"""A running daemon and synthetic windows: the one harness of the tests, the
bench and the soak.

Two ways to run the daemon, both real (a gRPC server on a unix socket or a
port, reached through the generated stubs):

- :func:`running_server`: a :class:`bwpredd.server.Server` in this process,
  on a thread with its own event loop (fast to start; the tests' default);
- :func:`spawn_daemon`: ``python -m bwpredd`` as a child process, the one way
  anything here starts one. :func:`daemon_process` wraps it for a test (the
  process is killed when the block ends); :class:`Daemon` for the bench and
  the soak (a log file, a metrics port, health waited for, a graceful stop).

:func:`synthetic_windows` (defined in :mod:`bwpredd.modeldir`, where export's
parity check also reads it) gives seeded plausible raw windows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from bwpredd.client import Client
from bwpredd.config import Config
from bwpredd.modeldir import synthetic_windows
from bwpredd.server import Server
from bwpredd.systemd import Notifier

__all__ = [
    "CHANNEL_OPTIONS",
    "REPO",
    "SERVICE",
    "Daemon",
    "channel",
    "daemon_env",
    "daemon_process",
    "free_port",
    "rss_kib",
    "running_server",
    "spawn_daemon",
    "synthetic_windows",
    "wait_for_health",
]

REPO = Path(__file__).resolve().parents[1]
SERVICE = "bwpred.v1.BandwidthPredictorService"
# Reconnect within 10-100 ms, not grpc's default 1 s: a client that tried
# before the socket existed sees the daemon as soon as it serves (start-up is
# timed through this).
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 10),
    ("grpc.min_reconnect_backoff_ms", 10),
    ("grpc.max_reconnect_backoff_ms", 100),
]
# The environment systemd gives a service: a daemon started here must not
# pick up the caller's.
_SYSTEMD_VARS = ("STATE_DIRECTORY", "RUNTIME_DIRECTORY")


def channel(address: str) -> grpc.Channel:
    """An insecure channel to ``address`` with :data:`CHANNEL_OPTIONS`."""
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` (VmRSS), KiB.

    Raises:
        OSError: the process is gone (``ProcessLookupError`` for a zombie).
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ProcessLookupError(f"no VmRSS for pid {pid}")


# -- in this process --------------------------------------------------------------


@contextlib.contextmanager
def running_server(
    tmp_path: Path, *, notifier: Notifier | None = None, **overrides: Any
) -> Iterator[tuple[Server, Client]]:
    """Run a real Server on a temporary unix socket (or ``listen=...``) in a
    background thread with its own event loop; yield it with a client.

    Args:
        tmp_path: where the socket goes.
        notifier: systemd notifications (none by default).
        overrides: Config fields (metrics and the per-RPC log line are off
            unless given).
    """
    settings: dict[str, Any] = {
        "listen": f"unix:{tmp_path}/run/bwpredd.sock",
        "metrics_addr": "",
        "log_rpcs": False,
    }
    settings.update(overrides)
    config = Config(**settings)
    server = Server(config, registry=CollectorRegistry(), notifier=notifier or Notifier(None))
    loop = asyncio.new_event_loop()
    errors: list[BaseException] = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.serve())
        except BaseException as exc:  # surfaced to the caller below
            errors.append(exc)
            server.started.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started.is_set() and not errors and time.monotonic() < deadline:
        time.sleep(0.01)
    if errors:
        raise errors[0]
    client = Client(channel(server.address), timeout=10)
    try:
        yield server, client
    finally:
        client.close()
        loop.call_soon_threadsafe(server.request_exit)
        thread.join(timeout=30)
        if errors:
            raise errors[0]


# -- as a child process --------------------------------------------------------------


def daemon_env(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any ``BWPREDD_*`` setting (nor
    systemd's state and runtime directories), then ``overrides``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BWPREDD_") and k not in _SYSTEMD_VARS
    }
    env.update(overrides or {})
    return env


def spawn_daemon(
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    wrap: Sequence[str] = (),
    stdout: int | IO[Any] | None = subprocess.PIPE,
    stderr: int | IO[Any] | None = subprocess.STDOUT,
    text: bool = False,
) -> subprocess.Popen[Any]:
    """Start ``python -m bwpredd ARGS`` (from the repository, this interpreter).

    Args:
        args: the daemon's command line.
        env: settings over :func:`daemon_env` (e.g. ``BWPREDD_LISTEN``).
        wrap: a command the daemon runs under (``strace ...``; ``sh -c
            'ulimit -c 0 && exec "$@"' sh``).
        stdout: as :class:`subprocess.Popen` takes it.
        stderr: ditto (merged into stdout by default).
        text: decode the pipes as text.
    """
    return subprocess.Popen(
        [*wrap, sys.executable, "-m", "bwpredd", *args],
        env=daemon_env(env),
        stdout=stdout,
        stderr=stderr,
        text=text,
        cwd=REPO,
    )


@contextlib.contextmanager
def daemon_process(
    args: Sequence[str], env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """:func:`spawn_daemon` for a test: metrics off unless ``env`` sets
    ``BWPREDD_METRICS_ADDR``, output on ``proc.stdout``; killed if still alive
    when the block ends."""
    proc = spawn_daemon(args, {"BWPREDD_METRICS_ADDR": "", **(env or {})})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


def wait_for_health(
    target: str,
    timeout: float = 30.0,
    *,
    service: str = "",
    proc: subprocess.Popen[Any] | None = None,
) -> Client:
    """Wait until ``service`` (the whole server by default) is SERVING at
    ``target``; return a client (2 s deadline per call) on it.

    Raises:
        TimeoutError: not SERVING within ``timeout`` seconds.
        RuntimeError: ``proc`` exited first.
    """
    deadline = time.monotonic() + timeout
    client = Client(channel(target), timeout=2)
    request = health_pb2.HealthCheckRequest(service=service)
    try:
        while True:
            with contextlib.suppress(grpc.RpcError):
                # wait_for_ready: a call made before the socket exists waits
                # for it (up to its timeout) instead of failing at once.
                resp = client.health_stub.Check(request, timeout=0.5, wait_for_ready=True)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return client
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"daemon exited at start-up: {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemon at {target} not SERVING after {timeout} s")
            time.sleep(0.005)
    except BaseException:
        client.close()
        raise


def scrape_metrics(addr: str) -> dict[str, float]:
    """Every sample of the metrics endpoint at ``host:port`` as
    ``name{k=v,...}`` -> value (labels sorted; ``name{}`` when it has none).

    Raises:
        OSError: the endpoint did not answer.
    """
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


class Daemon:
    """``python -m bwpredd`` as a child process on a unix socket, with its
    output in a log file and its metrics on a free loopback port: how the
    bench and the soak run theirs. It can be stopped and started again (same
    socket, settings and log).

    Args:
        workdir: the socket goes in ``<workdir>/<name>/``, the log to
            ``<workdir>/<name>.log``.
        name: names them.
        env: ``BWPREDD_*`` settings over the production defaults.
    """

    def __init__(self, workdir: Path, name: str, env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.socket = workdir / name / "bwpredd.sock"
        self.address = f"unix:{self.socket}"
        self.log_path = workdir / f"{name}.log"
        self.metrics_addr = f"127.0.0.1:{free_port()}"
        self.env = {
            "BWPREDD_LISTEN": self.address,
            "BWPREDD_METRICS_ADDR": self.metrics_addr,
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # unix time of the last start
        self.startup_s = 0.0  # its process start to the service SERVING

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> float:
        """Start and wait for the service to be SERVING in health; return the
        seconds it took."""
        with self.log_path.open("ab") as log:
            t0 = time.perf_counter()
            self.started_at = time.time()
            self.proc = spawn_daemon(env=self.env, stdout=log)
        try:
            wait_for_health(self.address, timeout, service=SERVICE, proc=self.proc).close()
        except (TimeoutError, RuntimeError) as exc:
            Daemon.stop(self)  # not a lifetime a subclass should record
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"daemon {self.name} did not start ({exc}); log: {tail}") from None
        self.startup_s = time.perf_counter() - t0
        return self.startup_s

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 15.0) -> tuple[int | None, float]:
        """Send ``sig`` and wait; SIGKILL after ``grace_s``. Returns the exit
        code (None if never started) and the seconds it took to exit."""
        if self.proc is None:
            return None, 0.0
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode, time.monotonic() - t0

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def startup_ms_logged(self) -> float | None:
        """The daemon's own ``startup_ms`` (model load to serving) from its log."""
        for line in reversed(self.log_path.read_text(errors="replace").splitlines()):
            if '"started"' in line:
                with contextlib.suppress(ValueError):
                    value = json.loads(line).get("startup_ms")
                    return float(value) if value is not None else None
        return None

    def scrape(self) -> dict[str, float]:
        """:func:`scrape_metrics` of this daemon's metrics endpoint."""
        return scrape_metrics(self.metrics_addr)

    def metric(self, key: str) -> float:
        """One sample of :meth:`scrape` (0 when absent, NaN when the endpoint
        did not answer)."""
        with contextlib.suppress(OSError):
            return self.scrape().get(key, 0.0)
        return math.nan

    def __enter__(self) -> Daemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
