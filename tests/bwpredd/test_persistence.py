"""Window snapshots: SIGTERM, periodic, kill -9, corrupt files, age."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np

from bwpredd.persist import SNAPSHOT_NAME, load_snapshot, save_snapshot
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
        arrays, problem = load_snapshot(tmp_path / "s")
        assert problem is None and arrays is not None
        assert sorted(arrays["peer_ids"].tolist()) == ["a", "b"]
        assert [p.name for p in path.parent.iterdir()] == [SNAPSHOT_NAME]

    def test_corrupt_moved_aside(self, tmp_path: Path) -> None:
        """A corrupt snapshot is moved aside with a reason and reads as none."""
        (tmp_path / SNAPSHOT_NAME).write_bytes(b"PK\x03\x04 not a zip")
        arrays, problem = load_snapshot(tmp_path)
        assert arrays is None and problem is not None and "moved to" in problem
        assert not (tmp_path / SNAPSHOT_NAME).exists()
        assert any(p.name.startswith(f"{SNAPSHOT_NAME}.corrupt-") for p in tmp_path.iterdir())


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
