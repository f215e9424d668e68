"""Recording: every accepted sample, written under ``<state_dir>/recordings/``
in recording format v1 (below, the contract with the trainer's reader), and
read back.

The request path pays, per ingest batch, a few vectorised copies of the
rows the window store applied into a preallocated ring (:meth:`Recorder.add`):
no lock, no I/O, nothing allocated that outlives the call. A background
thread writes the ring's rows straight from it as new files: a file's worth
(:data:`FILE_ROWS`) as soon as it is there, the rest every ``flush_s``
seconds (``record_flush_s``), and everything at shutdown (SIGTERM). When the
ring is full (:data:`QUEUE_SAMPLES` rows waiting), a batch is left out of the
recording (never out of the windows; ingest answers are unchanged), and so
are the rows of a file that cannot be written (ENOSPC, any OSError). Both
are counted (``bwpredd_recording_dropped_samples_total``) and said in one
rate-limited log line (``recording_dropped``).

Format v1, one file per write (the contract with the trainer's reader):

- name ``rec-<T>-<R>.npz``: T the write time in Unix milliseconds, 15 digits
  zero-padded, R 8 random hex digits; name order is write order (a file
  written in the same millisecond as the newest one there, or after the
  clock stepped back, takes the newest one's T plus one); anything
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
import io
import math
import os
import re
import secrets
import stat
import struct
import threading
import time
import zlib
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
    "FORMAT_VERSION",
    "NAME_RE",
    "QUEUE_SAMPLES",
    "WAKE_S",
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
# Rows of the queue's ring (32 bytes each: 8.4 MB, allocated once). The
# writer looks at it every WAKE_S seconds and writes every whole file's worth
# there: at 400,000 samples/s it holds at most ~90,000 rows.
QUEUE_SAMPLES = 1 << 18
WAKE_S = 0.05
# One file holds at most FILE_ROWS rows and about FILE_BYTES bytes (or an
# eighth of record_max_bytes, so one file stays small next to the cap).
FILE_ROWS = 1 << 16
FILE_BYTES = 8 << 20
_MIN_FILE_ROWS = 1024
# The names list starts afresh past 2 x capacity + this many ids.
_NAMES_SLACK = 1 << 12
_ZIP32_BYTES = (1 << 31) - 1
# The zip's records: signatures, versions (2.0, made on Unix), member mode.
_LOCAL, _CENTRAL, _END = 0x04034B50, 0x02014B50, 0x06054B50
_ZIP_VERSION = 20
_MADE_BY = 3 << 8 | _ZIP_VERSION
_MEMBER_MODE = 0o100600
_IOV_MAX = 512
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
BOOL = npt.NDArray[np.bool_]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
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

    The queue is a ring of preallocated columns (``queue_samples`` rows):
    :meth:`add` copies a batch's accepted rows into it (a few vectorised
    copies, no allocation that outlives the call) and moves ``head``; the
    writer writes the rows between ``tail`` and ``head`` straight from the
    ring and moves ``tail``. Each index is moved by one side only, so
    neither takes a lock. Peers travel as codes: :meth:`assign` (the window
    store's reset hook) appends the ids of newly assigned slots to a names
    list, a row holds its slot's code, and the writer turns codes into text
    only as it writes. (Holding on to each batch's arrays until the writer
    took them cost more than copying: page faults on both threads, and a
    dict look-up per sample in the writer.)

    Args:
        directory: where the files go (created 0750 if missing; refused if
            another user owns it or others may write it).
        node: the node name written in each file.
        capacity: slots of the window store (``max_peers``).
        max_bytes: the files kept total at most this (oldest go first).
        max_age_s: files older than this go; 0 keeps them.
        flush_s: seconds between writes.
        queue_samples: rows of the ring (:data:`QUEUE_SAMPLES` when None).
        wake_s: seconds between two looks of the writer at the ring
            (:data:`WAKE_S` when None).
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
        wake_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.node = node
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.flush_s = flush_s
        self.wake_s = WAKE_S if wake_s is None else wake_s
        self.clock = clock
        self.file_bytes = max(1, min(FILE_BYTES, max_bytes // 8))
        size = QUEUE_SAMPLES if queue_samples is None else queue_samples
        # Zeroed now, so the request path never takes a first-touch page fault.
        self._ring = _Columns(
            code=np.empty(size, dtype=np.int32),
            t=np.empty(size, dtype=np.float64),
            features=np.empty((size, WIDTH), dtype=np.float32),
            unsent=np.empty((size, WIDTH), dtype=np.bool_),
        )
        for column in (self._ring.code, self._ring.t, self._ring.features, self._ring.unsent):
            column.fill(0)
        self._sent = np.zeros(FILE_ROWS, dtype=np.uint8)
        self._size = size
        # Rows ever queued (event loop) and ever taken by the writer (under
        # _lock): the ring holds rows [tail, head), at head % size onwards.
        self._head = 0
        self._tail = 0
        self.dropped_queue = 0  # event loop
        self.written = 0  # under _lock
        self.dropped_write = 0  # under _lock
        # The code of each slot's peer, into _names (append only; replaced by
        # a new list, never changed, when it outgrows the slots). Each list
        # with the first row coded against it.
        self._slot_code = np.full(capacity, -1, dtype=np.int32)
        self._names: list[str] = []
        self._epochs: collections.deque[tuple[int, list[str]]] = collections.deque(
            [(0, self._names)]
        )
        # Writer side: the names of the current epoch turned into text so far.
        self._names_of: list[str] = self._names
        self._names_arr: npt.NDArray[np.str_] = np.zeros(0, dtype="<U1")
        self._peer_buf: npt.NDArray[Any] = np.empty(0, dtype="<U1")
        self._files: collections.deque[_File] = collections.deque()
        # The newest T in the directory: the next file's T is above it, so
        # name order stays write order within a millisecond and across a
        # clock stepped back.
        self._last_ms = -1
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

    # -- the event loop ---------------------------------------------------------

    def assign(self, slots: I64, peer_ids: list[str]) -> None:
        """Slots (re)assigned to peers: rows queued from now on name them by
        these ids.

        Args:
            slots: the window store's slots.
            peer_ids: the peer now holding each.
        """
        names = self._names
        if len(names) + len(peer_ids) > 2 * self.capacity + _NAMES_SLACK:
            # A new list of the slots' current peers, for the rows queued
            # from now on; rows already queued keep the old one.
            held = np.flatnonzero(self._slot_code >= 0)
            names = [names[c] for c in self._slot_code[held].tolist()]
            self._slot_code[held] = np.arange(len(held), dtype=np.int32)
            self._names = names
            self._epochs.append((self._head, names))
        base = len(names)
        names.extend(peer_ids)
        self._slot_code[slots] = np.arange(base, base + len(peer_ids), dtype=np.int32)

    def add(self, slots: I64, ts: F64, rows: F32, unsent: BOOL) -> None:
        """Queue the accepted samples of one batch, as the window store
        applied them (copied: the arrays are not kept).

        Args:
            slots: ``[m]`` the slot of each.
            ts: ``[m]`` their times.
            rows: ``[m, WIDTH]`` their rows as stored.
            unsent: ``[m, WIDTH]`` True where a feature was not sent.
        """
        n = len(slots)
        head, size = self._head, self._size
        if head - self._tail + n > size:
            self.dropped_queue += n
            return
        ring = self._ring
        p = head % size
        for a, b, q in ((0, min(n, size - p), p), (size - p, n, 0)):
            if a < b:
                at = slice(q, q + b - a)
                np.take(self._slot_code, slots[a:b], out=ring.code[at])
                ring.t[at] = ts[a:b]
                ring.features[at] = rows[a:b]
                ring.unsent[at] = unsent[a:b]
        self._head = head + n

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
        while not self._stop.wait(self.wake_s):
            try:
                with self._lock:
                    self._report_queue_drops()
                    now = time.monotonic()
                    due = now - last >= self.flush_s
                    if due:
                        last = now
                    self._write_waiting(whole_files_only=not due)
            except Exception:  # the thread must outlive any one bad write
                log.exception("recording_failed")

    def flush(self) -> None:
        """Write every queued row now (the shutdown path; tests)."""
        with self._lock:
            if self._dir_fd < 0:
                return
            self._report_queue_drops()
            self._write_waiting(whole_files_only=False)

    def _report_queue_drops(self) -> None:
        if self.dropped_queue != self._reported_queue_drops:
            new = self.dropped_queue - self._reported_queue_drops
            self._reported_queue_drops = self.dropped_queue
            self._say_dropped("queue_full", new, "the writer fell behind")

    def _write_waiting(self, whole_files_only: bool) -> None:
        """Write the queued rows as files of at most a file's worth each (with
        ``whole_files_only``, only full ones) (lock held)."""
        head = self._head
        while self._tail < head:
            tail = self._tail
            epochs = self._epochs
            while len(epochs) > 1 and epochs[1][0] <= tail:
                epochs.popleft()
            names = epochs[0][1]
            end = min(head, epochs[1][0]) if len(epochs) > 1 else head
            self._names_for(names)
            row_bytes = _ROW_BYTES + self._names_arr.itemsize
            per_file = min(FILE_ROWS, max(_MIN_FILE_ROWS, self.file_bytes // row_bytes))
            rows = min(end - tail, per_file)
            if whole_files_only and rows < per_file and end == head:
                break
            self._write(tail, rows)
            self._tail = tail + rows

    def _names_for(self, names: list[str]) -> None:
        """Make ``_names_arr`` the text of ``names`` (lock held)."""
        if names is not self._names_of:
            self._names_of = names
            self._names_arr = np.zeros(0, dtype="<U1")
        done = len(self._names_arr)
        if len(names) > done:
            self._names_arr = np.concatenate([self._names_arr, np.array(names[done:])])

    def _write(self, first: int, rows: int) -> None:
        """Write ring rows ``[first, first + rows)`` as one file, then prune
        (lock held)."""
        size, ring = self._size, self._ring
        p = first % size
        parts = [slice(p, min(p + rows, size))]
        if p + rows > size:
            parts.append(slice(0, p + rows - size))
        if len(self._sent) < rows:
            self._sent = np.zeros(rows, dtype=np.uint8)
        sent = self._sent[:rows]
        done = 0
        for part in parts:
            out = sent[done : done + part.stop - part.start]
            np.matmul(ring.unsent[part].view(np.uint8), _BITS, out=out)
            done += len(out)
        np.bitwise_xor(sent, _ALL, out=sent)
        names = self._names_arr
        if self._peer_buf.dtype != names.dtype or len(self._peer_buf) < rows:
            self._peer_buf = np.empty(max(rows, len(self._peer_buf)), dtype=names.dtype)
        peer = self._peer_buf[:rows]
        done = 0
        for part in parts:
            n = part.stop - part.start
            np.take(names, ring.code[part], out=peer[done : done + n])
            done += n
        columns: dict[str, list[npt.NDArray[Any]]] = {
            "version": [np.array(FORMAT_VERSION, dtype=np.int64)],
            "node": [np.array(self.node)],
            "peer": [peer],
            "t": [ring.t[q] for q in parts],
            "features": [ring.features[q] for q in parts],
            "sent": [sent],
        }
        when_ms = max(int(self.clock() * 1000), self._last_ms + 1)
        self._last_ms = when_ms
        try:
            name, size_on_disk = self._save(columns, when_ms)
        except Exception as exc:  # whatever failed, the rows are counted as lost
            self.dropped_write += rows
            if not isinstance(exc, OSError):
                log.exception("recording_failed")
            self._say_dropped("write_failed", rows, _why(exc))
            return
        self.written += rows
        self._files.append(_File(name, when_ms, size_on_disk))
        self._bytes += size_on_disk
        self._prune()

    def _save(self, columns: Mapping[str, list[npt.NDArray[Any]]], when_ms: int) -> tuple[str, int]:
        """Write one file to a temporary name, fsync it, link it into place."""
        fd = self._dir_fd
        for _ in range(8):
            name = file_name(when_ms, secrets.token_hex(4))
            tmp = temp_name(name)
            try:
                with open_new(tmp, fd, FILE_MODE) as fh:
                    size = _save_npz(fh.fileno(), columns, when_ms / 1000)
                    os.fsync(fh.fileno())
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
        self._last_ms = max((f.when_ms for f in files), default=-1)
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
    """The queue's columns, preallocated once: fresh memory for each batch
    or file cost more than the rest of the writer (the kernel zeroes every
    new page)."""

    code: I32  # peer codes into a names list
    t: F64
    features: F32
    unsent: BOOL  # [n, WIDTH]


def _save_npz(fd: int, columns: Mapping[str, list[npt.NDArray[Any]]], when: float) -> int:
    """Write what ``numpy.savez`` writes (a zip of one stored ``.npy`` per
    column; each column an array in pieces) with one ``writev``, and return
    its size. The zip is written here, not by :mod:`zipfile`, so the writer
    releases the interpreter lock a dozen times per file instead of a few
    dozen: each time it takes it back, the event loop stops for it."""
    dos_date, dos_time = _dos_stamp(when)
    out: list[bytes | memoryview] = []
    central: list[bytes] = []
    offset = 0
    for key, parts in columns.items():
        first = parts[0]
        shape = first.shape if first.ndim == 0 else (sum(len(a) for a in parts), *first.shape[1:])
        descr = np.lib.format.dtype_to_descr(first.dtype)
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": descr, "fortran_order": False, "shape": shape}
        )
        data: list[bytes | memoryview] = [header.getvalue()]
        data += [np.ascontiguousarray(a).reshape(-1).view(np.uint8).data for a in parts]
        crc = 0
        for piece in data:
            crc = zlib.crc32(piece, crc)
        size = sum(len(piece) for piece in data)
        if size > _ZIP32_BYTES or offset > _ZIP32_BYTES:
            raise ValueError(f"{key}: {size} bytes, more than a zip without zip64 holds")
        name = f"{key}.npy".encode()
        common = struct.pack("<HHHHIIIH", 0, 0, dos_time, dos_date, crc, size, size, len(name))
        local = struct.pack("<IH", _LOCAL, _ZIP_VERSION) + common + struct.pack("<H", 0) + name
        out += [local, *data]
        central.append(
            struct.pack("<IHH", _CENTRAL, _MADE_BY, _ZIP_VERSION)
            + common
            + struct.pack("<HHHHII", 0, 0, 0, 0, _MEMBER_MODE << 16, offset)
            + name
        )
        offset += len(local) + size
    directory = b"".join(central)
    out += [
        directory,
        struct.pack("<IHHHHIIH", _END, 0, 0, len(central), len(central), len(directory), offset, 0),
    ]
    total = sum(len(piece) for piece in out)
    _writev_all(fd, out)
    return total


def _dos_stamp(when: float) -> tuple[int, int]:
    """Zip's (date, time) fields for Unix time ``when`` (local time), clamped
    to the years they hold, 1980-2107, as ``zipfile`` does with
    ``strict_timestamps=False``: a node whose clock still reads 1970 (no
    real-time clock, before time sync) records all the same."""
    clock = time.localtime(when)
    if clock.tm_year < 1980:
        return 0 << 9 | 1 << 5 | 1, 0
    if clock.tm_year > 2107:
        return 127 << 9 | 12 << 5 | 31, 23 << 11 | 59 << 5 | 29
    dos_date = (clock.tm_year - 1980) << 9 | clock.tm_mon << 5 | clock.tm_mday
    dos_time = clock.tm_hour << 11 | clock.tm_min << 5 | clock.tm_sec // 2
    return dos_date, dos_time


def _writev_all(fd: int, pieces: list[bytes | memoryview]) -> None:
    """``writev`` until every piece is written (a write may stop short)."""
    views = [memoryview(p).cast("B") for p in pieces]
    while views:
        n = os.writev(fd, views[:_IOV_MAX])
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


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
        raise RecordingError(
            f"{path}: version: expected {FORMAT_VERSION}, got {version.tolist()!r}"
        )
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
