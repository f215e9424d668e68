"""Fixtures shared by the daemon's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    """Put structlog's configuration back after a test reconfigures it, in
    place, so loggers of other tests keep seeing the same processor list."""
    old = structlog.get_config()
    saved = list(old["processors"])
    yield
    processors = structlog.get_config()["processors"]
    processors[:] = saved
    structlog.configure(
        processors=processors,
        wrapper_class=old["wrapper_class"],
        context_class=old["context_class"],
        logger_factory=old["logger_factory"],
        cache_logger_on_first_use=old["cache_logger_on_first_use"],
    )
