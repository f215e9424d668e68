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
    """
    json_out = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if json_out else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    """A structlog logger carrying ``logger_name=name``.

    Args:
        name: the module's name.
    """
    return structlog.get_logger().bind(logger_name=name)
