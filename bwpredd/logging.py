"""Logging set-up, done once at the process edge: structlog to stdout, JSON
when stdout is not a terminal (systemd, Kubernetes), readable on a TTY.

Request-scoped values (``rpc``, ``peer_id``, ``model_version``) are bound
through context variables so one canonical line per RPC carries them.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure_logging", "get_logger"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


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
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
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
