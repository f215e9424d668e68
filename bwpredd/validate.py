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

from bwpredd import schema
from bwpredd.errors import InvalidArgument

__all__ = [
    "MAX_PEER_ID_LEN",
    "PEER_ID_RULE",
    "SampleBatch",
    "ValidBatch",
    "check_peer_id",
    "check_peer_ids",
    "validate_batch",
]

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

    ``values[f]`` and ``given[f]`` hold feature ``f`` (in the order of
    :data:`bwpredd.schema.FEATURES`) of every sample; a value that was not
    given is False in ``given`` (its value is then ignored). ``ts`` is unix
    seconds or NaN when absent. ``bad_nanos`` lists ``(index, nanos)`` of the
    timestamps whose ``nanos`` lies outside ``[0, 1e9)`` (rare: kept aside so
    the hot path stays lists).
    """

    peer_ids: list[str]
    values: list[list[float]]  # [WIDTH][n]
    given: list[list[bool]]  # [WIDTH][n]
    ts: list[float]
    bad_nanos: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.peer_ids)


# Every range rule of each feature at once, ``[WIDTH, 1]``: a given value is
# within its feature's rules when it is finite and within [lo, hi].
_LO = np.array([[max(r[0] for r in f.range_rules())] for f in schema.SCHEMA])
_HI = np.array([[min(r[1] for r in f.range_rules())] for f in schema.SCHEMA])
_REQUIRED = np.array([f.required for f in schema.SCHEMA])


@dataclass(frozen=True)
class ValidBatch:
    """The samples that passed, ready for :meth:`WindowStore.ingest`."""

    index: npt.NDArray[np.int64]  # positions in the request
    peer_ids: list[str]
    rows: npt.NDArray[np.float64]  # [k, WIDTH], NaN = carry forward
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

    Rules: ``peer_id`` 1-128 characters of ``[A-Za-z0-9._:@/-]``; then each
    feature of :mod:`bwpredd.schema`, the required ones first: a required
    feature must be given, and a given value must be finite and within the
    feature's range; ``timestamp`` (optional; arrival time when absent) with
    ``nanos`` within ``[0, 999999999]`` and no more than ``max_future_skew_s``
    ahead of the server clock nor ``max_age_s`` behind.
    The first rule a sample breaks is its reason.

    Args:
        batch: the extracted fields.
        now: the server clock, unix seconds.
        known_peers: ids already tracked (they skip the id check).
        max_future_skew_s: the future-timestamp limit.
        max_age_s: the past-timestamp limit.
    """
    n = len(batch)
    values = np.asarray(batch.values, dtype=np.float64).reshape(schema.WIDTH, n)
    given = np.asarray(batch.given, dtype=bool).reshape(schema.WIDTH, n)
    ts = np.asarray(batch.ts, dtype=np.float64)
    ts = np.where(np.isnan(ts), now, ts)
    ids = batch.peer_ids
    id_bad = np.fromiter(
        (p not in known_peers and _PEER_RE.fullmatch(p) is None for p in ids), dtype=bool, count=n
    )
    # A batch that breaks no rule (the common case) is checked with every
    # rule at once; one that breaks any goes through them one by one, which
    # names the first each sample breaks.
    clean = (
        not batch.bad_nanos
        and not id_bad.any()
        and bool(given[_REQUIRED].all())
        and bool((~given | (np.isfinite(values) & (values >= _LO) & (values <= _HI))).all())
        and bool(((ts >= now - max_age_s) & (ts <= now + max_future_skew_s)).all())
    )
    if clean:
        return ValidBatch(
            index=np.arange(n),
            peer_ids=list(ids),
            rows=np.where(given, values, np.nan).T.copy(),
            ts=ts,
            reasons={},
        )
    return _rule_by_rule(batch, values, given, ts, id_bad, now, max_future_skew_s, max_age_s)


def _rule_by_rule(  # noqa: PLR0917 (validate_batch's arrays and limits)
    batch: SampleBatch,
    values: npt.NDArray[np.float64],
    given: npt.NDArray[np.bool_],
    ts: npt.NDArray[np.float64],
    id_bad: npt.NDArray[np.bool_],
    now: float,
    max_future_skew_s: float,
    max_age_s: float,
) -> ValidBatch:
    """:func:`validate_batch` one rule at a time, in the documented order."""
    n = len(batch)
    ids = batch.peer_ids
    reasons: dict[int, tuple[str, str]] = {}
    bad = np.zeros(n, dtype=bool)

    def rule(mask: npt.NDArray[np.bool_], field: str, text: str) -> None:
        hit = mask & ~bad
        if hit.any():
            for i in np.flatnonzero(hit):
                reasons[int(i)] = (field, text)
            bad[hit] = True

    if id_bad.any():
        for i in np.flatnonzero(id_bad):
            reasons[int(i)] = ("peer_id", f"{PEER_ID_RULE}, got {_show(ids[i])}")
        bad |= id_bad
    with np.errstate(invalid="ignore"):
        for f in schema.VALIDATION_ORDER:
            feature, v, g = schema.SCHEMA[f], values[f], given[f]
            if feature.required:
                rule(~g, feature.name, "is required")
            rule(g & ~np.isfinite(v), feature.name, "must be finite (got NaN or infinity)")
            for lo, hi, text in feature.range_rules():
                rule(g & ((v < lo) | (v > hi)), feature.name, text)
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
    rows = np.where(given, values, np.nan).T[good]
    return ValidBatch(
        index=good,
        peer_ids=[ids[i] for i in good],
        rows=rows,
        ts=ts[good],
        reasons=reasons,
    )
