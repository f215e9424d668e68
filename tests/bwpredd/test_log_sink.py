"""Buffered log lines: one line per call, flushed by the main loop or at once for errors."""

from __future__ import annotations

import io
import json

from bwpredd.logging import _LineSink, _SinkLogger


class _Counting(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

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
