"""Recording: every accepted sample, written under ``<state_dir>/recordings/``
in recording format v1 (below, the contract with the trainer's reader), and
read back.

The request path pays, per ingest batch, one numpy gather (the peers'
codes) and one ``deque.append`` of the arrays the validator and the window
store left (:meth:`Recorder.add`): no copy, no lock, no I/O. A background
thread takes the batches every :data:`DRAIN_S` seconds into preallocated
column buffers and, every ``flush_s`` seconds (``record_flush_s``) or as soon
as a file's worth is waiting, writes them as one new file; at shutdown
(SIGTERM) it writes what is left. At most :data:`QUEUE_SAMPLES` samples wait
for the thread: past that, a batch is left out of the recording (never out
of the windows; ingest answers are unchanged), and so are the rows of a file
that cannot be written (ENOSPC, any OSError). Both are counted
(``bwpredd_recording_dropped_samples_total``) and said in one rate-limited
log line (``recording_dropped``).

Format v1, one file per write (the contract with the trainer's reader):

- name ``rec-<T>-<R>.npz``: T the write time in Unix milliseconds, 15 digits
  zero-padded (name order is time order), R 8 random hex digits; anything
  else in the directory (temporaries start with ``.``) is not a recording;
- a NumPy ``.npz`` loadable with ``numpy.load(path, allow_pickle=False)``:
  ``version`` int64 () = 1; ``node`` unicode () the recording node's name;
  ``peer`` unicode [n]; ``t`` float64 [n] the sample's time, Unix seconds
  (its timestamp, or the arrival time the daemon used); ``features``
  float32 [n, 4] latency_ms, bandwidth_mbps, packet_loss, reliability as
  stored in the window (missing ones carried forward); ``sent`` uint8 [n],
  bit i set when the worker sent feature i;
- rows in the order the window store applied them (batch by batch; inside a
  batch grouped by peer, each peer's in request order), so each peer's rows
  are in time order;
- written whole to an unpredictable temporary name
  (``O_CREAT|O_EXCL|O_NOFOLLOW``), fsynced, then linked into place: a file
  with a recording's name is complete, and a ``kill -9`` loses only what was
  not yet written. Readers still skip an unreadable file with a warning.

Retention: after each write (and at start-up) the oldest files go first
while the directory's recordings total more than ``record_max_bytes``, or
are older than ``record_max_age_s``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import math
import os
import re
import secrets
import stat
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bwpredd.logging import RateLimitedLine, get_logger
from bwpredd.safefs import open_new, open_private_dir, temp_name
from bwpredd.schema import WIDTH

__all__ = [
    "DIR_NAME",
    "DRAIN_S",
    "FORMAT_VERSION",
    "NAME_RE",
    "QUEUE_SAMPLES",
    "RecordedTrace",
    "Recorder",
    "RecordingError",
    "file_name",
    "read_recording_file",
    "read_recordings",
    "recording_files",
]

FORMAT_VERSION = 1
DIR_NAME = "recordings"
NAME_RE = re.compile(r"rec-(\d{15})-([0-9a-f]{8})\.npz")
# A leftover of a write a kill interrupted: ".rec-<T>-<R>.npz.tmp-<hex>".
_TEMP_RE = re.compile(r"\.rec-\d{15}-[0-9a-f]{8}\.npz\.tmp-[0-9a-f]+")
# Samples waiting for the writer thread, at most (each holds ~70 bytes of
# the arrays of its batch: ~18 MB at most). The thread takes them every
# DRAIN_S seconds: at 400,000 samples/s the queue holds ~40,000.
QUEUE_SAMPLES = 1 << 18
DRAIN_S = 0.1
# One file holds at most FILE_ROWS rows and about FILE_BYTES bytes (or an
# eighth of record_max_bytes, so one file stays small next to the cap): a
# file's worth is written at once, whatever the cadence. The column buffers
# hold FILE_ROWS rows (7.3 MB).
FILE_ROWS = 1 << 18
FILE_BYTES = 32 << 20
_MIN_FILE_ROWS = 1024
# Peer ids turned into the file's text column at a time.
_PEER_CHUNK = 1 << 13
# The names list starts afresh past 2 x capacity + this many ids.
_NAMES_SLACK = 1 << 12
_ZIP32_BYTES = (1 << 31) - 1
# Seconds between two recording_dropped lines at most.
DROPPED_LOG_INTERVAL_S = 30.0
# Recording files open with these bits: the directory is 0750, so a trainer
# in the service's group may read them.
FILE_MODE = 0o640
_BITS = np.array([1 << i for i in range(WIDTH)], dtype=np.uint8)
_ALL = np.uint8((1 << WIDTH) - 1)
# The bytes of one row besides its peer id: t, features, sent.
_ROW_BYTES = 8 + 4 * WIDTH + 1

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
# What add() queues: peer codes (per input), the names list they index,
# values as sent, times, the order stored, the rows as stored.
_Batch = tuple[I32, list[str], F64, F64, I64, F32]
log = get_logger(__name__)


class RecordingError(ValueError):
    """A file is not a readable recording; the message says why."""


def file_name(when_ms: int, token: str) -> str:
    """The name of a recording written at ``when_ms`` (Unix ms)."""
    return f"rec-{when_ms:015d}-{token}.npz"


@dataclass(frozen=True)
class _File:
    name: str
    when_ms: int
    size: int


class Recorder:
    """Records accepted samples off the request path (see the module).

    :meth:`add` and :meth:`assign` are called from the event loop only;
    everything else runs on the recorder's own thread (or under its lock, for
    :meth:`flush`).

    Peers travel as codes: :meth:`assign` (the window store's reset hook)
    appends the peer ids of newly assigned slots to a names list and points
    the slots at them, so a batch carries ``codes[slots]`` (one numpy
    gather) and the list it indexes, and the writer turns codes into text
    only while it writes. A dict look-up per sample cost the writer more
    than the rest of a row.

    Args:
        directory: where the files go (created 0750 if missing; refused if
            another user owns it or others may write it).
        node: the node name written in each file.
        capacity: slots of the window store (``max_peers``).
        max_bytes: the files kept total at most this (oldest go first).
        max_age_s: files older than this go; 0 keeps them.
        flush_s: seconds between writes.
        queue_samples: samples waiting for the writer at most
            (:data:`QUEUE_SAMPLES` when None).
        drain_s: seconds between two takes of the queue (:data:`DRAIN_S`).
        clock: Unix seconds (file names, ages).

    Raises:
        OSError: the directory is unusable (``UnsafePath`` naming why).
    """

    def __init__(
        self,
        directory: Path,
        node: str,
        capacity: int,
        *,
        max_bytes: int,
        max_age_s: float,
        flush_s: float,
        queue_samples: int | None = None,
        drain_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.node = node
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.flush_s = flush_s
        self.queue_samples = QUEUE_SAMPLES if queue_samples is None else queue_samples
        self.drain_s = DRAIN_S if drain_s is None else drain_s
        self.clock = clock
        self.file_bytes = max(1, min(FILE_BYTES, max_bytes // 8))
        # Counters, each written from one side only, so the event loop takes
        # no lock: samples queued and dropped at the queue (event loop);
        # taken off the queue, written, dropped at the write (under _lock).
        self.queued = 0
        self.taken = 0
        self.dropped_queue = 0
        self.written = 0
        self.dropped_write = 0
        self._pending: collections.deque[_Batch] = collections.deque()
        # Event loop side: the code of each slot's peer, into _names (append
        # only; replaced by a new list, never changed, when it outgrows the
        # slots).
        self._slot_code = np.full(capacity, -1, dtype=np.int32)
        self._names: list[str] = []
        # Writer side: rows taken and not yet written (peers as codes into
        # the names list _cur), in buffers allocated at the first batch, and
        # the names converted to text so far.
        self._cols: _Columns | None = None
        self._rows = 0
        self._cur: list[str] = self._names
        self._names_arr: npt.NDArray[np.str_] = np.zeros(0, dtype="<U1")
        self._peer_buf: npt.NDArray[Any] = np.empty(0, dtype="<U1")
        self._files: collections.deque[_File] = collections.deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dropped_line = RateLimitedLine(log, "recording_dropped", DROPPED_LOG_INTERVAL_S)
        self._reported_queue_drops = 0
        self._dir_fd = open_private_dir(directory, 0o750)
        try:
            self._scan()
            self._prune()
        except BaseException:
            os.close(self._dir_fd)
            raise

    # -- the request path -------------------------------------------------------

    def assign(self, slots: I64, peer_ids: list[str]) -> None:
        """Slots (re)assigned to peers: later batches name them by these ids.

        Args:
            slots: the window store's slots.
            peer_ids: the peer now holding each.
        """
        names = self._names
        if len(names) + len(peer_ids) > 2 * self.capacity + _NAMES_SLACK:
            # A new list of the slots' current peers; batches queued with the
            # old one keep it.
            held = np.flatnonzero(self._slot_code >= 0)
            names = [names[c] for c in self._slot_code[held].tolist()]
            self._slot_code[held] = np.arange(len(held), dtype=np.int32)
            self._names = names
        base = len(names)
        names.extend(peer_ids)
        self._slot_code[slots] = np.arange(base, base + len(peer_ids), dtype=np.int32)

    def add(self, slots: I64, given: F64, ts: F64, order: I64, stored: F32) -> None:
        """Queue the accepted samples of one batch (nothing is copied: the
        arrays must not change afterwards).

        Args:
            slots: ``[k]`` the slot of each sample of the batch (any value
                where it was not accepted).
            given: ``[k, WIDTH]`` values as sent, NaN where not sent.
            ts: ``[k]`` sample times.
            order: indices of the accepted samples into the above, in the
                order they were stored.
            stored: ``[len(order), WIDTH]`` their rows as stored.
        """
        n = len(order)
        if self.queued - self.taken + n > self.queue_samples:
            self.dropped_queue += n
            return
        self._pending.append((self._slot_code[slots], self._names, given, ts, order, stored))
        self.queued += n

    # -- the writer thread ------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread."""
        self._thread = threading.Thread(target=self._run, name="bwpredd-recorder", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 60.0) -> None:
        """Write what is waiting, stop the thread, close the directory. Call
        it once ingest has stopped."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.flush()
        with self._lock:
            if self._dir_fd >= 0:
                os.close(self._dir_fd)
                self._dir_fd = -1

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.drain_s):
            try:
                with self._lock:
                    self._drain()
                    if self._rows and time.monotonic() - last >= self.flush_s:
                        last = time.monotonic()
                        self._write()
            except Exception:  # the thread must outlive any one bad write
                log.exception("recording_failed")

    def flush(self) -> None:
        """Take everything queued and write it now (the shutdown path; tests)."""
        with self._lock:
            if self._dir_fd < 0:
                return
            self._drain()
            if self._rows:
                self._write()

    def _drain(self) -> None:
        """Move the queued batches into the column buffers (lock held)."""
        pending = self._pending
        while pending:
            self._take(pending.popleft())
        if self.dropped_queue != self._reported_queue_drops:
            new = self.dropped_queue - self._reported_queue_drops
            self._reported_queue_drops = self.dropped_queue
            self._say_dropped("queue_full", new, "the writer fell behind")

    def _take(self, batch: _Batch) -> None:
        """One batch into the column buffers, writing a file whenever they
        hold a file's worth (lock held)."""
        codes, names, given, ts, order, stored = batch
        if names is not self._cur:  # the names list was replaced
            if self._rows:
                self._write()
            self._cur = names
            self._names_arr = np.zeros(0, dtype="<U1")
        if len(names) > len(self._names_arr):
            new = names[len(self._names_arr) :]
            self._names_arr = np.concatenate([self._names_arr, np.array(new)])
        n = len(order)
        sent = np.isnan(given).view(np.uint8) @ _BITS ^ _ALL
        cols = self._columns()
        done = 0
        while done < n:
            row_bytes = _ROW_BYTES + self._names_arr.itemsize
            room = min(FILE_ROWS, max(_MIN_FILE_ROWS, self.file_bytes // row_bytes)) - self._rows
            if room <= 0:
                self._write()
                continue
            m = min(n - done, room)
            o = order[done : done + m]
            rows = slice(self._rows, self._rows + m)
            np.take(codes, o, out=cols.code[rows])
            np.take(ts, o, out=cols.t[rows])
            np.take(sent, o, out=cols.sent[rows])
            cols.features[rows] = stored[done : done + m]
            self._rows += m
            done += m
        self.taken += n

    def _columns(self) -> _Columns:
        if self._cols is None:
            self._cols = _Columns(
                code=np.empty(FILE_ROWS, dtype=np.int32),
                t=np.empty(FILE_ROWS, dtype=np.float64),
                features=np.empty((FILE_ROWS, WIDTH), dtype=np.float32),
                sent=np.empty(FILE_ROWS, dtype=np.uint8),
            )
        return self._cols

    def _write(self) -> None:
        """Write the buffered rows as one file, then prune (lock held)."""
        rows, self._rows = self._rows, 0
        cols = self._columns()
        names = self._names_arr
        if self._peer_buf.dtype != names.dtype or not len(self._peer_buf):
            self._peer_buf = np.empty(_PEER_CHUNK, dtype=names.dtype)
        columns: dict[str, npt.NDArray[Any] | _Gather] = {
            "version": np.array(FORMAT_VERSION, dtype=np.int64),
            "node": np.array(self.node),
            "peer": _Gather(names, cols.code[:rows], self._peer_buf),
            "t": cols.t[:rows],
            "features": cols.features[:rows],
            "sent": cols.sent[:rows],
        }
        when_ms = int(self.clock() * 1000)
        try:
            name, size = self._save(columns, when_ms)
        except Exception as exc:  # whatever failed, the rows are counted as lost
            self.dropped_write += rows
            if not isinstance(exc, OSError):
                log.exception("recording_failed")
            self._say_dropped("write_failed", rows, _why(exc))
            return
        self.written += rows
        self._files.append(_File(name, when_ms, size))
        self._bytes += size
        self._prune()

    def _save(self, columns: Mapping[str, _Column], when_ms: int) -> tuple[str, int]:
        """Write one file to a temporary name, fsync it, link it into place."""
        fd = self._dir_fd
        for _ in range(8):
            name = file_name(when_ms, secrets.token_hex(4))
            tmp = temp_name(name)
            try:
                with open_new(tmp, fd, FILE_MODE) as fh:
                    _save_npz(fh, columns)
                    fh.flush()
                    os.fsync(fh.fileno())
                    size = os.fstat(fh.fileno()).st_size
                    # Written once, read later by the trainer: keeping the
                    # pages cached would only push out what others use.
                    with contextlib.suppress(OSError, AttributeError):
                        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                try:
                    # link, not rename: never replaces a name that exists.
                    os.link(tmp, name, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    continue
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=fd)
            os.fsync(fd)
            return name, size
        raise FileExistsError(errno.EEXIST, "no free recording name", file_name(when_ms, "*"))

    def _scan(self) -> None:
        """Know the recordings already there (oldest first); remove the
        temporaries of writes a kill interrupted."""
        files = []
        for entry in os.scandir(self._dir_fd):
            m = NAME_RE.fullmatch(entry.name)
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if m:
                files.append(_File(entry.name, int(m.group(1)), st.st_size))
            elif _TEMP_RE.fullmatch(entry.name):
                with contextlib.suppress(OSError):
                    os.unlink(entry.name, dir_fd=self._dir_fd)
        files.sort(key=lambda f: f.name)
        self._files = collections.deque(files)
        self._bytes = sum(f.size for f in files)

    def _prune(self) -> None:
        """Remove the oldest files while over ``max_bytes`` or ``max_age_s``."""
        files = self._files
        oldest_kept = (self.clock() - self.max_age_s) * 1000 if self.max_age_s > 0 else -math.inf
        while files and (self._bytes > self.max_bytes or files[0].when_ms < oldest_kept):
            f = files[0]
            try:
                os.unlink(f.name, dir_fd=self._dir_fd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("recording_prune_failed", file=f.name, error=_why(exc))
                return
            files.popleft()
            self._bytes -= f.size

    def _say_dropped(self, reason: str, samples: int, why: str) -> None:
        self._dropped_line.warning(
            reason=reason,
            samples=samples,
            error=why,
            dropped_total=self.dropped_queue + self.dropped_write,
            directory=str(self.directory),
        )

    # -- metrics ----------------------------------------------------------------

    def summary(self) -> dict[str, float]:
        """What the metrics report, read at scrape time."""
        return {
            "written": float(self.written),
            "dropped_queue_full": float(self.dropped_queue),
            "dropped_write_failed": float(self.dropped_write),
            "bytes": float(self._bytes),
            "files": float(len(self._files)),
        }


@dataclass(frozen=True)
class _Columns:
    """The column buffers, preallocated once and reused for every file:
    fresh memory per file cost more than the rest of the writer (the kernel
    zeroes every new page)."""

    code: I32  # peer codes into the names table
    t: F64
    features: F32
    sent: U8


@dataclass(frozen=True)
class _Gather:
    """The column ``table[index]``, made and written a chunk at a time
    through ``buf``, never whole."""

    table: npt.NDArray[Any]
    index: I32
    buf: npt.NDArray[Any]


_Column = npt.NDArray[Any] | _Gather


def _save_npz(fh: Any, columns: Mapping[str, _Column]) -> None:
    """What ``numpy.savez`` writes (a stored zip of one ``.npy`` per
    column), each array handed to the zip as a view of its bytes: savez
    copies every array first (``tobytes``)."""
    with zipfile.ZipFile(fh, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, col in columns.items():
            if isinstance(col, _Gather):
                dtype, shape = col.table.dtype, (len(col.index),)
            else:
                dtype, shape = col.dtype, col.shape
            header: dict[str, Any] = {
                "descr": np.lib.format.dtype_to_descr(dtype),
                "fortran_order": False,
                "shape": shape,
            }
            nbytes = dtype.itemsize * math.prod(shape)
            with zf.open(f"{key}.npy", mode="w", force_zip64=nbytes > _ZIP32_BYTES) as f:
                np.lib.format.write_array_header_1_0(f, header)
                if isinstance(col, _Gather):
                    step = len(col.buf)
                    for i in range(0, len(col.index), step):
                        part = col.buf[: min(step, len(col.index) - i)]
                        np.take(col.table, col.index[i : i + step], out=part)
                        f.write(part.view(np.uint8).data)
                else:
                    a = col if col.flags.c_contiguous else col.copy()
                    f.write(a.reshape(-1).view(np.uint8).data)


def _why(exc: Exception) -> str:
    if not isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc}"
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{name}: {exc.strerror}" if name and exc.strerror else str(exc)


# -- reading --------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedTrace:
    """One peer of one node: its rows from every file, in time order."""

    node: str
    peer: str
    t: F64  # [n] Unix seconds
    features: F32  # [n, WIDTH] as stored (carried forward)
    sent: U8  # [n] bit i: feature i was sent

    @property
    def name(self) -> str:
        """``<node>/<peer>``."""
        return f"{self.node}/{self.peer}"

    def __len__(self) -> int:
        return len(self.t)


def recording_files(directory: Path | str) -> list[Path]:
    """The recordings in ``directory``, oldest first (name order)."""
    d = Path(directory)
    return sorted(p for p in d.iterdir() if NAME_RE.fullmatch(p.name) and p.is_file())


def read_recording_file(path: Path | str) -> dict[str, Any]:
    """One recording's columns, checked against format v1.

    Returns:
        ``{"node": str, "peer": <U [n], "t": float64 [n], "features":
        float32 [n, WIDTH], "sent": uint8 [n]}``.

    Raises:
        RecordingError: the file cannot be read or breaks the format.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            cols = {k: z[k] for k in ("version", "node", "peer", "t", "features", "sent")}
    except Exception as exc:  # BadZipFile, EOFError, KeyError, OSError...: unreadable
        raise RecordingError(f"{path}: unreadable: {type(exc).__name__}: {exc}") from None
    version = cols["version"]
    if version.shape != () or version.dtype.kind not in "iu" or int(version) != FORMAT_VERSION:
        raise RecordingError(f"{path}: version: expected {FORMAT_VERSION}, got {version!r}")
    node, peer = cols["node"], cols["peer"]
    if node.shape != () or node.dtype.kind != "U":
        raise RecordingError(f"{path}: node: expected a unicode scalar")
    if peer.ndim != 1 or peer.dtype.kind != "U":
        raise RecordingError(f"{path}: peer: expected a unicode array [n]")
    n = len(peer)
    want = {
        "t": (np.dtype(np.float64), (n,)),
        "features": (np.dtype(np.float32), (n, WIDTH)),
        "sent": (np.dtype(np.uint8), (n,)),
    }
    for key, (dtype, shape) in want.items():
        a = cols[key]
        if a.dtype != dtype or a.shape != shape:
            raise RecordingError(
                f"{path}: {key}: expected {dtype} {shape}, got {a.dtype} {a.shape}"
            )
    return {
        "node": str(node),
        "peer": peer,
        "t": cols["t"],
        "features": cols["features"],
        "sent": cols["sent"],
    }


def read_recordings(*paths: Path | str) -> Iterator[RecordedTrace]:
    """Every (node, peer) trace in recording directories (or files), sorted
    by node then peer; each trace's rows in time order (files in name order,
    rows in file order, then a stable sort by time). A file that cannot be
    read is skipped with a ``recording_unreadable`` warning naming it.

    Args:
        paths: recordings directories (``<state_dir>/recordings``) or files.
    """
    parts: dict[tuple[str, str], list[tuple[F64, F32, U8]]] = {}
    for path in _files_of(paths):
        try:
            cols = read_recording_file(path)
        except RecordingError as exc:
            log.warning("recording_unreadable", file=str(path), error=str(exc))
            continue
        peer = cols["peer"]
        if not len(peer):
            continue
        node = cols["node"]
        # Rows of one peer, in file order: a stable sort by peer.
        idx = np.argsort(peer, kind="stable")
        sorted_peers = peer[idx]
        starts = np.flatnonzero(np.r_[True, sorted_peers[1:] != sorted_peers[:-1]])
        ends = np.r_[starts[1:], len(idx)]
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            rows = idx[a:b]
            parts.setdefault((node, str(sorted_peers[a])), []).append(
                (cols["t"][rows], cols["features"][rows], cols["sent"][rows])
            )
    for node, peer in sorted(parts):
        chunks = parts[(node, peer)]
        t = np.concatenate([c[0] for c in chunks])
        order = np.argsort(t, kind="stable")
        yield RecordedTrace(
            node=node,
            peer=peer,
            t=t[order],
            features=np.concatenate([c[1] for c in chunks])[order],
            sent=np.concatenate([c[2] for c in chunks])[order],
        )


def _files_of(paths: Iterable[Path | str]) -> Iterator[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            yield from recording_files(p)
        else:
            yield p
