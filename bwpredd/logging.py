"""Logging set-up, done once at the process edge: structlog to stdout, JSON
when stdout is not a terminal (systemd, Kubernetes), readable on a TTY.

Request-scoped values (``rpc``, ``peer_id``, ``model_version``) are bound
through context variables so one canonical line per RPC carries them.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import sys
import threading
from typing import Any

import structlog

__all__ = ["configure_logging", "flush_logs", "get_logger"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _LineSink:
    """Writes rendered lines to a stream, flushing warnings and errors at
    once and the rest at least every :func:`flush_logs` call (the server's
    main loop calls it every tick) or every ``max_lines`` lines.

    A flush per line is a write(2) per RPC, which cost the daemon as much as
    the rest of a Forecast call; batching keeps one line per RPC affordable.
    """

    def __init__(self, stream: Any, max_lines: int = 256) -> None:
        self.stream = stream
        self.max_lines = max_lines
        self._pending = 0
        self._lock = threading.Lock()

    def write(self, line: str, urgent: bool) -> None:
        with self._lock:
            self.stream.write(line + "\n")
            self._pending += 1
            if urgent or self._pending >= self.max_lines:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._flush_locked()

    def _flush_locked(self) -> None:
        self._pending = 0
        # A closed or broken stdout must not take the daemon down.
        with contextlib.suppress(OSError, ValueError):
            self.stream.flush()


class _SinkLogger:
    """The structlog logger behind every bound logger: one line per call."""

    def __init__(self, sink: _LineSink) -> None:
        self._sink = sink

    def _normal(self, message: str) -> None:
        self._sink.write(message, urgent=False)

    def _urgent(self, message: str) -> None:
        self._sink.write(message, urgent=True)

    debug = info = msg = _normal
    warning = warn = error = err = critical = exception = fatal = failure = _urgent


_sinks: list[_LineSink] = []  # the current sink, once configured


def flush_logs() -> None:
    """Write out buffered log lines (called each main-loop tick and at exit)."""
    for sink in _sinks:
        sink.flush()


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog for the process.

    Args:
        fmt: ``json``, ``console``, or ``auto`` (JSON unless stdout is a TTY).
        level: minimum level name.

    Raises:
        ValueError: an unknown format or level.
    """
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"log format must be auto, json or console, got {fmt!r}")
    if level not in _LEVELS:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}, got {level!r}")
    json_out = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    chain: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json_out:
        # One line per event: a traceback becomes the "exception" string.
        chain += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        # ConsoleRenderer formats exc_info itself (and warns if it was done).
        chain.append(structlog.dev.ConsoleRenderer())
    # Replace the processors in place rather than passing a new list: loggers
    # that were already used (and cached) keep a reference to the list, so
    # they follow this call, and structlog.testing.capture_logs, which swaps
    # the list's contents, sees every logger.
    processors = structlog.get_config()["processors"]
    processors[:] = chain
    flush_logs()
    sink = _LineSink(sys.stdout)
    _sinks[:] = [sink]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *_: _SinkLogger(sink),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    """A structlog logger carrying ``logger_name=name``.

    Lazy: the logger is assembled on first use, so a module-level
    ``log = get_logger(__name__)`` imported before :func:`configure_logging`
    still renders with the configuration made at the process edge.

    Args:
        name: the module's name.
    """
    return structlog.get_logger(logger_name=name)


atexit.register(flush_logs)
