"""The feature schema: what one sample of a peer link measures, defined once.

A peer's window is :data:`WINDOW` samples (oldest first) of :data:`WIDTH`
features, float32, in the order of :data:`FEATURES`. Everything that reads or
writes a feature derives from this module: sample validation and its error
messages (:mod:`bwpredd.validate`), the window store and its snapshot checks
(:mod:`bwpredd.windows`), the manifest's features, units and defaults
(:mod:`bwpredd.manifest`), the allocator state's columns
(:mod:`bwpredd.state`), the CSV headers of ``bwpredctl push`` and of trace
files (:mod:`bwpredd.ctl`, :mod:`bwpredd.traces`), and the trainer and
export. A feature's name is also its ``Sample`` field in the API, its CSV
column and its key in a manifest.

Adding a feature (say ``jitter_ms``) means, besides a :class:`Feature` here:

1. the field in ``Sample`` of ``proto/bwpred/v1/bwpred.proto`` (``optional
   double``, the same name), regenerated with ``make gen`` and ``make go-gen``;
2. the hand-unrolled read in :func:`bwpredd.servicer.extract_batch` (kept
   unrolled for speed; ``tests/bwpredd/test_schema.py`` fails until it
   agrees with this module);
3. what the trainer knows of the new column: which trace sources measure it
   (:mod:`bwpredd.traces`), the synthetic profiles
   (``trainer.data.synthetic``), how the forecaster scales it
   (``Forecaster.features`` in ``trainer.models.forecaster``) and, if the
   allocator should see it, ``STATE_LAYOUT`` in :mod:`bwpredd.state`;
4. retraining and exporting every model directory, the embedded default
   included: a manifest names its features, and the daemon refuses a model
   whose features are not these.

It imports nothing but the standard library and numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "BW",
    "DEFAULTS",
    "FEATURES",
    "LAT",
    "LOSS",
    "OPTIONAL",
    "PUSH_CSV_REQUIRED",
    "REL",
    "REQUIRED",
    "SCHEMA",
    "TRACE_CSV_HEADER",
    "TRACE_CSV_REQUIRED",
    "UNITS",
    "VALIDATION_ORDER",
    "WIDTH",
    "WINDOW",
    "Feature",
    "default_vector",
    "stack",
]


@dataclass(frozen=True)
class Feature:
    """One measured feature of a peer link.

    Attributes:
        name: the ``Sample`` field, CSV column and manifest key.
        unit: the unit, as a manifest's ``units`` writes it.
        low: the lowest valid value (inclusive).
        high: the highest valid value (inclusive).
        default: what the feature reads as when a peer has never reported it
            (a model directory may declare its own); None for a required
            feature, which has no default.
        high_rule: how an error states the upper bound, e.g. ``"1e7 (10
            Tbit/s)"``; None when the range reads better as one rule
            ``within [low, high]``.
    """

    name: str
    unit: str
    low: float
    high: float
    default: float | None
    high_rule: str | None = None

    @property
    def required(self) -> bool:
        """A sample must carry it (optional features are carried forward)."""
        return self.default is None

    def range_rules(self) -> tuple[tuple[float, float, str], ...]:
        """The range rules of a finite value: ``(lo, hi, text)`` each, broken
        when the value lies outside ``[lo, hi]``; ``text`` is the rule as an
        error message states it after the field name."""
        if self.high_rule is None:
            return ((self.low, self.high, f"must be within [{self.low:g}, {self.high:g}]"),)
        return (
            (self.low, math.inf, f"must be >= {self.low:g}"),
            (-math.inf, self.high, f"must be <= {self.high_rule}"),
        )


# The features, in the window's column order. The ranges are inclusive and
# hold for live samples, restored windows and a manifest's defaults alike. The
# defaults are those of a healthy, unremarkable internet path: real traces
# mostly carry bandwidth alone, and this is what the rest reads as, in
# training and in the daemon (a manifest declares the ones its model learnt).
SCHEMA: tuple[Feature, ...] = (
    # Round-trip time; up to 10 minutes.
    Feature("latency_ms", "ms", 0.0, 600_000.0, 50.0, "600000 (10 minutes)"),
    # Up to 10 Tbit/s: nothing physical is faster.
    Feature("bandwidth_mbps", "Mbit/s", 0.0, 1e7, None, "1e7 (10 Tbit/s)"),
    Feature("packet_loss", "fraction 0..1", 0.0, 1.0, 0.0),
    Feature("reliability", "fraction 0..1", 0.0, 1.0, 1.0),
)

# Samples per window (the model's input length).
WINDOW = 10
# Features per sample: the window's last axis.
WIDTH = len(SCHEMA)
FEATURES: tuple[str, ...] = tuple(f.name for f in SCHEMA)
UNITS: dict[str, str] = {f.name: f.unit for f in SCHEMA}
REQUIRED: tuple[str, ...] = tuple(f.name for f in SCHEMA if f.required)
OPTIONAL: tuple[str, ...] = tuple(f.name for f in SCHEMA if not f.required)
# Optional features' defaults, by name (what a manifest's feature_defaults holds).
DEFAULTS: dict[str, float] = {f.name: f.default for f in SCHEMA if f.default is not None}
# Feature indices in the order a sample's features are checked: its first
# broken rule is the reason it is rejected, and a missing required value
# outranks the rest.
VALIDATION_ORDER: tuple[int, ...] = tuple(
    sorted(range(len(SCHEMA)), key=lambda i: not SCHEMA[i].required)
)

# Columns of the window (index constants for code about one feature).
LAT = FEATURES.index("latency_ms")
BW = FEATURES.index("bandwidth_mbps")
LOSS = FEATURES.index("packet_loss")
REL = FEATURES.index("reliability")

# A generic trace CSV's header: time_s and the required features, in this
# order, then any of the optional ones (in any order; all of them, as in
# TRACE_CSV_HEADER, is the usual form).
TRACE_CSV_REQUIRED: tuple[str, ...] = ("time_s", *REQUIRED)
TRACE_CSV_HEADER: tuple[str, ...] = (*TRACE_CSV_REQUIRED, *OPTIONAL)
# The columns a ``bwpredctl push`` CSV header must name; it may also name the
# optional features and ``timestamp``.
PUSH_CSV_REQUIRED: tuple[str, ...] = ("peer_id", *REQUIRED)


def default_vector(defaults: Mapping[str, float] | None = None) -> tuple[float, ...]:
    """Feature defaults in feature order; a required feature reads 0 (it is
    never filled in).

    Args:
        defaults: each optional feature's default, by name (a manifest's
            ``feature_defaults``); None: the schema's own.
    """
    given = DEFAULTS if defaults is None else defaults
    return tuple(float(given.get(f.name, 0.0)) for f in SCHEMA)


def stack(columns: Mapping[str, npt.ArrayLike]) -> npt.NDArray[np.float32]:
    """Named columns as one float32 array with a last axis of :data:`WIDTH`,
    each at its feature's index.

    Args:
        columns: one array (all of one shape) per feature name, every
            feature present.

    Raises:
        ValueError: a feature missing or a name that is not a feature.
    """
    if set(columns) != set(FEATURES):
        raise ValueError(f"columns: expected exactly {list(FEATURES)}, got {sorted(columns)}")
    return np.stack([np.asarray(columns[name]) for name in FEATURES], axis=-1).astype(np.float32)
