"""The daemon's own files: a private directory, and new files in it that no
planted path can redirect.

A daemon that may run as root must never write through a path someone else
could have placed: a symlink at a predictable name would make it overwrite
the link's target. So a directory is opened once, one name at a time from
``/`` with ``O_NOFOLLOW`` (a symlink on the way is followed only when the
daemon's user or root owns it), and checked through that open descriptor
(owned by the daemon's user, writable by no one else), every
name in it is resolved relative to the descriptor, a new file is created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` (an existing name, link or not, is an error,
never followed or reused), and a file is moved aside with ``link`` +
``unlink``, which never replaces a name that exists. The daemon creates a
missing directory with mode 0700 (the recordings directory 0750, so a
trainer in the service's group can read it) and never changes the mode of
one it did not create.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "UnsafePath",
    "move_aside",
    "open_new",
    "open_private_dir",
    "open_trusted_dir",
    "private_dir",
    "temp_name",
    "walk_dir",
]

_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_LINKS = 40  # symlinks followed on one path at most (the kernel's limit)


class UnsafePath(OSError):
    """A path the daemon will not use; ``strerror`` says why."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(errno.EPERM, why, str(path))


def _unsafe_dir(st: os.stat_result) -> str | None:
    """Why a directory is no place for the daemon's files, or None."""
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by the daemon's user (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            "make it 0700 (chmod go-w), bwpredd never changes the mode of a directory "
            "it did not create"
        )
    return None


def open_private_dir(path: Path, mode: int = 0o700) -> int:
    """Open a directory only the daemon's user may write and return its
    descriptor (the caller closes it).

    A missing directory is created with ``mode`` (parents as needed; the
    umask may narrow it). The path is walked as :func:`open_trusted_dir`
    walks it, so no symlink another user owns is followed, above the
    directory or at it.

    Args:
        path: the directory.
        mode: permission bits of a directory created here; never applied to
            one that exists.

    Raises:
        OSError: it cannot be created or opened (``NotADirectoryError`` for
            a file); UnsafePath when another user owns it, others may write
            it, or a symlink on the way belongs to another user.
    """
    return open_trusted_dir(path, mode)


def _changeable(st: os.stat_result) -> str | None:
    """Why another user could replace what a directory holds, or None."""
    if st.st_uid not in (os.geteuid(), 0):
        return f"owned by uid {st.st_uid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def open_trusted_dir(path: Path, mode: int = 0o777, *, whole_path: bool = False) -> int:
    """Open a directory only the caller's user may write, reached through
    no link another user placed, and return its descriptor (the caller
    closes it). For tools that root may run on paths under another user's
    directory (``/var/lib/bwpredd`` belongs to the service's user).

    The path is walked as :func:`walk_dir` walks it; then the directory
    itself must belong to the caller's user and be writable by no one else.

    Args:
        path: the directory.
        mode: permission bits of the directory if it is created here.
        whole_path: also refuse when another user could replace a directory
            on the way (one they own, or one group or others may write that is
            not sticky): needed by a caller that goes on to use paths under
            ``path`` rather than the descriptor.

    Raises:
        OSError: a name cannot be created or opened (``NotADirectoryError``
            for a file); UnsafePath naming why the path is refused.
    """
    fd, _ = walk_dir(path, mode, whole_path=whole_path)
    problem = _unsafe_dir(os.fstat(fd))
    if problem:
        os.close(fd)
        raise UnsafePath(path, problem)
    return fd


def walk_dir(path: Path, mode: int = 0o777, *, whole_path: bool = False) -> tuple[int, Path]:
    """Open a directory reached through no link another user placed, and
    return its descriptor (the caller closes it) and its real path, but
    leave the checks of the directory itself to the caller (the unix
    socket's directory may be root's sticky ``/tmp``, which
    :func:`open_trusted_dir` would refuse).

    The path (made absolute against the working directory) is walked one
    name at a time, each opened relative to the one above with
    ``O_NOFOLLOW``: a symlink is followed (by walking its target) only when
    the caller's user or root owns it. What is missing is created (the last
    directory with ``mode``, those above with 0777; the umask narrows both).
    The real path is the names the walk opened, so a caller that must use a
    path (``bind``) uses the one the walk checked, never the given string.

    Args:
        path: the directory.
        mode: permission bits of the directory if it is created here.
        whole_path: also refuse when another user could replace a directory
            on the way (one they own, or one group or others may write that is
            not sticky); the directory itself is not checked.

    Raises:
        OSError: a name cannot be created or opened (``NotADirectoryError``
            for a file); UnsafePath naming the name refused and why.
    """
    todo = list((Path.cwd() / path).parts)
    fd = os.open(todo.pop(0), _DIR)
    where = Path("/")
    links = 0
    try:
        while todo:
            problem = _changeable(os.fstat(fd)) if whole_path else None
            if problem:
                raise UnsafePath(where, problem)
            name = todo.pop(0)
            try:
                link = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o777 if todo else mode, dir_fd=fd)
                link = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(link.st_mode):
                if link.st_uid not in (os.geteuid(), 0):
                    raise UnsafePath(where / name, f"a symlink owned by uid {link.st_uid}")
                links += 1
                if links > _MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
                target = Path(os.readlink(name, dir_fd=fd))
                if target.is_absolute():
                    os.close(fd)
                    fd, where = os.open("/", _DIR), Path("/")
                    todo[:0] = target.parts[1:]
                else:
                    todo[:0] = target.parts
                continue
            new = os.open(name, _DIR, dir_fd=fd)
            os.close(fd)
            fd, where = new, where.parent if name == ".." else where / name
    except BaseException:
        os.close(fd)
        raise
    return fd, where


@contextlib.contextmanager
def private_dir(path: Path) -> Iterator[int]:
    """:func:`open_private_dir` (mode 0700) for the length of a block."""
    fd = open_private_dir(path)
    try:
        yield fd
    finally:
        os.close(fd)


def temp_name(name: str) -> str:
    """A hidden name next to ``name`` that nobody can predict."""
    return f".{name}.tmp-{secrets.token_hex(8)}"


def open_new(name: str, dir_fd: int, mode: int = 0o600) -> BinaryIO:
    """Create ``name`` in the directory ``dir_fd`` and open it for writing.

    Args:
        name: a plain name (no ``/``).
        dir_fd: from :func:`private_dir`.
        mode: permission bits (the umask may narrow them).

    Raises:
        FileExistsError: the name exists (as a file, a link, anything).
    """
    if "/" in name:
        raise ValueError(f"open_new: {name!r} is not a plain name")
    return os.fdopen(os.open(name, _NEW_FILE, mode, dir_fd=dir_fd), "wb")


def move_aside(name: str, dir_fd: int, new: str) -> str:
    """Rename ``name`` to ``new`` (``new-1``, ``new-2``... when taken) without
    replacing or following anything that exists.

    Returns:
        The name it now has.

    Raises:
        OSError: it could not be moved.
    """
    for i in range(100):
        candidate = new if i == 0 else f"{new}-{i}"
        try:
            os.link(name, candidate, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            continue
        os.unlink(name, dir_fd=dir_fd)
        return candidate
    raise FileExistsError(errno.EEXIST, f"every name like {new!r} is taken", new)
