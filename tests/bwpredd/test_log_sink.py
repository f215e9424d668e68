"""Buffered log lines: one line per call, flushed by the main loop or at once for errors."""

from __future__ import annotations

import datetime
import io
import json
import time

import pytest
import structlog
from structlog.testing import capture_logs

from bwpredd.logging import (
    DeferredLines,
    _LineSink,
    _SinkLogger,
    configure_logging,
    flush_logs,
)


class _Counting(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


class TestSink:
    """The sink behind the daemon's loggers."""

    def test_info_batched_errors_flushed(self) -> None:
        """Info lines wait for flush(); an error line flushes everything before it, in order."""
        stream = _Counting()
        logger = _SinkLogger(_LineSink(stream, max_lines=100))
        for i in range(3):
            logger.info(json.dumps({"i": i}))
        assert stream.flushes == 0
        logger.error(json.dumps({"i": "err"}))
        assert stream.flushes == 1
        lines = [json.loads(x)["i"] for x in stream.getvalue().splitlines()]
        assert lines == [0, 1, 2, "err"]

    def test_bounded_and_explicit_flush(self) -> None:
        """Every max_lines lines are flushed; flush() writes out the rest."""
        stream = _Counting()
        sink = _LineSink(stream, max_lines=10)
        logger = _SinkLogger(sink)
        for i in range(25):
            logger.info(str(i))
        assert stream.flushes == 2
        sink.flush()
        assert stream.flushes == 3 and len(stream.getvalue().splitlines()) == 25
        sink.flush()
        assert stream.flushes == 3

    def test_one_write_per_flush(self) -> None:
        """The sink hands its lines over in one write, so an unbuffered stdout
        (PYTHONUNBUFFERED=1, as the unit sets) costs one write(2) per flush,
        not one per line."""
        stream = _Counting()
        sink = _LineSink(stream, max_lines=100)
        for i in range(20):
            sink.write(str(i), urgent=False)
        assert stream.writes == 0
        sink.flush()
        assert stream.writes == 1
        assert stream.getvalue().splitlines() == [str(i) for i in range(20)]


class TestDeferredLines:
    """Per-RPC lines rendered at the next flush."""

    def test_rendered_at_flush_with_their_time(self) -> None:
        """add() writes nothing; flush_logs() renders each line with the time
        of its add(), not of the flush."""
        lines = DeferredLines(structlog.get_logger("bwpredd.test"), "rpc")
        with capture_logs() as logs:
            before = time.time()
            lines.add({"rpc": "Forecast", "code": "OK"})
            after = time.time()
            assert logs == []
            time.sleep(0.05)
            flush_logs()
        (event,) = logs
        assert event["event"] == "rpc" and event["rpc"] == "Forecast"
        assert before <= event["_at"] <= after

    def test_now_keeps_order_and_limit_bounds(self) -> None:
        """now=True writes the waiting lines first, then its own; at the limit
        the waiting lines are written without a flush."""
        lines = DeferredLines(structlog.get_logger("bwpredd.test"), "rpc", limit=3)
        with capture_logs() as logs:
            lines.add({"i": 0})
            lines.add({"i": 1, "code": "NOT_FOUND"}, now=True)
            assert [e["i"] for e in logs] == [0, 1]
            for i in range(2, 5):
                lines.add({"i": i})
            assert [e["i"] for e in logs] == [0, 1, 2, 3, 4]

    @pytest.mark.usefixtures("restore_structlog")
    def test_json_timestamp_is_the_add_time(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Rendered as JSON, a deferred line's timestamp is its add() time, in
        the same ISO UTC form as every other line."""
        configure_logging("json", "info")
        lines = DeferredLines(structlog.get_logger("bwpredd.test"), "rpc")
        before = time.time()
        lines.add({"rpc": "Forecast"})
        after = time.time()
        time.sleep(0.05)
        flush_logs()
        event = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert event["timestamp"].endswith("Z") and "_at" not in event
        when = datetime.datetime.fromisoformat(event["timestamp"][:-1] + "+00:00")
        assert before - 1e-3 <= when.timestamp() <= after + 1e-3
