"""Validation rules for samples and peer ids, vectorised per batch.

The servicer extracts a batch's fields into plain lists (see
:class:`SampleBatch`); the rules here turn them into arrays and a reason per
rejected sample, naming the field and the rule. Domain code never sees
protobuf.
"""

from __future__ import annotations

import re
from collections.abc import Container, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from bwpredd.errors import InvalidArgument
from bwpredd.manifest import FEATURE_RANGES

__all__ = [
    "MAX_BANDWIDTH_MBPS",
    "MAX_LATENCY_MS",
    "MAX_PEER_ID_LEN",
    "PEER_ID_RULE",
    "SampleBatch",
    "ValidBatch",
    "check_peer_id",
    "check_peer_ids",
    "validate_batch",
]

MAX_BANDWIDTH_MBPS = FEATURE_RANGES["bandwidth_mbps"][1]
MAX_LATENCY_MS = FEATURE_RANGES["latency_ms"][1]
MAX_PEER_ID_LEN = 128
PEER_ID_RULE = f"must be 1-{MAX_PEER_ID_LEN} characters of [A-Za-z0-9._:@/-]"
NANOS_RULE = "nanos must be within [0, 999999999]"
_PEER_RE = re.compile(rf"[A-Za-z0-9._:@/-]{{1,{MAX_PEER_ID_LEN}}}")


def check_peer_id(peer_id: str, field: str = "peer_id") -> None:
    """Raise :class:`InvalidArgument` unless ``peer_id`` follows the rule.

    Args:
        peer_id: the id.
        field: the field name to report.
    """
    if not _PEER_RE.fullmatch(peer_id):
        raise InvalidArgument(field, f"{PEER_ID_RULE}, got {_show(peer_id)}")


def check_peer_ids(peer_ids: Sequence[str], max_peers: int) -> None:
    """Check a Forecast/Allocate-style list of peer ids.

    Args:
        peer_ids: the requested ids.
        max_peers: most ids allowed in one request.

    Raises:
        InvalidArgument: empty, too many, an id breaking the rule, or a
            duplicate (naming its index).
    """
    if not peer_ids:
        raise InvalidArgument("peer_ids", "must name at least one peer")
    if len(peer_ids) > max_peers:
        raise InvalidArgument(
            "peer_ids", f"at most {max_peers} peers per request, got {len(peer_ids)}"
        )
    seen: dict[str, int] = {}
    for i, pid in enumerate(peer_ids):
        check_peer_id(pid, f"peer_ids[{i}]")
        if pid in seen:
            raise InvalidArgument(f"peer_ids[{i}]", f"duplicate of peer_ids[{seen[pid]}] ({pid!r})")
        seen[pid] = i


def _show(value: str) -> str:
    """A safe, bounded rendering of a bad id for an error message."""
    shown = value if len(value) <= 40 else value[:37] + "..."
    return ascii(shown) + (f" ({len(value)} chars)" if len(value) > 40 else "")


@dataclass
class SampleBatch:
    """The raw fields of ``n`` samples, as extracted from the wire.

    An optional value that was not given is False in its ``has_*`` list
    (its value is then ignored); ``ts`` is unix seconds or NaN when absent.
    ``bad_nanos`` lists ``(index, nanos)`` of the timestamps whose ``nanos``
    lies outside ``[0, 1e9)`` (rare: kept aside so the hot path stays lists).
    """

    peer_ids: list[str]
    bandwidth: list[float]
    has_bandwidth: list[bool]
    latency: list[float]
    has_latency: list[bool]
    loss: list[float]
    has_loss: list[bool]
    reliability: list[float]
    has_reliability: list[bool]
    ts: list[float]
    bad_nanos: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.peer_ids)


@dataclass(frozen=True)
class ValidBatch:
    """The samples that passed, ready for :meth:`WindowStore.ingest`."""

    index: npt.NDArray[np.int64]  # positions in the request
    peer_ids: list[str]
    rows: npt.NDArray[np.float64]  # [k, 4], NaN = carry forward
    ts: npt.NDArray[np.float64]  # [k] unix seconds
    reasons: dict[int, tuple[str, str]]  # request index -> (field, rule)


def validate_batch(
    batch: SampleBatch,
    now: float,
    known_peers: Container[str],
    max_future_skew_s: float,
    max_age_s: float,
) -> ValidBatch:
    """Apply every sample rule to a batch at once.

    Rules: ``peer_id`` 1-128 characters of ``[A-Za-z0-9._:@/-]``;
    ``bandwidth_mbps`` required, finite, 0..1e7; ``latency_ms`` (optional)
    finite, 0..600000; ``packet_loss`` and ``reliability`` (optional) within
    [0, 1]; ``timestamp`` (optional; arrival time when absent) with ``nanos``
    within ``[0, 999999999]`` and no more than ``max_future_skew_s`` ahead of
    the server clock nor ``max_age_s`` behind.
    The first rule a sample breaks is its reason.

    Args:
        batch: the extracted fields.
        now: the server clock, unix seconds.
        known_peers: ids already tracked (they skip the id check).
        max_future_skew_s: the future-timestamp limit.
        max_age_s: the past-timestamp limit.
    """
    n = len(batch)
    bw = np.asarray(batch.bandwidth, dtype=np.float64)
    lat = np.asarray(batch.latency, dtype=np.float64)
    loss = np.asarray(batch.loss, dtype=np.float64)
    rel = np.asarray(batch.reliability, dtype=np.float64)
    ts = np.asarray(batch.ts, dtype=np.float64)
    has_ts = ~np.isnan(ts)
    ts = np.where(has_ts, ts, now)
    reasons: dict[int, tuple[str, str]] = {}
    bad = np.zeros(n, dtype=bool)

    def rule(mask: npt.NDArray[np.bool_], field: str, text: str) -> None:
        hit = mask & ~bad
        if hit.any():
            for i in np.flatnonzero(hit):
                reasons[int(i)] = (field, text)
            bad[hit] = True

    ids = batch.peer_ids
    id_bad = np.fromiter(
        (p not in known_peers and _PEER_RE.fullmatch(p) is None for p in ids), dtype=bool, count=n
    )
    if id_bad.any():
        for i in np.flatnonzero(id_bad):
            reasons[int(i)] = ("peer_id", f"{PEER_ID_RULE}, got {_show(ids[i])}")
        bad |= id_bad
    has_bw = np.asarray(batch.has_bandwidth, dtype=bool)
    rule(~has_bw, "bandwidth_mbps", "is required")
    with np.errstate(invalid="ignore"):
        rule(~np.isfinite(bw), "bandwidth_mbps", "must be finite (got NaN or infinity)")
        rule(bw < 0, "bandwidth_mbps", "must be >= 0")
        rule(bw > MAX_BANDWIDTH_MBPS, "bandwidth_mbps", "must be <= 1e7 (10 Tbit/s)")
        has_lat = np.asarray(batch.has_latency, dtype=bool)
        has_loss = np.asarray(batch.has_loss, dtype=bool)
        has_rel = np.asarray(batch.has_reliability, dtype=bool)
        rule(has_lat & ~np.isfinite(lat), "latency_ms", "must be finite (got NaN or infinity)")
        rule(has_lat & (lat < 0), "latency_ms", "must be >= 0")
        rule(has_lat & (lat > MAX_LATENCY_MS), "latency_ms", "must be <= 600000 (10 minutes)")
        for values, given, field in (
            (loss, has_loss, "packet_loss"),
            (rel, has_rel, "reliability"),
        ):
            rule(given & ~np.isfinite(values), field, "must be finite (got NaN or infinity)")
            rule(given & ((values < 0) | (values > 1)), field, "must be within [0, 1]")
        for k, nanos in batch.bad_nanos:
            if not bad[k]:
                reasons[k] = ("timestamp", f"{NANOS_RULE}, got {nanos}")
                bad[k] = True
        rule(~np.isfinite(ts), "timestamp", "must be a valid time")
        rule(
            ts > now + max_future_skew_s,
            "timestamp",
            f"more than {max_future_skew_s:g} s in the future",
        )
        rule(ts < now - max_age_s, "timestamp", f"more than {max_age_s:g} s in the past")
    good = np.flatnonzero(~bad)
    # NaN marks "not given" for the store (carry forward); a NaN given on
    # the wire was rejected above, so the two cannot be confused.
    rows = np.stack(
        [
            np.where(has_lat, lat, np.nan),
            bw,
            np.where(has_loss, loss, np.nan),
            np.where(has_rel, rel, np.nan),
        ],
        axis=1,
    )[good]
    return ValidBatch(
        index=good,
        peer_ids=[ids[i] for i in good],
        rows=rows,
        ts=ts[good],
        reasons=reasons,
    )
