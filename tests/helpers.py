"""Test helpers: a real daemon in this process (``running_server``) or in a
child process (``daemon_process``), reached through the generated stubs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client import CollectorRegistry

from bwpredd.client import Client, channel_for, pb
from bwpredd.config import Config
from bwpredd.server import Server
from bwpredd.systemd import Notifier

__all__ = ["HandTrace", "daemon_process", "running_server", "sample", "wait_for_health"]


@dataclass
class HandTrace:
    """A trace built in a test: what the allocation environment reads."""

    source: str
    name: str
    step_s: float
    data: np.ndarray


def sample(peer: str, bw: float, **fields: Any) -> pb.Sample:
    """A Sample message."""
    return pb.Sample(peer_id=peer, bandwidth_mbps=bw, **fields)


@contextlib.contextmanager
def running_server(
    tmp_path: Path, *, notifier: Notifier | None = None, **overrides: Any
) -> Iterator[tuple[Server, Client]]:
    """Run a real Server on a temporary unix socket (or ``listen=...``) in a
    background thread with its own event loop; yield it with a client.

    Args:
        tmp_path: where the socket goes.
        notifier: systemd notifications (none by default).
        overrides: Config fields.
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
        except BaseException as exc:  # surfaced to the test below
            errors.append(exc)
            server.started.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started.is_set() and not errors and time.monotonic() < deadline:
        time.sleep(0.01)
    if errors:
        raise errors[0]
    client = Client(channel_for(server.address), timeout=10)
    try:
        yield server, client
    finally:
        client.close()
        loop.call_soon_threadsafe(server.request_exit)
        thread.join(timeout=30)
        if errors:
            raise errors[0]


def wait_for_health(target: str, timeout: float = 30.0) -> Client:
    """Poll Health until SERVING; return a client."""
    deadline = time.monotonic() + timeout
    client = Client(channel_for(target), timeout=2)
    while True:
        try:
            if client.health() == "SERVING":
                return client
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            client.close()
            raise TimeoutError(f"daemon at {target} not SERVING after {timeout} s")
        time.sleep(0.05)


@contextlib.contextmanager
def daemon_process(
    args: list[str], env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m bwpredd ARGS`` as a child process; killed if still alive."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BWPREDD_")}
    full_env.update({"BWPREDD_METRICS_ADDR": "", **(env or {})})
    proc = subprocess.Popen(
        [sys.executable, "-m", "bwpredd", *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


def write_csv_traces(root: Path, length: int, seed: int = 0) -> Path:
    """A generic-CSV traces directory: two sources ("lab" around 5 Mbit/s,
    "home" around 80) of 4 files each, ``length`` steps of log-normal
    bandwidth and empty optional columns. Returns ``root``."""
    rng = np.random.default_rng(seed)
    for source, base in (("lab", 5.0), ("home", 80.0)):
        (root / source).mkdir(parents=True)
        for k in range(4):
            bw = base * np.exp(rng.normal(0, 0.2, length))
            rows = "".join(f"{t},{b:.4f},,,\n" for t, b in enumerate(bw))
            (root / source / f"f{k}.csv").write_text(
                "time_s,bandwidth_mbps,latency_ms,packet_loss,reliability\n" + rows
            )
    return root
