"""systemd notifications: the daemon under a fake ``$NOTIFY_SOCKET``.

The test binds the datagram socket systemd would bind, runs the daemon as a
child process with ``NOTIFY_SOCKET`` (and ``WATCHDOG_USEC``) pointing at it,
and reads what arrives: READY=1 once it serves, WATCHDOG=1 at half the
watchdog timeout, RELOADING=1 then READY=1 around SIGHUP, STOPPING=1 on
SIGTERM.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from bwpredd.client import Client, channel_for
from bwpredd.systemd import Notifier
from tests.helpers import daemon_process

WATCHDOG_USEC = 200_000
START_TIMEOUT_S = 30.0


class NotifySocket:
    """The receiving end of sd_notify: a bound AF_UNIX datagram socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.received: list[tuple[float, list[str]]] = []

    def close(self) -> None:
        self.sock.close()

    def wait_for(self, line: str, timeout: float) -> list[str]:
        """Read datagrams until one holds ``line``; return that datagram's lines."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                got = [lines for _, lines in self.received]
                raise TimeoutError(f"no {line!r} within {timeout} s; received {got}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            lines = data.decode().split("\n")
            self.received.append((time.monotonic(), lines))
            if line in lines:
                return lines

    def drain(self, seconds: float) -> None:
        """Keep reading for ``seconds``."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            self.received.append((time.monotonic(), data.decode().split("\n")))

    def times_of(self, line: str, since: float = 0.0) -> list[float]:
        return [t for t, lines in self.received if line in lines and t >= since]


@dataclass
class Life:
    """What one daemon sent over its life, and what the test saw meanwhile."""

    socket_listening_at_ready: bool = False
    health_at_ready: str = ""
    ready_status: list[str] = field(default_factory=list)
    steady_from: float = 0.0
    steady_to: float = 0.0
    hup_at: float = 0.0
    term_at: float = 0.0
    exit_code: int | None = None
    sequence: list[str] = field(default_factory=list)
    timeline: list[tuple[float, list[str]]] = field(default_factory=list)


@pytest.fixture(scope="module")
def life(tmp_path_factory: pytest.TempPathFactory) -> Life:
    """Run one daemon through start, watchdog, SIGHUP and SIGTERM, recording
    every notification."""
    tmp = tmp_path_factory.mktemp("notify")
    listener = NotifySocket(str(tmp / "notify.sock"))
    sock = tmp / "run" / "bwpredd.sock"
    env = {
        "NOTIFY_SOCKET": str(tmp / "notify.sock"),
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
        "BWPREDD_LISTEN": f"unix:{sock}",
        "BWPREDD_LOG_FORMAT": "json",
    }
    out = Life()
    try:
        with daemon_process([], env=env) as proc:
            out.ready_status = listener.wait_for("READY=1", START_TIMEOUT_S)
            out.socket_listening_at_ready = sock.is_socket()
            client = Client(channel_for(f"unix:{sock}"), timeout=5)
            try:
                out.health_at_ready = client.health()
            except grpc.RpcError as exc:  # recorded; the test says what was wrong
                out.health_at_ready = f"error {exc.code()}"
            finally:
                client.close()
            out.steady_from = time.monotonic()
            listener.drain(1.0)
            out.steady_to = time.monotonic()
            out.hup_at = time.monotonic()
            proc.send_signal(signal.SIGHUP)
            listener.wait_for("RELOADING=1", 10)
            listener.wait_for("READY=1", 30)
            out.term_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            listener.wait_for("STOPPING=1", 10)
            out.exit_code = proc.wait(timeout=30)
    finally:
        listener.close()
    out.timeline = listener.received
    # The state lines in order, without the watchdog pings and STATUS text.
    out.sequence = [
        line
        for _, lines in listener.received
        for line in lines
        if line.split("=")[0] in ("READY", "RELOADING", "STOPPING")
    ]
    return out


class TestDaemonLife:
    """One daemon's notifications from start to stop."""

    def test_ready_once_serving(self, life: Life) -> None:
        """READY=1 arrives only when the socket listens and health is SERVING,
        with a STATUS= line saying where."""
        assert life.socket_listening_at_ready
        assert life.health_at_ready == "SERVING"
        status = [line for line in life.ready_status if line.startswith("STATUS=")]
        assert status and "bwpredd.sock" in status[0]

    def test_watchdog_at_half_the_timeout(self, life: Life) -> None:
        """With WATCHDOG_USEC=200000, WATCHDOG=1 comes about every 0.1 s, never
        leaving a gap as long as the timeout."""
        pings = [
            t
            for t, lines in life.timeline
            if "WATCHDOG=1" in lines and life.steady_from <= t <= life.steady_to
        ]
        assert len(pings) >= 5, f"{len(pings)} pings in 1 s"
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < WATCHDOG_USEC / 1e6
        assert sorted(gaps)[len(gaps) // 2] == pytest.approx(WATCHDOG_USEC / 2e6, abs=0.04)

    def test_sighup_reloading_then_ready(self, life: Life) -> None:
        """SIGHUP brings RELOADING=1 (with MONOTONIC_USEC) and then READY=1."""
        after_hup = [lines for t, lines in life.timeline if life.hup_at <= t < life.term_at]
        flat = [line for lines in after_hup for line in lines]
        assert "RELOADING=1" in flat and "READY=1" in flat
        assert flat.index("RELOADING=1") < flat.index("READY=1")
        reloading = next(lines for lines in after_hup if "RELOADING=1" in lines)
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading)

    def test_status_after_reload_names_socket_and_model(self, life: Life) -> None:
        """The STATUS= sent with READY=1, at start and after a SIGHUP reload,
        names both the socket and the model (what `systemctl status` shows)."""
        after_hup = [lines for t, lines in life.timeline if life.hup_at <= t < life.term_at]
        ready = [lines for lines in [life.ready_status, *after_hup] if "READY=1" in lines]
        assert len(ready) == 2
        for lines in ready:
            (status,) = [line for line in lines if line.startswith("STATUS=")]
            assert status.startswith("STATUS=serving on unix:") and "/run/bwpredd.sock" in status
            assert ", model " in status and "baselines" not in status

    def test_sigterm_stopping_and_exit_zero(self, life: Life) -> None:
        """SIGTERM brings STOPPING=1 as the last state line and exit code 0."""
        assert life.sequence == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
        assert life.exit_code == 0


class TestNotifySocketKinds:
    """Where the notifications can go."""

    def test_abstract_socket(self, tmp_path: Path) -> None:
        """An abstract NOTIFY_SOCKET ('@name') gets READY=1 and STOPPING=1."""
        name = f"bwpredd-test-{uuid.uuid4().hex}"
        listener = NotifySocket("\0" + name)
        env = {"NOTIFY_SOCKET": "@" + name, "BWPREDD_LISTEN": f"unix:{tmp_path}/s.sock"}
        try:
            with daemon_process([], env=env) as proc:
                listener.wait_for("READY=1", START_TIMEOUT_S)
                proc.send_signal(signal.SIGTERM)
                listener.wait_for("STOPPING=1", 10)
                assert proc.wait(timeout=30) == 0
        finally:
            listener.close()

    def test_watchdog_of_another_process_ignored(self, tmp_path: Path) -> None:
        """WATCHDOG_USEC with a WATCHDOG_PID naming another process sends no
        WATCHDOG=1 (the watchdog belongs to that process)."""
        listener = NotifySocket(str(tmp_path / "n.sock"))
        env = {
            "NOTIFY_SOCKET": str(tmp_path / "n.sock"),
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
            "WATCHDOG_PID": "1",
            "BWPREDD_LISTEN": f"unix:{tmp_path}/s.sock",
        }
        try:
            with daemon_process([], env=env) as proc:
                listener.wait_for("READY=1", START_TIMEOUT_S)
                listener.drain(0.6)
                proc.send_signal(signal.SIGTERM)
                listener.wait_for("STOPPING=1", 10)
                assert proc.wait(timeout=30) == 0
        finally:
            listener.close()
        assert listener.times_of("WATCHDOG=1") == []


class TestNotifier:
    """bwpredd.systemd.Notifier on its own."""

    def test_from_env_watchdog_pid(self) -> None:
        """The watchdog is on only for a numeric WATCHDOG_USEC and a
        WATCHDOG_PID that is absent or ours; the interval is half of it."""
        usec = {"WATCHDOG_USEC": "200000"}
        assert Notifier.from_env(usec).watchdog_interval_s == 0.1
        ours = Notifier.from_env({**usec, "WATCHDOG_PID": str(os.getpid())})
        assert ours.watchdog_usec == 200_000
        assert Notifier.from_env({**usec, "WATCHDOG_PID": "1"}).watchdog_usec == 0
        assert Notifier.from_env({"WATCHDOG_USEC": "soon"}).watchdog_usec == 0
        assert Notifier.from_env({}).watchdog_interval_s == 0

    def test_lines_go_in_one_datagram(self, tmp_path: Path) -> None:
        """notify() sends its lines newline-separated in one datagram."""
        listener = NotifySocket(str(tmp_path / "n.sock"))
        notifier = Notifier(str(tmp_path / "n.sock"))
        try:
            assert notifier.enabled
            assert notifier.notify("READY=1", "STATUS=serving")
            assert listener.wait_for("READY=1", 5) == ["READY=1", "STATUS=serving"]
        finally:
            notifier.close()
            listener.close()

    def test_failures_are_quiet(self, tmp_path: Path) -> None:
        """No socket configured, or nobody listening, is False, never an exception."""
        assert not Notifier(None).enabled
        assert Notifier(None).notify("READY=1") is False
        gone = Notifier(str(tmp_path / "nobody.sock"))
        try:
            assert gone.notify("READY=1") is False
        finally:
            gone.close()
