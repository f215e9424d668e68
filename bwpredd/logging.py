"""Logging set-up, done once at the process edge: structlog to stdout, JSON
when stdout is not a terminal (systemd, Kubernetes), readable on a TTY.

One canonical line per RPC (:class:`DeferredLines`) carries the call's
fields (``rpc``, ``code``, ``model_version``, ...) as keywords.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import structlog

__all__ = [
    "FATAL_SIGNALS",
    "DeferredLines",
    "RateLimitedLine",
    "configure_logging",
    "flush_logs",
    "flush_logs_on_fatal_signals",
    "get_logger",
]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _LineSink:
    """Writes rendered lines to a stream, at once for warnings and errors and
    otherwise at least every :func:`flush_logs` call (the server's main loop
    calls it every tick) or every ``max_lines`` lines.

    The sink keeps the lines itself and hands them over in one write: with
    ``PYTHONUNBUFFERED=1`` (the systemd unit sets it) the stream does not
    buffer, and a write(2) per RPC cost the daemon as much as the rest of a
    Forecast call.
    """

    def __init__(self, stream: Any, max_lines: int = 256) -> None:
        self.stream = stream
        self.max_lines = max_lines
        self._lines: list[str] = []
        # Reentrant: the fatal-signal handler runs in the main thread, maybe
        # between two bytecodes of a write() that holds the lock.
        self._lock = threading.RLock()

    def write(self, line: str, urgent: bool) -> None:
        with self._lock:
            lines = self._lines
            lines.append(line)
            if urgent or len(lines) >= self.max_lines:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            if self._lines:
                self._flush_locked()

    def flush_dying(self, wait_s: float = 0.5) -> None:
        """Flush from a fatal-signal handler: wait only briefly for a thread
        that holds the lock, then write anyway (a line interleaved beats a
        line lost)."""
        locked = self._lock.acquire(timeout=wait_s)
        try:
            if self._lines:
                self._flush_locked()
        finally:
            if locked:
                self._lock.release()

    def _flush_locked(self) -> None:
        lines, self._lines = self._lines, []
        # A closed or broken stdout must not take the daemon down.
        with contextlib.suppress(OSError, ValueError):
            self.stream.write("\n".join(lines) + "\n")
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
_deferred: weakref.WeakSet[DeferredLines] = weakref.WeakSet()


class DeferredLines:
    """Log lines of one event that are rendered later, in a batch.

    The per-RPC line is the daemon's most frequent log call. :meth:`add`
    only keeps the fields and the time; the line goes through structlog at
    the next :func:`flush_logs` (each main-loop tick), when ``limit`` lines
    are waiting, or at once with ``now``, which also writes the lines waiting
    before it, so the order is kept. Each line carries the time of its
    :meth:`add`. Rendered in the RPC path, the line cost the server several
    times what the same rendering costs in a batch (``reports/profile.md``,
    section 4).

    Args:
        log: the logger the lines go to (``info`` level).
        event: the event name of every line.
        limit: render once this many lines are waiting.
    """

    def __init__(self, log: Any, event: str, limit: int = 1024) -> None:
        self.log = log
        self.event = event
        self.limit = limit
        self._lines: list[tuple[float, dict[str, Any]]] = []
        _deferred.add(self)

    def add(self, fields: dict[str, Any], now: bool = False) -> None:
        """Keep a line; write it (and those waiting) at once with ``now``."""
        lines = self._lines
        lines.append((time.time(), fields))
        if now or len(lines) >= self.limit:
            self.render()

    def render(self) -> None:
        """Write the waiting lines through the logger."""
        lines, self._lines = self._lines, []
        info, event = self.log.info, self.event
        for at, fields in lines:
            info(event, _at=at, **fields)


class RateLimitedLine:
    """A warning that clients can trigger at will, written at most once per
    ``interval_s``: one token per interval. The lines held back are counted
    and the next line written says how many (``suppressed``), so a flood
    costs the journal one line per interval and is still visible.

    Args:
        log: the logger the lines go to (``warning`` level).
        event: the event name of every line.
        interval_s: seconds between two lines at least.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        log: Any,
        event: str,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.event = event
        self.interval_s = interval_s
        self.suppressed = 0
        self._clock = clock
        self._next = -float("inf")  # when the next line may be written

    def warning(self, **fields: Any) -> bool:
        """Write the line, or count it if one was written less than
        ``interval_s`` ago; True if it was written."""
        now = self._clock()
        if now < self._next:
            self.suppressed += 1
            return False
        self._next = now + self.interval_s
        self.log.warning(self.event, suppressed=self.suppressed, **fields)
        self.suppressed = 0
        return True


def _timestamp(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog's ISO UTC timestamp, or the time a deferred line was made."""
    at = event_dict.pop("_at", None)
    when = (
        datetime.datetime.fromtimestamp(at, datetime.UTC)
        if at is not None
        else datetime.datetime.now(datetime.UTC)
    )
    event_dict["timestamp"] = when.isoformat().replace("+00:00", "Z")
    return event_dict


def flush_logs() -> None:
    """Write out deferred and buffered log lines (called each main-loop tick
    and at exit)."""
    for lines in list(_deferred):
        lines.render()
    for sink in _sinks:
        sink.flush()


# Signals whose default action ends the process and that a handler can catch:
# SIGABRT is systemd's WatchdogSignal; SIGQUIT asks for a core dump. SIGTERM,
# SIGINT and SIGHUP have the server's own handlers; SIGKILL cannot be caught,
# and SIGSEGV, SIGBUS, SIGILL and SIGFPE leave no state fit to run Python in.
FATAL_SIGNALS = (signal.SIGABRT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def _flush_and_die(signum: int, _frame: Any) -> None:
    """Write the waiting lines, then die of the same signal with its default
    action, so the exit status (and a core dump) is what it would have been."""
    with contextlib.suppress(Exception):
        for lines in list(_deferred):
            lines.render()
        for sink in _sinks:
            sink.flush_dying()
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


def flush_logs_on_fatal_signals() -> None:
    """Flush the buffered log lines when a :data:`FATAL_SIGNALS` signal
    arrives (the watchdog's SIGABRT above all), then die of it as before.

    Python runs the handler in the main thread between two bytecodes: a
    loop busy in Python, asleep in a system call or stopped (SIGSTOP, then
    systemd's SIGCONT) is reached at once; a thread stuck inside a C call
    that holds the GIL is not, and systemd kills it with SIGKILL after
    ``TimeoutAbortSec``, losing the lines as before. Call it once, from the
    main thread, at the process edge.
    """
    for sig in FATAL_SIGNALS:
        signal.signal(sig, _flush_and_die)


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
        structlog.processors.add_log_level,
        _timestamp,
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
