"""Domain exceptions, factored out so every module can raise them without
import loops. The servicer maps them to gRPC status codes in one place."""

from __future__ import annotations

__all__ = [
    "BwpreddError",
    "InvalidArgument",
    "ManifestError",
    "ModelError",
    "PeerNotFound",
    "ResourceExhausted",
]


class BwpreddError(Exception):
    """Base of every error bwpredd raises on purpose."""


class InvalidArgument(BwpreddError):
    """A request broke a rule; the message names the field and the rule."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class PeerNotFound(BwpreddError):
    """A request named a peer the daemon holds no window for."""

    def __init__(self, peer_id: str) -> None:
        super().__init__(f"peer_id: unknown peer {peer_id!r}")
        self.peer_id = peer_id


class ResourceExhausted(BwpreddError):
    """A request would go past a configured limit; the message names it."""

    def __init__(self, limit: str, rule: str) -> None:
        super().__init__(f"{limit}: {rule}")
        self.limit = limit


class ManifestError(BwpreddError):
    """A model directory breaks the manifest contract."""


class ModelError(BwpreddError):
    """A model directory could not be loaded or failed its checks.

    ``reason`` is the message without the directory (what check-model prints
    after it)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message
