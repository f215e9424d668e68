"""Window snapshots in the state directory: atomic writes, bounded reads.

A snapshot is one ``.npz`` of plain arrays, written mode 0600 to a new
temporary file in the private state directory (:mod:`bwpredd.safefs`),
fsynced, renamed over the previous one, and the directory fsynced, so a
crash at any point leaves either the old snapshot or the new one.

Reading trusts nothing in the file: it must be a regular file no larger than
the caller's bound, every member stored (not compressed) and a plain-number
or string ``.npy`` whose header declares exactly the bytes the member holds,
so no header can make the daemon allocate more than the file's size. What the
arrays mean is checked by :meth:`bwpredd.windows.WindowStore.restore`. A
snapshot that cannot be restored is moved aside
(``windows.npz.corrupt-<unix time>``) so the daemon starts empty and an
operator can look at it.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import time
import zipfile
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt

from bwpredd.safefs import move_aside, open_new, private_dir, temp_name

__all__ = ["SNAPSHOT_NAME", "SnapshotError", "load_snapshot", "save_snapshot", "set_aside"]

SNAPSHOT_NAME = "windows.npz"
Arrays = dict[str, npt.NDArray[np.generic]]
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class SnapshotError(ValueError):
    """The snapshot file cannot be read; the message says why."""


def save_snapshot(arrays: Arrays, state_dir: Path) -> Path:
    """Write ``arrays`` to ``state_dir/windows.npz`` atomically, mode 0600.

    Args:
        arrays: the snapshot (e.g. ``WindowStore.snapshot()``).
        state_dir: the directory (created, mode 0700, if missing; refused if
            another user owns it or others may write it).

    Returns:
        The snapshot's path.

    Raises:
        OSError: the directory is unusable or the write failed.
    """
    with private_dir(state_dir) as dir_fd:
        tmp = temp_name(SNAPSHOT_NAME)
        fh = open_new(tmp, dir_fd)
        try:
            with fh:
                np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy stubs type **kwds oddly
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, SNAPSHOT_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)
    return state_dir / SNAPSHOT_NAME


def load_snapshot(state_dir: Path, max_bytes: int) -> Arrays | None:
    """Read the snapshot, if any, allocating at most about its size.

    Args:
        state_dir: the directory.
        max_bytes: the largest file accepted (what a snapshot of the store's
            capacity can take: ``WindowStore.snapshot_max_bytes()``).

    Returns:
        The arrays, or None when there is no snapshot.

    Raises:
        SnapshotError: the file is not a snapshot this reader accepts.
        OSError: the state directory itself is unusable.
    """
    with private_dir(state_dir) as dir_fd:
        try:
            fd = os.open(SNAPSHOT_NAME, _READ, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:  # ELOOP: a symlink, which is never followed
            raise SnapshotError(f"cannot open: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as fh:
            try:
                return _read_npz(fh, max_bytes)
            except SnapshotError:
                raise
            except (
                Exception
            ) as exc:  # zlib.error, BadZipFile, MemoryError, ...: all mean unreadable
                raise SnapshotError(f"{type(exc).__name__}: {exc}") from None


def _read_npz(fh: IO[bytes], max_bytes: int) -> Arrays:
    st = os.fstat(fh.fileno())
    if not stat.S_ISREG(st.st_mode):
        raise SnapshotError("not a regular file")
    if st.st_size > max_bytes:
        raise SnapshotError(
            f"{st.st_size} bytes, more than a snapshot of max_peers peers takes ({max_bytes})"
        )
    out: Arrays = {}
    with zipfile.ZipFile(fh) as zf:
        members = zf.infolist()
        # Stored members each hold their own bytes: together no more than the file.
        if sum(m.file_size for m in members) > st.st_size:
            raise SnapshotError("its members declare more bytes than the file holds")
        for member in members:
            name = member.filename.removesuffix(".npy")
            if name == member.filename or name in out:
                raise SnapshotError(f"{member.filename!r}: not one .npy array")
            if member.compress_type != zipfile.ZIP_STORED:
                raise SnapshotError(f"{member.filename}: compressed (snapshots are stored)")
            with zf.open(member) as f:
                out[name] = _read_npy(f, member.file_size, member.filename)
    return out


def _read_npy(f: IO[bytes], size: int, where: str) -> npt.NDArray[np.generic]:
    """One ``.npy`` member of ``size`` bytes, its header checked before any
    allocation."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise SnapshotError(f"{where}: .npy version {version} not supported")
    if fortran or dtype.hasobject or dtype.kind not in "biufU" or dtype.itemsize == 0:
        raise SnapshotError(f"{where}: not a plain C-order array of numbers or strings")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != size - f.tell():
        raise SnapshotError(
            f"{where}: header declares {nbytes} bytes of data, the member holds {size - f.tell()}"
        )
    data = f.read(nbytes)  # reading to the member's end also checks its CRC
    if len(data) != nbytes:
        raise SnapshotError(f"{where}: truncated")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def set_aside(state_dir: Path) -> str:
    """Move the snapshot to ``windows.npz.corrupt-<unix time>`` (a suffix is
    added rather than replacing anything already there).

    Returns:
        Its new name.

    Raises:
        OSError: it could not be moved.
    """
    with private_dir(state_dir) as dir_fd:
        return move_aside(SNAPSHOT_NAME, dir_fd, f"{SNAPSHOT_NAME}.corrupt-{int(time.time())}")
