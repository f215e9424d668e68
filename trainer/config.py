"""Constants the trainer shares with the model directory it produces."""

from __future__ import annotations

from bwpredd.manifest import FEATURES, WINDOW

__all__ = ["FEATURES", "FEATURE_DEFAULTS", "WINDOW"]

# What a missing feature reads as, in training and in the daemon (declared in
# the manifest). Real traces mostly carry bandwidth alone: these are the
# values of a healthy, unremarkable internet path.
FEATURE_DEFAULTS: dict[str, float] = {
    "latency_ms": 50.0,
    "packet_loss": 0.0,
    "reliability": 1.0,
}
