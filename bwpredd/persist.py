"""Window snapshots in the state directory: atomic writes, careful reads.

A snapshot is one ``.npz`` of plain arrays (loaded with
``allow_pickle=False``), written to a temporary file, fsynced, renamed over
the previous one, and the directory fsynced, so a crash at any point leaves
either the old snapshot or the new one. A snapshot that cannot be read is
moved aside (``windows.npz.corrupt-<unix time>``) so the daemon starts empty
and an operator can look at it.
"""

from __future__ import annotations

import contextlib
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["SNAPSHOT_NAME", "load_snapshot", "save_snapshot"]

SNAPSHOT_NAME = "windows.npz"
Arrays = dict[str, npt.NDArray[np.generic]]


def save_snapshot(arrays: Arrays, state_dir: Path) -> Path:
    """Write ``arrays`` to ``state_dir/windows.npz`` atomically.

    Args:
        arrays: the snapshot (e.g. ``WindowStore.snapshot()``).
        state_dir: the directory (created, mode 0700, if missing).

    Returns:
        The snapshot's path.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    final = state_dir / SNAPSHOT_NAME
    tmp = state_dir / f".{SNAPSHOT_NAME}.tmp-{os.getpid()}"
    try:
        with tmp.open("wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy stubs type **kwds oddly
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def load_snapshot(state_dir: Path) -> tuple[Arrays | None, str | None]:
    """Read the snapshot, if any.

    Args:
        state_dir: the directory.

    Returns:
        ``(arrays, None)`` when read; ``(None, None)`` when there is none;
        ``(None, reason)`` when it was unreadable and has been moved aside.
    """
    path = state_dir / SNAPSHOT_NAME
    if not path.exists():
        return None, None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}, None
    except (OSError, ValueError, zipfile.BadZipFile, KeyError, EOFError) as exc:
        aside = path.with_name(f"{SNAPSHOT_NAME}.corrupt-{int(time.time())}")
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        return None, f"{path}: unreadable ({type(exc).__name__}: {exc}); moved to {aside.name}"
