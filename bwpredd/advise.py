"""Transfer advice for DWCP from a bandwidth forecast: one job, pure numpy.

Given a peer's forecast (point and nominal 80% interval, Mbit/s), its RTT and a
payload, :func:`advise` answers how DWCP should move the payload and how long
it will take. Every rule below is deliberate and tested; change them together
with ``tests/bwpredd/test_advise.py``.

Units: bandwidth in Mbit/s (10^6 bit/s), ``B = bw * 1e6 / 8`` bytes/s; the
latency is the round-trip time (what workers report as ``latency_ms``).

**Inputs that may be missing.** A bandwidth below :data:`MIN_BW_MBPS`
(1 kbit/s) is floored there, so times stay finite through outages. A missing
latency (None or NaN) is taken as :data:`ASSUMED_RTT_MS` (50 ms, the engine's
default latency) for the bandwidth-delay product and the transfer time, and
makes the network mode ``unknown`` unless the bandwidth alone says
``internet``. ``Advice.latency_ms`` reports the RTT actually used.

**Network mode** (from the point forecast and the RTT):

* ``datacenter``: RTT <= 2 ms and bandwidth >= 1000 Mbit/s;
* ``internet``: RTT >= 10 ms, or bandwidth < 100 Mbit/s (at any RTT);
* ``unknown``: everything between (a 2-10 ms path at >= 100 Mbit/s, a short
  path at 100-1000 Mbit/s, or an unknown RTT at >= 100 Mbit/s).

**Bandwidth-delay product** ``BDP = B * RTT`` bytes at the point forecast.

**Parallel streams** ``= clamp(ceil(BDP / 512 KiB), 1, 16)``: a TCP stream
whose window must grow past ~512 KiB needs many loss-free round trips to get
back there after each loss (Reno/CUBIC recovery scales with the window), so
above that the transfer is split. When the peer's packet loss ``p > 0`` is
known, the Mathis et al. bound on one stream's rate,
``MSS * 8 / RTT * 1.22 / sqrt(p)`` bit/s (MSS 1448 bytes), is applied too: at
least ``ceil(bw / that)`` streams, within the same clamp.

**Socket buffer** per stream ``= clamp(2 * BDP, 64 KiB, 64 MiB)``, rounded up
to a 4 KiB page. Each stream's buffer covers the whole BDP so one stream can
take up the slack while the others recover from loss; the factor 2 is Linux's
(the kernel counts bookkeeping against ``SO_SNDBUF``/``SO_RCVBUF``, leaving
about half for the window). A buffer is a ceiling that autotuning grows into,
not memory spent up front.

**Compression.** For each codec/level of the measured :class:`CodecTable`
(plus ``none``), with compress speed ``c``, decompress speed ``d`` (bytes/s
of original data, one thread) and ratio ``r`` for the payload's data kind,
streaming compression is pipelined with the network, so the slowest stage
sets the pace::

    T = RTT + max(P / c, P * r / B, P / d)        (none: RTT + P / B)

The codec with the smallest ``T`` at the point forecast wins (ties go to the
cheaper entry: none, then the table's order). The data kind ``unspecified``
uses the ``memory`` rows (DWCP mostly moves VM memory). A ``compressibility``
hint ``h`` (expected compressed/original size, in (0, 1]) is read as zstd
level 3's ratio on this payload, and each codec keeps its measured share of
zstd 3's saving: ``r' = clip(1 - (1 - r) * (1 - h) / (1 - r_zstd3), 0.01, 1)``
(so ``h = 1`` turns every codec's gain off). A hint contradicts ``random``, so
with a hint ``random`` is read as ``memory``; speeds stay as measured.

zstd 19 is in the table for completeness: it compresses at single-digit MB/s,
so it only wins on links of a few Mbit/s carrying compressible data.

**With horizon forecasts** (a model directory that declares horizons, and a
peer with a full window: ``horizon`` below) the network term ``P * r / B``
is replaced by the time the compressed payload ``P * r`` takes at the
bandwidth forecast over its own duration (:mod:`bwpredd.transfer`): its
median for the codec choice and ``transfer_seconds``, its 10th and 90th
percentiles for ``transfer_seconds_low`` and ``transfer_seconds_high``. The
RTT and the codec stages stay as above. Without them (no such model, or a
peer still filling its window) the rule is the one below.

**Transfer time** ``transfer_seconds`` is ``T`` of the chosen codec at the
point forecast; ``transfer_seconds_low`` at the interval's high end (the
fastest plausible) and ``transfer_seconds_high`` at its low end (the slowest).

**Confidence** ``= exp(-w) * L`` in [0, 1], where ``w = (high - low) / point``
is the interval's relative width and ``L = exp(-2 e)`` with ``e`` the peer's
live normalised mean absolute error (rolling MAE / mean actual bandwidth of
the predictor serving it), or ``L = 0.75`` when the peer has no live score yet
(about what a 15% live error gives). Both factors fall as the interval widens
or the live error grows. For example a +-10% interval (w = 0.2) with a 5% live
error gives 0.74; w = 1 with no score gives 0.28.

:func:`rank` orders advice by estimated transfer time, for route choice.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from bwpredd.errors import InvalidArgument
from bwpredd.transfer import HorizonCurves

__all__ = [
    "ASSUMED_RTT_MS",
    "DATA_KINDS",
    "DEFAULT_CODEC_TABLE",
    "Advice",
    "CodecTable",
    "DataKind",
    "NetworkMode",
    "advise",
    "advise_many",
    "network_mode",
    "rank",
]

F64 = npt.NDArray[np.float64]
DataKind = Literal["memory", "text", "random", "unspecified"]
NetworkMode = Literal["datacenter", "internet", "unknown"]
DATA_KINDS: tuple[str, ...] = ("memory", "text", "random", "unspecified")
_KINDS = ("memory", "text", "random")  # the measured kinds
DEFAULT_CODEC_TABLE = Path(__file__).parent / "data" / "codecs.json"

MIN_BW_MBPS = 1e-3
ASSUMED_RTT_MS = 50.0
DC_MAX_RTT_MS = 2.0
DC_MIN_BW_MBPS = 1000.0
INTERNET_MIN_RTT_MS = 10.0
INTERNET_MAX_BW_MBPS = 100.0
STREAM_WINDOW_BYTES = 512 * 1024
MAX_STREAMS = 16
MSS_BYTES = 1448
MATHIS_C = 1.22
MIN_BUFFER_BYTES = 64 * 1024
MAX_BUFFER_BYTES = 64 * 1024 * 1024
BUFFER_PAGE = 4096
UNSCORED_FACTOR = 0.75
LIVE_ERROR_WEIGHT = 2.0


@dataclass(frozen=True)
class Advice:
    """Transfer advice for one peer and payload."""

    peer_id: str
    payload_bytes: int
    bandwidth_mbps: float  # the point forecast used
    low_mbps: float
    high_mbps: float
    transfer_seconds: float
    transfer_seconds_low: float  # at the interval's high end
    transfer_seconds_high: float  # at the interval's low end
    parallel_streams: int
    socket_buffer_bytes: int  # per stream
    network_mode: NetworkMode
    codec: Literal["none", "lz4", "zstd"]
    level: int  # zstd level; 0 for none and lz4
    ratio: float  # estimated compressed / original size
    confidence: float
    latency_ms: float  # RTT used
    bdp_bytes: float


@dataclass(frozen=True)
class CodecTable:
    """Measured codec speeds and ratios per data kind.

    Row 0 of every array is ``none`` (ratio 1, infinite speed); the other rows
    follow the table file's order.
    """

    codecs: tuple[tuple[str, int], ...]  # (codec, level) per row
    ratio: dict[str, F64]  # kind -> [rows]
    compress_bps: dict[str, F64]  # kind -> [rows], bytes/s of original data
    decompress_bps: dict[str, F64]
    machine: dict[str, Any]
    measured_at: str

    @classmethod
    def load(cls, path: Path | str = DEFAULT_CODEC_TABLE) -> CodecTable:
        """Read a table written by ``python -m bench.measure_codecs``.

        Args:
            path: the JSON file; defaults to the one shipped with bwpredd.

        Raises:
            ValueError: the file is not a codec table of format 1.
        """
        raw = json.loads(Path(path).read_text())
        if raw.get("format") != 1:
            raise ValueError(f"{path}: not a codec table of format 1")
        rows: list[tuple[str, int]] = [("none", 0)]
        ratio: dict[str, list[float]] = {k: [1.0] for k in _KINDS}
        comp: dict[str, list[float]] = {k: [math.inf] for k in ratio}
        decomp: dict[str, list[float]] = {k: [math.inf] for k in ratio}
        for entry in raw["codecs"]:
            codec, level = str(entry["codec"]), int(entry["level"])
            if codec not in ("lz4", "zstd"):
                raise ValueError(f"{path}: unknown codec {codec!r}")
            rows.append((codec, level))
            for kind in _KINDS:
                m = entry["kinds"][kind]
                r, c, d = float(m["ratio"]), float(m["compress_mb_s"]), float(m["decompress_mb_s"])
                if not (r > 0 and c > 0 and d > 0):
                    raise ValueError(f"{path}: {codec} {level} {kind}: values must be > 0")
                ratio[kind].append(r)
                comp[kind].append(c * 1e6)
                decomp[kind].append(d * 1e6)
        if ("zstd", 3) not in rows:
            raise ValueError(f"{path}: zstd level 3 is required (the compressibility reference)")
        return cls(
            codecs=tuple(rows),
            ratio={k: np.asarray(v) for k, v in ratio.items()},
            compress_bps={k: np.asarray(v) for k, v in comp.items()},
            decompress_bps={k: np.asarray(v) for k, v in decomp.items()},
            machine=dict(raw.get("machine", {})),
            measured_at=str(raw.get("measured_at", "")),
        )

    def rows(self, data_kind: str, compressibility: float | None = None) -> tuple[F64, F64, F64]:
        """``(ratio, compress_bps, decompress_bps)`` for a data kind and hint.

        Args:
            data_kind: one of :data:`DATA_KINDS`.
            compressibility: expected zstd-3 ratio of the payload, (0, 1].

        Raises:
            InvalidArgument: an unknown kind or a hint outside (0, 1].
        """
        if data_kind not in DATA_KINDS:
            raise InvalidArgument("data_kind", f"must be one of {', '.join(DATA_KINDS)}")
        kind = "memory" if data_kind == "unspecified" else data_kind
        if compressibility is not None:
            if not (0 < compressibility <= 1):
                raise InvalidArgument("compressibility", "must be in (0, 1]")
            kind = "memory" if kind == "random" else kind
        ratio = self.ratio[kind]
        if compressibility is not None:
            ref = ratio[self.codecs.index(("zstd", 3))]
            saving = (1.0 - ratio) * (1.0 - compressibility) / max(1.0 - ref, 1e-6)
            ratio = np.clip(1.0 - saving, 0.01, 1.0)
            ratio[0] = 1.0
        return ratio, self.compress_bps[kind], self.decompress_bps[kind]


def network_mode(bw_mbps: float, rtt_ms: float | None) -> NetworkMode:
    """The link's mode under the module's thresholds.

    Args:
        bw_mbps: point forecast, Mbit/s.
        rtt_ms: round-trip time, ms; None or NaN when unknown.
    """
    if bw_mbps < INTERNET_MAX_BW_MBPS:
        return "internet"
    if rtt_ms is None or math.isnan(rtt_ms):
        return "unknown"
    if rtt_ms >= INTERNET_MIN_RTT_MS:
        return "internet"
    if rtt_ms <= DC_MAX_RTT_MS and bw_mbps >= DC_MIN_BW_MBPS:
        return "datacenter"
    return "unknown"


def _times(payload: float, net_s: F64, rtt_s: F64, c: F64, d: F64) -> F64:
    """Pipelined transfer times ``[k, rows]`` (or ``[k]`` with per-peer rows)
    from the network stage's seconds."""
    with np.errstate(divide="ignore"):
        stages = np.maximum(np.maximum(payload / c, net_s), payload / d)
    return rtt_s + stages


def advise(
    point: float,
    low: float,
    high: float,
    latency_ms: float | None,
    payload_bytes: int,
    *,
    data_kind: str = "unspecified",
    compressibility: float | None = None,
    live_error_ratio: float | None = None,
    table: CodecTable | None = None,
    packet_loss: float | None = None,
    peer_id: str = "",
) -> Advice:
    """Transfer advice for one peer (the rules are in the module docstring).

    Args:
        point: point forecast, Mbit/s.
        low: interval low end, Mbit/s.
        high: interval high end, Mbit/s.
        latency_ms: the peer's RTT, ms; None or NaN when unknown.
        payload_bytes: bytes to move, >= 0.
        data_kind: ``memory``, ``text``, ``random`` or ``unspecified``.
        compressibility: caller's expected compressed/original size, (0, 1].
        live_error_ratio: the peer's live normalised MAE; None if unscored.
        table: measured codecs; the shipped table when None.
        packet_loss: the peer's loss fraction, for the stream count; optional.
        peer_id: carried into the advice (for :func:`rank`).

    Raises:
        InvalidArgument: a negative payload, an unknown data kind or a hint
            outside (0, 1].
    """

    def arr(x: float | None) -> F64:
        return np.array([math.nan if x is None else x], dtype=np.float64)

    (out,) = advise_many(
        [peer_id],
        arr(point),
        arr(low),
        arr(high),
        arr(latency_ms),
        payload_bytes=payload_bytes,
        data_kind=data_kind,
        compressibility=compressibility,
        live_error_ratio=arr(live_error_ratio),
        table=table,
        packet_loss=arr(packet_loss),
    )
    return out


ArrayLike = Sequence[float] | npt.NDArray[np.floating[Any]]


def advise_many(
    peer_ids: Sequence[str],
    point: ArrayLike,
    low: ArrayLike,
    high: ArrayLike,
    latency_ms: ArrayLike,
    *,
    payload_bytes: int,
    data_kind: str = "unspecified",
    compressibility: float | None = None,
    live_error_ratio: ArrayLike | None = None,
    table: CodecTable | None = None,
    packet_loss: ArrayLike | None = None,
    horizon: tuple[npt.NDArray[np.int64], HorizonCurves] | None = None,
) -> list[Advice]:
    """:func:`advise` for the ``k`` peers of one request, vectorised, in order.

    NaN in ``latency_ms``, ``live_error_ratio`` or ``packet_loss`` means
    unknown for that peer.

    Args:
        peer_ids: ``[k]`` peer ids.
        point: ``[k]`` point forecasts, Mbit/s.
        low: ``[k]`` interval low ends.
        high: ``[k]`` interval high ends.
        latency_ms: ``[k]`` RTTs, ms.
        payload_bytes: bytes to move, >= 0.
        data_kind: ``memory``, ``text``, ``random`` or ``unspecified``.
        compressibility: caller's expected compressed/original size, (0, 1].
        live_error_ratio: ``[k]`` live normalised MAE, or None: all unscored.
        table: measured codecs; the shipped table when None.
        packet_loss: ``[k]`` loss fractions, or None: all unknown.
        horizon: ``(rows, curves)``: horizon forecasts for those of the ``k``
            peers at ``rows``; their network times come from the curves.

    Raises:
        InvalidArgument: a negative payload, an unknown data kind or a hint
            outside (0, 1].
    """
    if payload_bytes < 0:
        raise InvalidArgument("payload_bytes", "must be >= 0")
    tbl = table if table is not None else _default_table()
    ratio, comp, decomp = tbl.rows(data_kind, compressibility)
    k = len(peer_ids)

    def col(x: ArrayLike | None) -> F64:
        if x is None:
            return np.full(k, math.nan)
        out = np.asarray(x, dtype=np.float64).reshape(-1)
        if out.shape != (k,):
            raise ValueError(f"expected {k} values, got {out.shape[0]}")
        return out

    def floor(x: F64) -> F64:
        return np.where(np.isfinite(x) & (x > MIN_BW_MBPS), x, MIN_BW_MBPS)

    bw = floor(col(point))
    lo = np.minimum(floor(col(low)), bw)
    hi = np.maximum(floor(col(high)), bw)
    lat = col(latency_ms)
    known = np.isfinite(lat) & (lat >= 0)
    rtt_ms = np.where(known, lat, ASSUMED_RTT_MS)
    rtt_s = rtt_ms / 1e3
    bdp = bw * 1e6 / 8 * rtt_s
    payload = float(payload_bytes)

    # [k, rows] times at the point; argmin keeps the first of ties (none first).
    wire = payload * ratio[None, :]  # bytes on the wire per codec row
    net = wire / (bw * 1e6 / 8)[:, None]
    if horizon is not None and len(horizon[0]):
        rows_h, curves = horizon
        net[rows_h] = curves.seconds(np.broadcast_to(wire, (len(rows_h), len(ratio))))[0]
    at_point = _times(payload, net, rtt_s[:, None], comp, decomp)
    best = np.argmin(at_point, axis=1)
    chosen = (ratio[best], comp[best], decomp[best])
    t_point = at_point[np.arange(k), best]
    with np.errstate(divide="ignore"):
        net_fast = payload * chosen[0] / (hi * 1e6 / 8)
        net_slow = payload * chosen[0] / (lo * 1e6 / 8)
    if horizon is not None and len(horizon[0]):
        rows_h, curves = horizon
        _, net_fast[rows_h], net_slow[rows_h] = curves.seconds(payload * chosen[0][rows_h])
    t_fast = _times(payload, net_fast, rtt_s, chosen[1], chosen[2])
    t_slow = _times(payload, net_slow, rtt_s, chosen[1], chosen[2])

    # Streams: the window rule, raised by the Mathis loss rule where loss > 0.
    streams = np.ceil(bdp / STREAM_WINDOW_BYTES)
    loss = col(packet_loss)
    lossy = np.isfinite(loss) & (loss > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_stream_bps = MSS_BYTES * 8 / rtt_s * MATHIS_C / np.sqrt(np.where(lossy, loss, 1.0))
        by_loss = np.ceil(bw * 1e6 / per_stream_bps)
    streams = np.where(lossy & (rtt_s > 0), np.maximum(streams, by_loss), streams)
    streams = np.clip(streams, 1, MAX_STREAMS).astype(np.int64)
    buffers = np.ceil(np.clip(2.0 * bdp, MIN_BUFFER_BYTES, MAX_BUFFER_BYTES) / BUFFER_PAGE)
    buffers = (buffers * BUFFER_PAGE).astype(np.int64)

    width = (hi - lo) / bw
    err = col(live_error_ratio)
    live = np.where(
        np.isfinite(err), np.exp(-LIVE_ERROR_WEIGHT * np.maximum(err, 0.0)), UNSCORED_FACTOR
    )
    conf = np.clip(np.exp(-width) * live, 0.0, 1.0)

    out: list[Advice] = []
    for i in range(k):
        codec, level = tbl.codecs[int(best[i])]
        out.append(
            Advice(
                peer_id=peer_ids[i],
                payload_bytes=int(payload_bytes),
                bandwidth_mbps=float(bw[i]),
                low_mbps=float(lo[i]),
                high_mbps=float(hi[i]),
                transfer_seconds=float(t_point[i]),
                transfer_seconds_low=float(t_fast[i]),
                transfer_seconds_high=float(t_slow[i]),
                parallel_streams=int(streams[i]),
                socket_buffer_bytes=int(buffers[i]),
                network_mode=network_mode(float(bw[i]), float(lat[i]) if known[i] else None),
                codec=codec,  # type: ignore[arg-type]
                level=level if codec == "zstd" else 0,
                ratio=float(chosen[0][i]),
                confidence=float(conf[i]),
                latency_ms=float(rtt_ms[i]),
                bdp_bytes=float(bdp[i]),
            )
        )
    return out


def rank(advices: Sequence[Advice]) -> list[Advice]:
    """Advice ordered fastest first (estimated transfer time, then the slow
    end of its interval, then peer id, so the order is total and stable).

    Args:
        advices: one per candidate peer.
    """
    return sorted(advices, key=lambda a: (a.transfer_seconds, a.transfer_seconds_high, a.peer_id))


@functools.cache
def _default_table() -> CodecTable:
    """The shipped table, read once."""
    return CodecTable.load()
