"""Turn a directory of real network traces into per-trace feature arrays.

One job: :func:`load_traces` reads every file under a traces directory (the
nine public sources described in ``shared/traces/README.md``, plus the
project's generic CSV format) and returns one :class:`Trace` per series, each
a ``float32 [T, WIDTH]`` array with the features of :mod:`bwpredd.schema` in
its order, in raw units, at the trace's own step. Nothing is resampled.
Both ``bwpredctl replay`` and the trainer read traces through it, so it lives
in the daemon package and needs numpy alone (tqdm, for a progress bar, if it
is installed). It is past 600 lines because it holds nine sources' loaders,
each short and sharing the readers above them; split, each file would hold
little but imports.

Per-source choices (each follows the traces README; see the loader for why):

* ``mahimahi_cellular``: packet-delivery timestamps binned into 1 s capacity,
  ``count * 1500 * 8 / 1e6`` Mbit/s; empty bins are real zeros; the final,
  partial bin is dropped because it would read low. ``.up``/``.down`` of one
  drive share a group.
* ``ucc_5g``: ``DL_bitrate`` kbit/s / 1000 (these are download sessions, so
  uplink is not the forecast target); rows with a repeated timestamp are
  averaged; ``PINGAVG`` is the latency and ``PINGLOSS``/100 the loss, each
  carried forward from its last real value (the default before the first);
  reliability = 1 - loss where loss is known.
* ``puffer``: the values are MB/s (the redistributor divided bytes/s by 1e6),
  so they are multiplied by 8; files of one session (``trace<session>_<i>``)
  share a group.
* ``pantheon_genet``: the 0.1 placeholder first bin is dropped; latency is the
  trace's one-way delay * 2, as an RTT, constant over the trace; the ``loss``
  field is a simulator parameter and is ignored; a measurement folder is a group.
* ``umn_5gophers``: ``01-Throughput/data.csv`` is split into its
  (protocol, carrier, num_tcp_conn, server_location, run_num) series ordered by
  ``seq_num``; runs of one carrier to one server were measured back to back
  and share a group (as a Pantheon folder does). The car-driving file gives one
  series per carrier (one group: the same drive), the walking file one series.
  The RTT and ping files hold no throughput and are reported in ``skipped``.
* ``pensieve_norway_hsdpa``: grouped by route + day (overlapping logs).
* ``pensieve_fcc``, ``lumos5g``, ``oboe``: two whitespace-separated columns,
  one group per file.

Recordings (what a daemon accepted, ``<state_dir>/recordings/``, format 1:
``.npz`` archives with ``version``, ``node``, and per sample ``peer``, ``t``
(Unix seconds), ``features`` ``[n, 4]`` and the ``sent`` bits), in files named
``rec-<15-digit ms>-<8 hex>.npz`` anywhere under the root, so the root may
be one node's recordings directory or a fleet's directories side by side
(``fleet/node-a/recordings/``, ``fleet/node-b/*.npz``). One peer of one node
is one series: its rows from every file of that node, in time order, with the
features as the daemon stored them (after carry-forward); a feature is
``measured`` when the worker sent it at least once. Source =
``recordings:<node>`` (so the trainer's per-source reports are per node),
group = ``<node>/<peer>`` (one peer stays one unit), name = the group, with
``#<k>`` appended to each segment when gaps cut the peer into several: a gap
is a step longer than :data:`GAP_FACTOR` times the peer's median step (the
daemon was down or the worker stopped reporting; a window across it would
mix two stretches of the link). ``start_s`` holds each segment's absolute
time, which the trainer's split by time needs. A node name found in two
directories is made unique as ``<node>@<directory>`` (with a warning), so two
machines that share a hostname are never interleaved. An unreadable or torn
file is skipped with a warning naming it.

Generic CSV (for people's own measurements): any ``.csv``/``.csv.gz`` whose
header is ``time_s,bandwidth_mbps`` followed by any of the optional features
``latency_ms``, ``packet_loss``, ``reliability`` (in any order;
``bwpredd.schema.TRACE_CSV_HEADER``, all of them, is the usual form).
Those may be empty, or missing at the end of a row; an empty cell
carries the column's last value forward (the default before the first), and
a column that is empty throughout (or absent) is not ``measured``. Source =
the first directory under the root (the root's own name for files directly in
it); group = the file.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import os
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bwpredd import recording
from bwpredd.schema import BW, DEFAULTS, FEATURES, OPTIONAL, TRACE_CSV_REQUIRED, WIDTH

__all__ = [
    "GAP_FACTOR",
    "RECORDING_SOURCE",
    "SOURCES",
    "LoadResult",
    "Trace",
    "load_traces",
    "summarize",
]

SOURCES = (
    "pensieve_fcc",
    "pensieve_norway_hsdpa",
    "mahimahi_cellular",
    "ucc_5g",
    "lumos5g",
    "oboe",
    "puffer",
    "umn_5gophers",
    "pantheon_genet",
)
# Descriptive files that live next to the data; not traces, not "unknown".
_IGNORED_NAMES = frozenset({"MANIFEST.csv", "README.md", "README", "README.txt", "LICENSE"})
_MAHIMAHI_PACKET_BITS = 1500 * 8
# Recordings' sources are "recordings:<node>".
RECORDING_SOURCE = "recordings"
# A step longer than this many times the peer's median step starts a new segment.
GAP_FACTOR = 5.0


@dataclass
class Trace:
    """One series of measurements of one link, at its own step.

    Attributes:
        source: top-level directory name (e.g. ``"lumos5g"``) or a synthetic
            profile's source (``"synthetic_internet"``).
        name: path relative to the traces root, unique; ``"#<key>"`` appended
            for one series of a multi-series file.
        group: fold group; traces that must stay in one split share it.
        step_s: the trace's median step in seconds.
        data: ``float32 [T, WIDTH]`` in ``FEATURES`` order, raw units; features
            that were not measured are filled from the defaults.
        measured: the features that are real measurements, in ``FEATURES`` order.
        time_s: ``float64 [T]`` time of each step from the trace start, if known.
        oracle_next_bw: for synthetic traces, the generator's conditional
            expectation of bandwidth at each step given the previous one.
        start_s: Unix time of the first step, where the source records
            absolute time (recordings); the trainer splits such traces by time.
    """

    source: str
    name: str
    group: str
    step_s: float
    data: np.ndarray
    measured: tuple[str, ...]
    time_s: np.ndarray | None = field(default=None, repr=False)
    oracle_next_bw: np.ndarray | None = field(default=None, repr=False)
    start_s: float | None = None

    def __len__(self) -> int:
        return int(self.data.shape[0])


@dataclass
class LoadResult:
    """What :func:`load_traces` found.

    Attributes:
        traces: every trace loaded, in sorted file order.
        unknown: files no loader recognised.
        skipped: file (or file#series) -> why it yielded no trace.
    """

    traces: list[Trace]
    unknown: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


class _SkipFileError(Exception):
    """A recognised file that holds no usable throughput series."""


# --------------------------------------------------------------------------- reading


def _read_text(path: Path) -> str:
    """Read a text file, gunzipping it when it starts with the gzip magic."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def _two_columns(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``time value`` lines split on any whitespace."""
    values = np.array(text.split(), dtype=np.float64)
    if values.size % 2:
        raise ValueError("expected two columns per line")
    pairs = values.reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def _median_step(t: np.ndarray) -> float:
    gaps = np.diff(t)
    gaps = gaps[gaps > 0]
    return float(np.median(gaps)) if gaps.size else 0.0


def _carry_forward(values: np.ndarray, default: float) -> np.ndarray:
    """Fill NaNs with the last real value before them, else ``default``."""
    out = values.astype(np.float64, copy=True)
    valid = ~np.isnan(out)
    if not valid.any():
        return np.full_like(out, default)
    idx = np.where(valid, np.arange(out.size), -1)
    np.maximum.accumulate(idx, out=idx)
    filled = np.where(idx >= 0, out[np.maximum(idx, 0)], default)
    return filled


@dataclass
class _Series:
    """One parsed series before defaults are applied: its bandwidth and, by
    feature name, the optional features the source measures (NaN = not
    measured at this step)."""

    key: str | None
    group: str
    t: np.ndarray
    bw: np.ndarray
    optional: dict[str, np.ndarray] = field(default_factory=dict)


# --------------------------------------------------------------------------- loaders
# Each loader takes (path, rel) where rel is the path relative to the traces root
# (a str with "/"), and returns a list of series. Groups are full strings that
# start with the source so they never collide across sources.


def _load_two_column(path: Path, rel: str) -> list[_Series]:
    t, bw = _two_columns(_read_text(path))
    return [_Series(None, rel, t, bw)]


def _load_norway(path: Path, rel: str) -> list[_Series]:
    # "<mode>.<route>-report.<date>_<time>.log": logs of one route on one day overlap.
    fname = _strip_gz(path.name)
    route, _, rest = fname.partition("-report.")
    day = rest.split("_", 1)[0]
    group = f"pensieve_norway_hsdpa/{route}@{day}" if route and day else rel
    t, bw = _two_columns(_read_text(path))
    return [_Series(None, group, t, bw)]


def _load_puffer(path: Path, rel: str) -> list[_Series]:
    # "trace<session>_<index>": the session id is base64 and may hold "_", so split right.
    stem = _strip_gz(path.name)
    session = stem.removeprefix("trace").rsplit("_", 1)[0]
    t, rate = _two_columns(_read_text(path))
    # MB/s (bytes/s / 1e6 upstream) -> Mbit/s.
    return [_Series(None, f"puffer/{session}", t, rate * 8.0)]


def _load_mahimahi(path: Path, rel: str) -> list[_Series]:
    ms = np.array(_read_text(path).split(), dtype=np.int64)
    if ms.size == 0:
        raise _SkipFileError("empty mahimahi trace")
    counts = np.bincount(ms // 1000)
    # The last bin ends at the last delivery opportunity, not a second later:
    # keep only complete seconds so the final value does not read low.
    n_full = int(ms.max() // 1000)
    counts = counts[:n_full]
    bw = counts * _MAHIMAHI_PACKET_BITS / 1e6
    pair = _strip_gz(rel).removesuffix(".up").removesuffix(".down")
    return [_Series(None, pair, np.arange(n_full, dtype=np.float64), bw)]


def _load_pantheon(path: Path, rel: str) -> list[_Series]:
    obj = json.loads(_read_text(path))
    t = np.asarray(obj["timestamps"], dtype=np.float64)[1:]
    bw = np.asarray(obj["bandwidths"], dtype=np.float64)[1:]  # first bin is a 0.1 placeholder
    if t.size != bw.size:
        raise ValueError("timestamps and bandwidths differ in length")
    delays = obj.get("delays") or []
    # One one-way propagation delay per trace; the daemon's latency is an RTT.
    optional = {"latency_ms": np.full(bw.size, 2.0 * float(delays[0]))} if delays else {}
    # obj["loss"] is a simulator parameter, not a measurement: ignored on purpose.
    return [_Series(None, str(Path(rel).parent), t, bw, optional)]


def _ucc_float(cell: str) -> float:
    cell = cell.strip()
    if cell in ("", "-"):
        return float("nan")
    return float(cell)


def _load_ucc(path: Path, rel: str) -> list[_Series]:
    rows = list(csv.DictReader(io.StringIO(_read_text(path))))
    if not rows or "DL_bitrate" not in rows[0]:
        raise ValueError("not a G-NetTrack CSV (no DL_bitrate column)")
    stamps: list[float] = []
    cols: dict[str, list[float]] = {"bw": [], "ping": [], "loss": []}
    parse_cache: dict[str, float] = {}
    for row in rows:
        ts = row["Timestamp"]
        if ts not in parse_cache:
            parse_cache[ts] = (
                datetime.strptime(ts, "%Y.%m.%d_%H.%M.%S").replace(tzinfo=UTC).timestamp()
            )
        stamps.append(parse_cache[ts])
        cols["bw"].append(_ucc_float(row["DL_bitrate"]) / 1000.0)  # kbit/s -> Mbit/s
        cols["ping"].append(_ucc_float(row.get("PINGAVG", "-")))
        cols["loss"].append(_ucc_float(row.get("PINGLOSS", "-")) / 100.0)  # % -> fraction
    t_all = np.asarray(stamps)
    order = np.argsort(t_all, kind="stable")
    t_all = t_all[order]
    # Rows repeating a timestamp (1 s resolution) are averaged into one step,
    # each column over its non-missing cells.
    uniq, inverse = np.unique(t_all, return_inverse=True)

    def _mean_by_stamp(vals: list[float]) -> np.ndarray:
        v = np.asarray(vals, dtype=np.float64)[order]
        ok = ~np.isnan(v)
        sums = np.bincount(inverse, weights=np.where(ok, v, 0.0), minlength=uniq.size)
        counts = np.bincount(inverse, weights=ok.astype(np.float64), minlength=uniq.size)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

    bw = _mean_by_stamp(cols["bw"])
    ping = _mean_by_stamp(cols["ping"])
    loss = _mean_by_stamp(cols["loss"])
    keep = ~np.isnan(bw)
    t = uniq[keep] - uniq[keep][0] if keep.any() else uniq[keep]
    ping, loss = ping[keep], loss[keep]
    optional: dict[str, np.ndarray] = {}
    if not np.isnan(ping).all():
        optional["latency_ms"] = ping
    if not np.isnan(loss).all():
        optional["packet_loss"] = loss
        optional["reliability"] = 1.0 - loss
    return [_Series(None, rel, t, bw[keep], optional)]


def _load_umn(path: Path, rel: str) -> list[_Series]:
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise _SkipFileError("empty file")
    header = [h.strip() for h in header]
    rows = [r for r in reader if r]
    if "throughput_mbps" in header and "carrier" in header:
        return _umn_throughput(header, rows, rel)
    if header[:3] == ["protocol", "num_tcp_conn", "seq_num"] and any(
        h.endswith("_throughput_mbps") for h in header
    ):
        return _umn_car(header, rows, rel)
    if "throughput_mbps" in header and "seq_num" in header:
        return _umn_walking(header, rows, rel)
    if "rtt_ms" in header or "rtt_in_ms" in header:
        raise _SkipFileError("RTT/ping samples only, no throughput series (never time-aligned)")
    raise ValueError(f"unrecognised umn_5gophers header {header}")


def _umn_throughput(header: list[str], rows: list[list[str]], rel: str) -> list[_Series]:
    key_cols = ["protocol", "carrier", "num_tcp_conn", "server_location", "run_num"]
    ki = [header.index(k) for k in key_cols]
    si, vi = header.index("seq_num"), header.index("throughput_mbps")
    by_key: dict[tuple[str, ...], list[tuple[float, float]]] = {}
    for r in rows:
        by_key.setdefault(tuple(r[i] for i in ki), []).append((float(r[si]), float(r[vi])))
    out = []
    for key, pts in by_key.items():
        pts.sort()
        arr = np.asarray(pts)
        protocol, carrier, _, server, _ = key
        group = f"{rel}#{protocol}/{carrier}/{server}"
        out.append(_Series("/".join(key), group, arr[:, 0], arr[:, 1]))
    return out


def _umn_car(header: list[str], rows: list[list[str]], rel: str) -> list[_Series]:
    si = header.index("seq_num")
    seq = np.asarray([float(r[si]) for r in rows])
    order = np.argsort(seq, kind="stable")
    out = []
    for ci, col in enumerate(header):
        if not col.endswith("_throughput_mbps"):
            continue
        vals = np.asarray([_ucc_float(r[ci]) for r in rows])[order]
        ok = ~np.isnan(vals)
        # The three carriers were measured on the same drive: one group.
        out.append(_Series(col.removesuffix("_throughput_mbps"), rel, seq[order][ok], vals[ok]))
    return out


def _umn_walking(header: list[str], rows: list[list[str]], rel: str) -> list[_Series]:
    si, vi = header.index("seq_num"), header.index("throughput_mbps")
    pts = sorted((float(r[si]), _ucc_float(r[vi])) for r in rows)
    arr = np.asarray(pts)
    ok = ~np.isnan(arr[:, 1])
    return [_Series(None, rel, arr[ok, 0], arr[ok, 1])]


def _is_generic_csv(path: Path) -> bool:
    name = _strip_gz(path.name)
    if not name.endswith(".csv"):
        return False
    try:
        with path.open("rb") as fh:
            head = fh.read(4096)
        if head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as gz:
                head = gz.read(4096)
    except (OSError, EOFError):
        return False
    first = head.decode("utf-8", errors="replace").lstrip("\ufeff").splitlines()
    return bool(first) and _generic_columns(first[0]) is not None


def _generic_columns(header: str) -> list[str] | None:
    """The columns of a generic CSV header line, or None if it is not one."""
    cols = [c.strip() for c in header.split(",")]
    first, rest = cols[: len(TRACE_CSV_REQUIRED)], cols[len(TRACE_CSV_REQUIRED) :]
    if tuple(first) != TRACE_CSV_REQUIRED or len(set(rest)) != len(rest):
        return None
    return cols if set(rest) <= set(OPTIONAL) else None


def _load_generic_csv(path: Path, rel: str) -> list[_Series]:
    reader = csv.reader(io.StringIO(_read_text(path).lstrip("\ufeff")))
    header = [c.strip() for c in next(reader)]  # checked by _is_generic_csv
    rows: list[list[str]] = []
    lines: list[int] = []  # each row's line in the file, for errors
    for r in reader:
        if not r or not any(c.strip() for c in r):
            continue
        if len(r) > len(header):
            raise ValueError(
                f"line {reader.line_num}: {len(r)} cells, the header names {len(header)}"
            )
        rows.append(r + [""] * (len(header) - len(r)))  # cells missing at the end are empty
        lines.append(reader.line_num)

    def col(name: str) -> np.ndarray:
        if name not in header:
            return np.full(len(rows), np.nan)
        i = header.index(name)
        out = np.empty(len(rows), dtype=np.float64)
        for k, r in enumerate(rows):
            try:
                out[k] = _ucc_float(r[i])
            except ValueError:
                raise ValueError(f"line {lines[k]}: {name}: not a number: {r[i][:40]!r}") from None
        return out

    t, bw = col("time_s"), col("bandwidth_mbps")
    missing = np.isnan(t) | np.isnan(bw)
    if missing.any():
        line = lines[int(np.argmax(missing))]
        raise ValueError(f"line {line}: time_s and bandwidth_mbps must be present in every row")
    bad = (bw < 0) | ~np.isfinite(bw)
    if bad.any():
        raise ValueError(
            f"line {lines[int(np.argmax(bad))]}: bandwidth_mbps must be finite and >= 0"
        )
    order = np.argsort(t, kind="stable")
    columns = {name: col(name)[order] for name in OPTIONAL}
    optional = {name: v for name, v in columns.items() if not np.isnan(v).all()}
    return [_Series(None, rel, t[order], bw[order], optional)]


_Loader = Callable[[Path, str], list[_Series]]


def _loader_for(source: str, path: Path) -> _Loader | None:
    """Pick the loader for a file of a known source, or None if it is not one of its files."""
    name = _strip_gz(path.name)
    if source in ("pensieve_fcc", "lumos5g", "oboe"):
        return _load_two_column
    if source == "pensieve_norway_hsdpa":
        return _load_norway
    if source == "puffer":
        return _load_puffer if name.startswith("trace") else None
    if source == "mahimahi_cellular":
        return _load_mahimahi if name.endswith((".up", ".down")) else None
    if source == "pantheon_genet":
        return _load_pantheon if name.endswith(".json") else None
    if source == "ucc_5g":
        return _load_ucc if name.endswith(".csv") else None
    if source == "umn_5gophers":
        return _load_umn if name.endswith((".csv", ".log")) else None
    return None


# --------------------------------------------------------------------------- recordings


@dataclass
class _Recording:
    """The columns of one recording file."""

    node: str
    peer: np.ndarray
    t: np.ndarray
    features: np.ndarray
    sent: np.ndarray


def _read_recording(path: Path) -> _Recording:
    """One recording file, read and checked by the format's own reader
    (:func:`bwpredd.recording.read_recording_file`).

    Raises:
        bwpredd.recording.RecordingError: (a ValueError) unreadable, or not
            format 1.
    """
    cols = recording.read_recording_file(path)
    return _Recording(cols["node"], cols["peer"], cols["t"], cols["features"], cols["sent"])


def _segments(t: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` row ranges of ``t`` (sorted) split where a step
    exceeds ``GAP_FACTOR`` times the median step."""
    step = _median_step(t)
    if step <= 0:
        return [(0, len(t))]
    cuts = np.flatnonzero(np.diff(t) > GAP_FACTOR * step) + 1
    bounds = [0, *cuts.tolist(), len(t)]
    return list(itertools.pairwise(bounds))


def _recording_traces(
    files: list[tuple[Path, str]], result: LoadResult, min_steps: int
) -> list[Trace]:
    """Assemble the recording files found under one root into traces:
    one peer of one node per group, cut into segments at gaps."""
    by_node: dict[str, list[tuple[str, _Recording]]] = {}
    for path, rel in files:
        try:
            rec = _read_recording(path)
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            reason = f"unreadable recording: {type(exc).__name__}: {exc}"
            result.skipped[rel] = reason
            warnings.warn(f"{rel}: {reason}; skipped", RuntimeWarning, stacklevel=3)
            continue
        by_node.setdefault(rec.node, []).append((rel.rpartition("/")[0], rec))
    # A node name in two directories is two machines sharing a name, or two
    # copies: never interleave them.
    labelled: dict[str, list[_Recording]] = {}
    for node, found in by_node.items():
        dirs = sorted({d for d, _ in found})
        if len(dirs) > 1:
            warnings.warn(
                f"recordings of node {node!r} in {len(dirs)} directories ({', '.join(dirs)}); "
                f"read as nodes {node}@<directory>",
                RuntimeWarning,
                stacklevel=3,
            )
        for d, rec in found:
            labelled.setdefault(node if len(dirs) == 1 else f"{node}@{d or '.'}", []).append(rec)
    out: list[Trace] = []
    for label in sorted(labelled):
        recs = labelled[label]
        peer = np.concatenate([r.peer for r in recs])
        t = np.concatenate([r.t for r in recs])
        features = np.concatenate([r.features for r in recs])
        sent = np.concatenate([r.sent for r in recs])
        ok = np.isfinite(t) & np.isfinite(features).all(axis=1)
        peer, t, features, sent = peer[ok], t[ok], features[ok], sent[ok]
        names, codes = np.unique(peer, return_inverse=True)
        # Files come in name (= time) order; a stable sort by peer then time
        # keeps the acceptance order of equal timestamps.
        order = np.lexsort((t, codes))
        starts = np.searchsorted(codes[order], np.arange(len(names) + 1))
        for k, peer_id in enumerate(names.tolist()):
            rows = order[starts[k] : starts[k + 1]]
            out.extend(
                _peer_traces(
                    label,
                    str(peer_id),
                    t[rows],
                    features[rows],
                    sent[rows],
                    result=result,
                    min_steps=min_steps,
                )
            )
    return out


def _peer_traces(
    node: str,
    peer: str,
    t: np.ndarray,
    features: np.ndarray,
    sent: np.ndarray,
    *,
    result: LoadResult,
    min_steps: int,
) -> list[Trace]:
    bits = int(np.bitwise_or.reduce(sent)) if len(sent) else 0
    measured = tuple(f for i, f in enumerate(FEATURES) if i == BW or bits >> i & 1)
    group = f"{node}/{peer}"
    segments = _segments(t)
    out = []
    for k, (a, b) in enumerate(segments):
        name = group if len(segments) == 1 else f"{group}#{k}"
        if b - a < min_steps:
            result.skipped[name] = f"too short: {b - a} < {min_steps} steps"
            continue
        seg_t = t[a:b]
        out.append(
            Trace(
                source=f"{RECORDING_SOURCE}:{node}",
                name=name,
                group=group,
                step_s=_median_step(seg_t),
                data=np.ascontiguousarray(features[a:b]),
                measured=measured,
                time_s=seg_t - seg_t[0],
                start_s=float(seg_t[0]),
            )
        )
    return out


# --------------------------------------------------------------------------- assembly


def _resolve_root(root: Path) -> tuple[Path, str | None]:
    """Find the traces root and, when ``root`` lies inside a known source, that source.

    Pointing at ``traces/puffer`` or a single file inside it must give the same
    names and groups as loading the whole ``traces`` directory.
    """
    candidates = [root, *root.parents][:5]
    for cand in candidates:
        if cand.name in SOURCES and cand.is_dir():
            return cand.parent, cand.name
    return (root if root.is_dir() else root.parent), None


def _iter_files(root: Path) -> Iterable[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
            if not fname.startswith("."):
                yield Path(dirpath) / fname


def _to_trace(series: _Series, source: str, rel: str, defaults: Mapping[str, float]) -> Trace:
    """Drop non-finite steps, fill unmeasured features from ``defaults``, build a Trace."""
    ok = np.isfinite(series.bw) & np.isfinite(series.t)
    n = int(ok.sum())
    data = np.empty((n, WIDTH), dtype=np.float32)
    measured = [FEATURES[BW]]
    data[:, BW] = series.bw[ok]
    for fname in OPTIONAL:
        idx, values = FEATURES.index(fname), series.optional.get(fname)
        if values is None:
            data[:, idx] = defaults[fname]
        else:
            data[:, idx] = _carry_forward(values, defaults[fname])[ok]
            measured.append(fname)
    name = rel if series.key is None else f"{rel}#{series.key}"
    t = series.t[ok]
    trace = Trace(
        source=source,
        name=name,
        group=series.group,
        step_s=_median_step(t),
        data=data,
        measured=tuple(f for f in FEATURES if f in measured),
        time_s=t - t[0] if n else t,
    )
    return trace


def load_traces(
    root: Path | str,
    defaults: Mapping[str, float] | None = None,
    progress: bool = False,
    min_steps: int = 11,
) -> LoadResult:
    """Load every trace under ``root``.

    Args:
        root: a traces directory (the shared set, a directory of generic
            CSVs, one node's recordings or several nodes' side by side), one
            source's directory inside it, or a single file.
        defaults: value of each feature that a source does not measure; keys
            from the optional features of :mod:`bwpredd.schema`. Defaults to
            its ``DEFAULTS``.
        progress: show a progress bar over files (when tqdm is installed).
        min_steps: traces with fewer steps are reported in ``skipped``; the
            default is one window of 10 plus its target.

    Returns:
        A :class:`LoadResult` with the traces in sorted file order (the
        recordings' after the others, by node, peer and time), the files no
        loader recognised, and the files that yielded nothing (and why).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: ``defaults`` names an unknown feature.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"traces directory not found: {root}")
    merged = dict(DEFAULTS)
    if defaults is not None:
        unknown_keys = set(defaults) - set(FEATURES)
        if unknown_keys:
            raise ValueError(f"unknown features in defaults: {sorted(unknown_keys)}")
        merged.update({k: float(v) for k, v in defaults.items()})
    missing = set(OPTIONAL) - set(merged)
    if missing:
        raise ValueError(f"no default for {sorted(missing)}")

    base, fixed_source = _resolve_root(root.resolve())
    files = list(_iter_files(root.resolve()))
    result = LoadResult(traces=[])
    iterator: Iterable[Path] = files
    if progress:
        try:  # the trainer's extra; bwpredctl replay runs without it
            from tqdm import tqdm

            iterator = tqdm(files, desc="traces", unit="file")
        except ImportError:
            pass
    recordings: list[tuple[Path, str]] = []
    for path in iterator:
        if path.name in _IGNORED_NAMES:
            continue
        rel = path.relative_to(base).as_posix()
        if recording.NAME_RE.fullmatch(path.name):
            recordings.append((path, rel))  # assembled across files below
            continue
        parts = rel.split("/")
        source = fixed_source or (parts[0] if len(parts) > 1 else base.name)
        loader: _Loader | None
        if _is_generic_csv(path):
            loader = _load_generic_csv
        elif source in SOURCES:
            loader = _loader_for(source, path)
        else:
            loader = None
        if loader is None:
            result.unknown.append(path)
            continue
        try:
            series_list = loader(path, rel)
        except _SkipFileError as exc:
            result.skipped[rel] = str(exc)
            continue
        except (ValueError, KeyError, IndexError, OSError, EOFError) as exc:
            result.skipped[rel] = f"unreadable: {type(exc).__name__}: {exc}"
            continue
        for series in series_list:
            trace = _to_trace(series, source, rel, merged)
            if len(trace) < min_steps:
                result.skipped[trace.name] = f"too short: {len(trace)} < {min_steps} steps"
                continue
            result.traces.append(trace)
    if recordings:
        result.traces.extend(_recording_traces(recordings, result, min_steps))
    return result


def summarize(result: LoadResult) -> dict[str, dict[str, float | int]]:
    """Per-source counts and statistics of a load, JSON-able.

    Args:
        result: the output of :func:`load_traces`.

    Returns:
        ``{source: {traces, groups, steps, hours, step_s_median, mean_bw_mbps,
        measured}}``.
    """
    out: dict[str, dict[str, float | int]] = {}
    by_source: dict[str, list[Trace]] = {}
    for tr in result.traces:
        by_source.setdefault(tr.source, []).append(tr)
    for source, trs in sorted(by_source.items()):
        bw = np.concatenate([t.data[:, BW] for t in trs]).astype(np.float64)
        out[source] = {
            "traces": len(trs),
            "groups": len({t.group for t in trs}),
            "steps": int(bw.size),
            "hours": round(sum(len(t) * t.step_s for t in trs) / 3600.0, 2),
            "step_s_median": float(np.median([t.step_s for t in trs])),
            "mean_bw_mbps": round(float(bw.mean()), 3),
        }
    return out
