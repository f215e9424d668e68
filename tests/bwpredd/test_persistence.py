"""Window snapshots: SIGTERM, periodic, kill -9, corrupt files, age."""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bwpredd.persist import SNAPSHOT_NAME, SnapshotError, load_snapshot, save_snapshot, set_aside
from bwpredd.safefs import open_new, private_dir
from bwpredd.server import StartupError
from bwpredd.windows import WindowStore
from tests.helpers import daemon_process, running_server, sample, wait_for_health


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "BWPREDD_LISTEN": f"unix:{tmp_path}/run/d.sock",
        "BWPREDD_STATE_DIR": str(tmp_path / "state"),
        **extra,
    }


class TestSnapshotFile:
    """The snapshot file itself."""

    def test_atomic_write_and_read(self, tmp_path: Path) -> None:
        """save then load returns the same arrays and leaves no temporary file."""
        store = WindowStore(4, [50.0, 0.0, 0.0, 1.0])
        data = np.tile([1.0, 5.0, 0.0, 1.0], (3, 1))
        store.ingest(["a", "b", "a"], data, np.array([1.0, 1.0, 2.0]), now=3.0)
        path = save_snapshot(store.snapshot(), tmp_path / "s")
        arrays = load_snapshot(tmp_path / "s", store.snapshot_max_bytes())
        assert arrays is not None
        assert sorted(arrays["peer_ids"].tolist()) == ["a", "b"]
        assert [p.name for p in path.parent.iterdir()] == [SNAPSHOT_NAME]

    def test_none_without_a_file(self, tmp_path: Path) -> None:
        """With no snapshot in the directory, load_snapshot returns None."""
        assert load_snapshot(tmp_path, max_bytes=1 << 20) is None

    def test_corrupt_raises_and_is_set_aside(self, tmp_path: Path) -> None:
        """A corrupt snapshot raises SnapshotError; set_aside moves it to a
        windows.npz.corrupt-<time> name."""
        (tmp_path / SNAPSHOT_NAME).write_bytes(b"PK\x03\x04 not a zip")
        with pytest.raises(SnapshotError, match="BadZipFile"):
            load_snapshot(tmp_path, max_bytes=1 << 20)
        aside = set_aside(tmp_path)
        assert aside.startswith(f"{SNAPSHOT_NAME}.corrupt-")
        assert not (tmp_path / SNAPSHOT_NAME).exists()
        assert (tmp_path / aside).read_bytes() == b"PK\x03\x04 not a zip"


class TestDaemon:
    """Snapshots across daemon restarts."""

    def test_sigterm_then_restore(self, tmp_path: Path) -> None:
        """Windows written on SIGTERM are back after a restart, sample for sample."""
        env = _env(tmp_path)
        with daemon_process([], env=env) as proc:
            client = wait_for_health(env["BWPREDD_LISTEN"])
            client.push([sample("keep", 10.0 + i, latency_ms=3.0) for i in range(12)])
            before = client.peer("keep")
            client.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        with daemon_process([], env=env):
            client = wait_for_health(env["BWPREDD_LISTEN"])
            after = client.peer("keep")
            client.close()
        assert [s.bandwidth_mbps for s in after.window] == [s.bandwidth_mbps for s in before.window]
        assert after.sample_count == 12

    def test_kill9_loses_at_most_an_interval(self, tmp_path: Path) -> None:
        """After kill -9, samples older than one snapshot interval survive."""
        env = _env(tmp_path, BWPREDD_SNAPSHOT_INTERVAL_S="0.2")
        with daemon_process([], env=env) as proc:
            client = wait_for_health(env["BWPREDD_LISTEN"])
            client.push([sample("early", float(i + 1)) for i in range(5)])
            time.sleep(1.0)
            client.close()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        with daemon_process([], env=env):
            client = wait_for_health(env["BWPREDD_LISTEN"])
            assert client.peer("early").sample_count == 5
            client.close()

    def test_corrupt_snapshot_starts_empty(self, tmp_path: Path) -> None:
        """A corrupt snapshot is moved aside and the daemon serves, empty."""
        state = tmp_path / "state"
        state.mkdir()
        (state / SNAPSHOT_NAME).write_bytes(b"garbage")
        env = _env(tmp_path)
        with daemon_process([], env=env):
            client = wait_for_health(env["BWPREDD_LISTEN"])
            assert client.peers() == []
            client.close()
        assert any(p.name.startswith(f"{SNAPSHOT_NAME}.corrupt-") for p in state.iterdir())

    def test_old_windows_dropped(self, tmp_path: Path) -> None:
        """Windows older than snapshot_max_age_s are not restored."""
        with running_server(tmp_path, state_dir=str(tmp_path / "st")) as (_, client):
            client.push([sample("old", 1.0)])
        time.sleep(1.2)
        with running_server(tmp_path, state_dir=str(tmp_path / "st"), snapshot_max_age_s=1.0) as (
            _,
            client,
        ):
            assert client.peers() == []


# -- crafted state --------------------------------------------------------------------

DEFAULTS = [50.0, 0.0, 0.0, 1.0]
Arrays = dict[str, np.ndarray]


def _snapshot(peers: tuple[str, ...] = ("a", "b"), samples: int = 12) -> Arrays:
    """A real snapshot of ``peers``, each with ``samples`` samples ending now."""
    now = time.time()
    store = WindowStore(max(8, len(peers)), DEFAULTS)
    ids = [p for p in peers for _ in range(samples)]
    data = np.tile([5.0, 10.0, 0.01, 0.99], (len(ids), 1))
    data[:, 1] += np.repeat(np.arange(len(peers)), samples)
    ts = np.tile(now - samples + np.arange(samples, dtype=float), len(peers))
    store.ingest(ids, data, ts, now)
    return store.snapshot()


def _write(state: Path, arrays: Arrays) -> Path:
    """Write ``arrays`` as the state directory's snapshot, as the daemon does."""
    state.mkdir(exist_ok=True)
    with (state / SNAPSHOT_NAME).open("wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    return state / SNAPSHOT_NAME


def _set_aside(state: Path) -> list[str]:
    return sorted(p.name for p in state.iterdir() if p.name.startswith(f"{SNAPSHOT_NAME}.corrupt"))


def _petabyte_header(state: Path) -> None:
    """The data.npy header of a real 2,000-peer snapshot edited in place to
    declare a 2.84 PiB array; the zip structure is intact, only a CRC (checked
    once the member is read to its end) is wrong."""
    path = _write(state, _snapshot(tuple(f"p{i}" for i in range(2000))))
    blob = path.read_bytes()
    old = b"'shape': (2000, 10, 4)"
    new = b"'shape': (20000000000000, 10, 4)"
    start = blob.index(old)
    end = blob.index(b"\n", start)
    header = blob[start:end]
    assert header.endswith(b" " * (len(new) - len(old)))
    edited = new + header[len(old) : len(header) - (len(new) - len(old))]
    path.write_bytes(blob[:start] + edited + blob[end:])


def _corrupt_deflate(state: Path) -> None:
    """A compressed snapshot with bytes flipped inside a deflated member."""
    state.mkdir(exist_ok=True)
    path = state / SNAPSHOT_NAME
    with path.open("wb") as fh:
        np.savez_compressed(fh, **_snapshot(samples=10))  # type: ignore[arg-type]
    blob = bytearray(path.read_bytes())
    start = blob.index(b"data.npy") + 60
    for i in range(start, start + 40):
        blob[i] ^= 0x5A
    path.write_bytes(bytes(blob))


def _format_inf(state: Path) -> None:
    arrays = _snapshot()
    arrays["format"] = np.array([np.inf])
    _write(state, arrays)


def _truncated(state: Path) -> None:
    path = _write(state, _snapshot())
    path.write_bytes(path.read_bytes()[:700])


def _symlink(state: Path) -> None:
    """windows.npz is a symlink to a valid snapshot elsewhere."""
    elsewhere = _write(state.parent / "elsewhere", _snapshot())
    state.mkdir(exist_ok=True)
    (state / SNAPSHOT_NAME).symlink_to(elsewhere)


class TestCorruptSnapshot:
    """A snapshot that cannot be restored in full never stops a start: it is
    moved aside and the daemon starts empty (issue 14, item 5)."""

    @pytest.mark.parametrize(
        "craft", [_petabyte_header, _corrupt_deflate, _format_inf, _truncated, _symlink]
    )
    def test_crafted_file_set_aside(self, tmp_path: Path, craft: Callable[[Path], None]) -> None:
        """The daemon serves, empty; the file is moved aside; the next start is clean."""
        state = tmp_path / "state"
        craft(state)
        with running_server(tmp_path, state_dir=str(state)) as (_, client):
            assert client.health() == "SERVING"
            assert client.peers() == []
        assert len(_set_aside(state)) == 1
        with running_server(tmp_path, state_dir=str(state)) as (_, client):
            assert client.peers() == []
        assert len(_set_aside(state)) == 1

    def test_petabyte_header_daemon_exits_zero(self, tmp_path: Path) -> None:
        """As a process: a snapshot declaring a petabyte array neither stops
        the start nor allocates it; SIGTERM then exits 0."""
        _petabyte_header(tmp_path / "state")
        env = _env(tmp_path)
        with daemon_process([], env=env) as proc:
            client = wait_for_health(env["BWPREDD_LISTEN"])
            assert client.peers() == []
            client.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0

    def test_fifo_not_waited_on(self, tmp_path: Path) -> None:
        """A FIFO named windows.npz is refused at once rather than read (a read
        would wait forever for a writer)."""
        os.mkfifo(tmp_path / SNAPSHOT_NAME)
        with pytest.raises(SnapshotError, match="not a regular file"):
            load_snapshot(tmp_path, max_bytes=1 << 20)

    def test_larger_than_capacity_refused_before_reading(self, tmp_path: Path) -> None:
        """A file larger than a snapshot of SNAPSHOT_OVERSIZE x max_peers peers
        can be is refused by its size."""
        _write(tmp_path, _snapshot(tuple(f"p{i}" for i in range(600))))
        with pytest.raises(SnapshotError, match="more than a snapshot of max_peers"):
            load_snapshot(tmp_path, max_bytes=WindowStore(100, DEFAULTS).snapshot_max_bytes())


def _mutate(name: str, fn: Callable[[Arrays], Any]) -> Any:
    return pytest.param(fn, id=name)


def _ids(*ids: str) -> np.ndarray:
    return np.array(ids, dtype="<U128")


def _swap_ts(a: Arrays) -> None:
    a["ts"][0, [3, 4]] = a["ts"][0, [4, 3]]


POISONED = [
    _mutate("duplicate-ids", lambda a: a.update(peer_ids=_ids("a", "a"))),
    _mutate("space-id", lambda a: a.update(peer_ids=_ids("a b", "b"))),
    _mutate("newline-id", lambda a: a.update(peer_ids=_ids("a\nb", "b"))),
    _mutate("empty-id", lambda a: a.update(peer_ids=_ids("", "b"))),
    _mutate("last-seen-longer", lambda a: a.update(last_seen=np.tile(a["last_seen"], 2))),
    _mutate("count-shorter", lambda a: a.update(count=a["count"][:1])),
    _mutate("negative-bandwidth", lambda a: a["data"].__setitem__((0, 3, 1), -5.0)),
    _mutate("bandwidth-above-1e7", lambda a: a["data"].__setitem__((1, 0, 1), 1e9)),
    _mutate("loss-above-1", lambda a: a["data"].__setitem__((0, 0, 2), 3.0)),
    _mutate("nan-latency", lambda a: a["data"].__setitem__((0, 0, 0), np.nan)),
    _mutate("ts-out-of-order", _swap_ts),
    _mutate("ts-infinite", lambda a: a["ts"].__setitem__((1, 2), np.inf)),
    _mutate("last-ts-not-newest", lambda a: a["last_ts"].__setitem__(0, a["last_ts"][0] - 100)),
    _mutate("last-seen-infinite", lambda a: a["last_seen"].__setitem__(0, np.inf)),
    _mutate("head-out-of-range", lambda a: a["head"].__setitem__(0, 42)),
    _mutate("count-not-total", lambda a: a["count"].__setitem__(0, 3)),
    _mutate("total-negative", lambda a: a["total"].__setitem__(1, -1)),
    _mutate("head-float", lambda a: a.update(head=a["head"].astype(np.float64))),
    _mutate("window-not-configured", lambda a: a.update(window=np.array([12]))),
    _mutate("missing-array", lambda a: a.pop("last_ts")),
    _mutate("extra-array", lambda a: a.update(extra=np.zeros(2))),
    _mutate("peer-ids-2d", lambda a: a.update(peer_ids=_ids("a", "b").reshape(2, 1))),
]


class TestPoisonedSnapshot:
    """A snapshot is checked with the rules live input obeys and restored all
    or nothing (issue 14, item 6)."""

    @pytest.mark.parametrize("craft", POISONED)
    def test_refused_whole(self, tmp_path: Path, craft: Callable[[Arrays], None]) -> None:
        """The daemon starts with no peer from the snapshot, moved aside, and
        takes new peers up to max_peers with evictions beyond."""
        state = tmp_path / "state"
        arrays = _snapshot()
        craft(arrays)
        _write(state, arrays)
        with running_server(tmp_path, state_dir=str(state), max_peers=3) as (_, client):
            assert client.peers() == []
            for i in range(5):
                assert client.push([sample(f"n{i}", 5.0)]).accepted == 1
            assert sorted(p.peer_id for p in client.peers()) == ["n2", "n3", "n4"]
        assert len(_set_aside(state)) == 1

    def test_valid_snapshot_restored(self, tmp_path: Path) -> None:
        """The same snapshot, unmodified, is restored sample for sample."""
        state = tmp_path / "state"
        _write(state, _snapshot())
        with running_server(tmp_path, state_dir=str(state)) as (_, client):
            assert sorted(p.peer_id for p in client.peers()) == ["a", "b"]
            assert [s.bandwidth_mbps for s in client.peer("b").window] == [11.0] * 10
        assert _set_aside(state) == []


class TestPlantedPaths:
    """No path planted in the state directory is followed or reused, and the
    snapshot is private (issue 14, item 2)."""

    def test_planted_temporary_not_followed(self, tmp_path: Path) -> None:
        """A symlink at the temporary's old predictable name is neither followed
        nor renamed into place; the snapshot is a regular file of mode 0600."""
        state = tmp_path / "state"
        state.mkdir()
        victim = tmp_path / "victim"
        victim.write_text("precious")
        link = state / f".{SNAPSHOT_NAME}.tmp-{os.getpid()}"
        link.symlink_to(victim)
        with running_server(tmp_path, state_dir=str(state)) as (_, client):
            client.push([sample("p", 5.0)])
        assert victim.read_text() == "precious"
        assert link.is_symlink()
        snap = (state / SNAPSHOT_NAME).lstat()
        assert stat.S_ISREG(snap.st_mode) and snap.st_mode & 0o777 == 0o600

    def test_open_new_refuses_existing_names(self, tmp_path: Path) -> None:
        """open_new fails on an existing name, link or file, and leaves it as it was."""
        victim = tmp_path / "victim"
        victim.write_text("precious")
        (tmp_path / "link").symlink_to(victim)
        (tmp_path / "file").write_text("mine")
        with private_dir(tmp_path) as fd:
            for name in ("link", "file"):
                with pytest.raises(FileExistsError):
                    open_new(name, fd)
            with open_new("fresh", fd) as fh:
                fh.write(b"x")
        assert victim.read_text() == "precious" and (tmp_path / "file").read_text() == "mine"
        assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o600

    def test_set_aside_does_not_clobber(self, tmp_path: Path) -> None:
        """Moving a corrupt snapshot aside neither follows nor replaces a name
        planted where it would go."""
        state = tmp_path / "state"
        state.mkdir()
        (state / SNAPSHOT_NAME).write_bytes(b"garbage")
        victim = tmp_path / "victim"
        victim.write_text("precious")
        now = int(time.time())
        planted = [state / f"{SNAPSHOT_NAME}.corrupt-{t}" for t in range(now, now + 30)]
        for p in planted:
            p.symlink_to(victim)
        with running_server(tmp_path, state_dir=str(state)) as (_, client):
            assert client.peers() == []
        assert victim.read_text() == "precious"
        assert all(p.is_symlink() for p in planted)
        moved = [state / n for n in _set_aside(state) if not (state / n).is_symlink()]
        assert len(moved) == 1 and moved[0].read_bytes() == b"garbage"

    def test_writable_state_dir_refused_untouched(self, tmp_path: Path) -> None:
        """A state directory others may write is refused at start-up, naming
        state_dir, and its mode is left as it was."""
        state = tmp_path / "state"
        state.mkdir()
        state.chmod(0o777)
        with (
            pytest.raises(StartupError, match=r"^state_dir: .*writable by group or others"),
            running_server(tmp_path, state_dir=str(state)),
        ):
            pass
        assert state.stat().st_mode & 0o7777 == 0o777

    def test_missing_state_dir_created_private(self, tmp_path: Path) -> None:
        """A state directory that does not exist is created at start-up, mode 0700."""
        state = tmp_path / "new" / "state"
        with running_server(tmp_path, state_dir=str(state)):
            assert state.stat().st_mode & 0o777 == 0o700

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
    def test_state_dir_of_another_user_refused(self, tmp_path: Path) -> None:
        """A state directory owned by another user is refused at start-up."""
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        os.chown(state, 65534, 65534)
        with (
            pytest.raises(StartupError, match=r"^state_dir: .*owned by uid 65534"),
            running_server(tmp_path, state_dir=str(state)),
        ):
            pass

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
    def test_link_above_state_dir_refused(self, tmp_path: Path) -> None:
        """A state directory reached through a symlink another user planted
        above it (in a directory they may write) is refused at start-up:
        nothing is created or written where the link points."""
        shared = tmp_path / "shared"
        shared.mkdir()
        os.chown(shared, 65534, 65534)
        victim = tmp_path / "victim"
        victim.mkdir()
        link = shared / "bwpredd"
        link.symlink_to(victim)
        os.lchown(link, 65534, 65534)
        with (
            pytest.raises(StartupError, match=r"^state_dir: .*a symlink owned by uid 65534"),
            running_server(tmp_path, state_dir=str(link / "state")),
        ):
            pass
        assert list(victim.iterdir()) == []


class TestStateDirAtStartup:
    """An unusable state directory stops start-up like any bad option (issue 14, item 8)."""

    def test_file_as_state_dir_exits_3(self, tmp_path: Path) -> None:
        """A state_dir that is a file stops the daemon with exit code 3 and a
        line naming state_dir."""
        (tmp_path / "state").write_text("not a directory")
        with daemon_process([], env=_env(tmp_path)) as proc:
            out = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 3
        assert "state_dir" in out and "not a directory" in out.lower()

    def test_state_dir_under_a_file_refused(self, tmp_path: Path) -> None:
        """A state_dir whose parent is a file is refused at start-up."""
        (tmp_path / "file").write_text("x")
        with (
            pytest.raises(StartupError, match=r"^state_dir: "),
            running_server(tmp_path, state_dir=str(tmp_path / "file" / "state")),
        ):
            pass
