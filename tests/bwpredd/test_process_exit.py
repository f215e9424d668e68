"""How the daemon process ends when it cannot start or is killed.

A failed start closes what it opened and says why in one line on stderr,
with exit code 3. A fatal signal that can be caught (the watchdog's SIGABRT)
writes the log lines still buffered before the process dies of it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

from tests.helpers import sample, spawn_daemon, wait_for_health

START_TIMEOUT_S = 30.0


def _daemon(env: dict[str, str]) -> subprocess.Popen[str]:
    """``python -m bwpredd`` with stdout and stderr kept apart."""
    # `ulimit -c 0`: the SIGABRT test must not leave a core file behind.
    proc: subprocess.Popen[str] = spawn_daemon(
        env={"BWPREDD_LOG_FORMAT": "json", **env},
        wrap=["sh", "-c", 'ulimit -c 0 && exec "$@"', "sh"],
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc


class TestFailedStart:
    """Exit code 3 when the metrics port is taken."""

    def test_metrics_port_in_use(self, tmp_path: Path) -> None:
        """With its metrics port held by another socket the daemon exits 3,
        prints one line naming metrics_addr on stderr and nothing from the
        gRPC server left open (no 'Exception ignored', no coroutine 'never
        awaited'), and removes the socket it had bound."""
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sock = tmp_path / "run" / "bwpredd.sock"
        try:
            proc = _daemon(
                {"BWPREDD_LISTEN": f"unix:{sock}", "BWPREDD_METRICS_ADDR": f"127.0.0.1:{port}"}
            )
            out, err = proc.communicate(timeout=START_TIMEOUT_S)
        finally:
            taken.close()
        assert proc.returncode == 3, err
        assert "Exception ignored" not in err and "never awaited" not in err, err
        assert err.splitlines() == [
            f"bwpredd: cannot start: metrics_addr: cannot bind 127.0.0.1:{port}: "
            "[Errno 98] Address already in use"
        ]
        events = [json.loads(line)["event"] for line in out.splitlines()]
        assert events[-1] == "startup_failed"
        assert not sock.exists()


class TestFatalSignal:
    """The watchdog's SIGABRT does not lose the lines buffered before it."""

    def test_sigabrt_flushes_the_last_rpc_line(self, tmp_path: Path) -> None:
        """A PushSamples answered just before SIGABRT has its rpc line on
        stdout (info lines wait up to a main-loop tick, <= 1 s, in the
        buffer), and the process still dies of SIGABRT."""
        target = f"unix:{tmp_path}/run/bwpredd.sock"
        proc = _daemon({"BWPREDD_LISTEN": target, "BWPREDD_METRICS_ADDR": ""})
        try:
            client = wait_for_health(target, timeout=START_TIMEOUT_S)
            try:
                ack = client.push([sample(f"abort-{i}", 10.0 + i) for i in range(37)])
            finally:
                client.close()
            os.kill(proc.pid, signal.SIGABRT)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert ack.accepted == 37
        assert proc.returncode == -signal.SIGABRT, err
        lines = [json.loads(line) for line in out.splitlines()]
        last_rpc = [x for x in lines if x["event"] == "rpc" and x["rpc"] == "PushSamples"]
        assert last_rpc and last_rpc[-1]["accepted"] == 37, out
