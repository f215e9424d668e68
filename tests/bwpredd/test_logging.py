"""Logs: one structured line per RPC, start-up and reload lines naming the
model version and its sha256, JSON when not on a terminal."""

from __future__ import annotations

import json
import queue
import re
import signal
import threading
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
from structlog.testing import capture_logs

from bwpredd.logging import RateLimitedLine, configure_logging, flush_logs, get_logger
from tests.helpers import daemon_process, running_server, sample, wait_for_health

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _out(capsys: pytest.CaptureFixture[str]) -> str:
    """What was logged so far (the sink keeps lines until a flush)."""
    flush_logs()
    return capsys.readouterr().out


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.usefixtures("restore_structlog")
class TestConfigureLogging:
    """bwpredd.logging.configure_logging and get_logger."""

    def test_json_line(self, capsys: pytest.CaptureFixture[str]) -> None:
        """JSON output is one object per line with event, level, an ISO UTC
        timestamp, logger_name and the fields passed."""
        configure_logging("json", "info")
        log = get_logger("bwpredd.test")
        log.info("rpc", rpc="Forecast", code="OK", duration_ms=0.25)
        (line,) = _lines(_out(capsys))
        event = json.loads(line)
        assert event["event"] == "rpc" and event["level"] == "info"
        assert event["logger_name"] == "bwpredd.test"
        assert event["rpc"] == "Forecast" and event["duration_ms"] == 0.25
        assert ISO_UTC.match(event["timestamp"])

    def test_exception_stays_on_one_line(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A logged exception becomes an "exception" string inside the one
        JSON line, not a multi-line traceback."""
        configure_logging("json", "info")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            get_logger("bwpredd.test").exception("rpc_failed")
        (line,) = _lines(_out(capsys))
        event = json.loads(line)
        assert "RuntimeError: boom" in event["exception"]

    def test_auto_is_json_off_a_terminal(self, capsys: pytest.CaptureFixture[str]) -> None:
        """'auto' writes JSON when stdout is not a TTY (systemd, Kubernetes)."""
        configure_logging("auto", "info")
        get_logger("bwpredd.test").info("hello")
        assert json.loads(_out(capsys))["event"] == "hello"

    def test_console_is_readable(self, capsys: pytest.CaptureFixture[str]) -> None:
        """'console' writes a readable line, not JSON."""
        configure_logging("console", "info")
        get_logger("bwpredd.test").info("hello", peers=3)
        out = _out(capsys)
        assert "hello" in out and "peers" in out
        with pytest.raises(json.JSONDecodeError):
            json.loads(out)

    def test_level_filters(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Below the configured level nothing is written."""
        configure_logging("json", "warning")
        log = get_logger("bwpredd.test")
        log.info("quiet")
        log.warning("loud")
        assert [json.loads(x)["event"] for x in _lines(_out(capsys))] == ["loud"]

    def test_logger_made_before_configure_follows_it(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A module-level logger created before configure_logging (as
        bwpredd.server's is, at import) still writes JSON."""
        early = get_logger("bwpredd.early")
        configure_logging("json", "info")
        early.info("after")
        assert json.loads(_out(capsys))["logger_name"] == "bwpredd.early"

    def test_bad_arguments_refused(self) -> None:
        """An unknown format or level raises ValueError naming it."""
        with pytest.raises(ValueError, match="yaml"):
            configure_logging("yaml")
        with pytest.raises(ValueError, match="loud"):
            configure_logging("json", "loud")


class TestRpcLines:
    """The canonical line per RPC, captured in process."""

    def test_one_line_per_rpc(self, tmp_path: Path) -> None:
        """Each RPC writes exactly one "rpc" line with rpc, code, duration_ms
        and model_version; a NOT_FOUND carries its error."""
        # The line is written after the status is sent: capture until the
        # server has stopped, so the last call's line is in.
        with capture_logs() as logs, running_server(tmp_path, log_rpcs=True) as (server, client):
            version = server.core.engine.version if server.core else ""
            client.push([sample("a", 10.0 + i) for i in range(10)])
            client.forecast(["a"])
            client.allocate(["a"])
            with pytest.raises(grpc.RpcError):
                client.forecast(["ghost"])
        rpcs = [e for e in logs if e["event"] == "rpc"]
        assert [(e["rpc"], e["code"]) for e in rpcs] == [
            ("PushSamples", "OK"),
            ("Forecast", "OK"),
            ("Allocate", "OK"),
            ("Forecast", "NOT_FOUND"),
        ]
        for e in rpcs:
            assert isinstance(e["duration_ms"], float) and e["duration_ms"] >= 0
            assert e["model_version"] == version
        assert rpcs[0]["accepted"] == 10 and rpcs[0]["rejected"] == 0
        assert rpcs[1]["peers"] == 1
        assert "ghost" in rpcs[3]["error"]

    def test_log_rpcs_off_keeps_errors(self, tmp_path: Path) -> None:
        """With log_rpcs off, successful calls write nothing; failures still do."""
        with capture_logs() as logs, running_server(tmp_path, log_rpcs=False) as (_, client):
            client.push([sample("a", 1.0)])
            with pytest.raises(grpc.RpcError):
                client.peer("ghost")
        assert [(e["rpc"], e["code"]) for e in logs if e["event"] == "rpc"] == [
            ("GetPeer", "NOT_FOUND")
        ]


class TestRateLimitedLine:
    """bwpredd.logging.RateLimitedLine on a hand-driven clock."""

    def test_one_line_per_interval_counting_the_rest(self) -> None:
        """Within an interval only the first line is written; the next line
        after it says how many were held back, and the count starts again."""
        now = [100.0]
        with capture_logs() as logs:
            line = RateLimitedLine(get_logger("bwpredd.test"), "flood", 10.0, lambda: now[0])
            written = [line.warning(n=i) for i in range(5)]
            now[0] += 9.9
            written.append(line.warning(n=5))
            now[0] += 0.1
            written.append(line.warning(n=6))
            now[0] += 10.0
            written.append(line.warning(n=7))
        assert written == [True, False, False, False, False, False, True, True]
        assert [(e["event"], e["log_level"], e["n"], e["suppressed"]) for e in logs] == [
            ("flood", "warning", 0, 0),
            ("flood", "warning", 6, 5),
            ("flood", "warning", 7, 0),
        ]


class _Reader:
    """Collects a child's stdout lines on a thread so the test can wait for one."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[bytes]) -> None:
        for raw in stream:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))

    def until(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        while True:
            line = self.lines.get(timeout=timeout)
            self.seen.append(line)
            if line.startswith("{") and json.loads(line).get("event") == event:
                return dict(json.loads(line))


class TestDaemonJson:
    """The daemon as a process with --log-format json."""

    def test_startup_rpc_reload_lines(self, tmp_path: Path) -> None:
        """Start-up names the model version and each file's sha256, each RPC
        writes one JSON line, SIGHUP writes model_reloaded with the sha256,
        and SIGTERM writes stopping and stopped; no line is console-formatted."""
        sock = f"unix:{tmp_path}/s.sock"
        with daemon_process(["--log-format", "json"], env={"BWPREDD_LISTEN": sock}) as proc:
            assert proc.stdout is not None
            reader = _Reader(proc.stdout)
            loaded = reader.until("model_loaded")
            started = reader.until("started")
            client = wait_for_health(sock)
            client.push([sample("a", 1.0)])
            with pytest.raises(grpc.RpcError):
                client.forecast(["ghost"])
            client.close()
            proc.send_signal(signal.SIGHUP)
            reloaded = reader.until("model_reloaded")
            proc.send_signal(signal.SIGTERM)
            reader.until("stopped")
            assert proc.wait(timeout=30) == 0
        events = [json.loads(x) for x in reader.seen if x.startswith("{")]
        assert not [x for x in reader.seen if "[info" in x or "[error" in x]

        assert loaded["model_version"] and started["model_version"] == loaded["model_version"]
        assert set(loaded["sha256"]) == {"forecaster.onnx", "allocator.onnx", "horizon.onnx"}
        assert all(SHA256.match(h) for h in loaded["sha256"].values())
        assert started["listen"] == sock
        assert reloaded["sha256"] == loaded["sha256"]
        assert reloaded["model_version"] == loaded["model_version"]

        rpcs = [e for e in events if e["event"] == "rpc" and e["rpc"] != "Check"]
        assert [(e["rpc"], e["code"]) for e in rpcs] == [
            ("PushSamples", "OK"),
            ("Forecast", "NOT_FOUND"),
        ]
        for e in events:
            assert ISO_UTC.match(e["timestamp"]) and e["level"] and e["logger_name"]
        assert [e["event"] for e in events][-2:] == ["stopping", "stopped"]
