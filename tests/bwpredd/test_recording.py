"""Recording accepted samples: files in format v1, rotation and retention,
dropping (queue full, disk full) without touching ingest, kills, the reader."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from structlog.testing import capture_logs

from bench.harness import scrape_metrics
from bwpredd import recording
from bwpredd.recording import (
    NAME_RE,
    Recorder,
    file_name,
    read_recording_file,
    read_recordings,
    recording_files,
)
from bwpredd.server import Server, StartupError
from tests.helpers import (
    daemon_process,
    free_port,
    running_server,
    sample,
    spawn_daemon,
    wait_for_health,
)

COLUMNS = {"version", "node", "peer", "t", "features", "sent"}
DROPPED = "bwpredd_recording_dropped_samples_total"


def _dir(state: Path) -> Path:
    return state / "recordings"


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _rows(state: Path) -> dict[str, list[float]]:
    """Bandwidths recorded per peer (every node), in time order."""
    return {t.peer: t.features[:, 1].tolist() for t in read_recordings(_dir(state))}


def _metric(server: Server, name: str, **labels: str) -> float:
    value = server.registry.get_sample_value(name, labels or None)
    assert value is not None, name
    return value


def _ts(seconds: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(round(seconds * 1e9))
    return out


def _plant(directory: Path, when_ms: int, token: str, peers: list[str]) -> Path:
    """A valid recording written by the test, as another run would have left it."""
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    n = len(peers)
    path = directory / file_name(when_ms, token)
    with path.open("wb") as fh:
        np.savez(
            fh,
            version=np.array(1, dtype=np.int64),
            node=np.array("old-node"),
            peer=np.array(peers),
            t=np.full(n, when_ms / 1000.0),
            features=np.tile(np.array([1.0, 2.0, 0.0, 1.0], dtype=np.float32), (n, 1)),
            sent=np.full(n, 0b1111, dtype=np.uint8),
        )
    return path


class TestFiles:
    """What a recording file holds."""

    def test_columns_after_streamed_samples(self, tmp_path: Path) -> None:
        """Samples streamed on StreamSamples appear in one rec-<T>-<R>.npz with
        exactly the spec's columns, dtypes and shapes, the node's name, each
        peer's rows in order; the directory is 0750 and the file 0640."""
        state = tmp_path / "state"
        before_ms = int(time.time() * 1000)
        with running_server(tmp_path, state_dir=str(state), record_node="node-1") as (srv, client):
            batches = [
                [sample(f"p{i % 5}", float(10 + i)) for i in range(k * 20, k * 20 + 20)]
                for k in range(3)
            ]
            acks = list(client.stream(batches))
            assert sum(a.accepted for a in acks) == 60
            assert srv.recorder is not None
            srv.recorder.flush()
            files = recording_files(_dir(state))
        after_ms = int(time.time() * 1000)
        assert len(files) == 1
        m = NAME_RE.fullmatch(files[0].name)
        assert m is not None and before_ms <= int(m.group(1)) <= after_ms
        with zipfile.ZipFile(files[0]) as zf:  # a sound zip: every CRC checks
            assert zf.testzip() is None
            assert sorted(zf.namelist()) == sorted(f"{k}.npy" for k in COLUMNS)
        cols = _load(files[0])
        assert set(cols) == COLUMNS
        assert cols["version"].dtype == np.int64 and cols["version"].shape == ()
        assert int(cols["version"]) == 1
        assert cols["node"].dtype.kind == "U" and cols["node"].shape == ()
        assert str(cols["node"]) == "node-1"
        assert cols["peer"].dtype.kind == "U" and cols["peer"].shape == (60,)
        assert cols["t"].dtype == np.float64 and cols["t"].shape == (60,)
        assert cols["features"].dtype == np.float32 and cols["features"].shape == (60, 4)
        assert cols["sent"].dtype == np.uint8 and cols["sent"].shape == (60,)
        for p in range(5):
            mine = cols["peer"] == f"p{p}"
            assert cols["features"][mine, 1].tolist() == [float(10 + i) for i in range(p, 60, 5)]
        assert stat.S_IMODE(_dir(state).stat().st_mode) == 0o750
        assert stat.S_IMODE(files[0].stat().st_mode) == 0o640

    def test_written_on_the_cadence(self, tmp_path: Path) -> None:
        """Without any flush asked for, the writer thread writes the samples
        within a few record_flush_s."""
        state = tmp_path / "state"
        with running_server(tmp_path, state_dir=str(state), record_flush_s=0.2) as (_, client):
            client.push([sample("c", 5.0), sample("c", 6.0)])
            deadline = time.monotonic() + 10
            while not recording_files(_dir(state)) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _rows(state) == {"c": [5.0, 6.0]}

    def test_carry_forward_and_sent_bits(self, tmp_path: Path) -> None:
        """Each row holds the features as stored (missing ones carried
        forward from the peer's previous sample, else the model's defaults),
        the same as GetPeer's window; ``sent`` has bit i for each feature the
        worker sent; ``t`` is the sample's timestamp, or its arrival time."""
        state = tmp_path / "state"
        stamped = time.time() - 5.0
        with running_server(tmp_path, state_dir=str(state)) as (srv, client):
            assert srv.core is not None
            lat0, _, loss0, rel0 = srv.core.engine.feature_defaults
            t0 = time.time()
            # Within one batch (forward fill) and across batches (seeded from the window).
            client.push(
                [
                    sample("cf", 10.0, timestamp=_ts(stamped)),
                    sample("cf", 11.0, latency_ms=7.0, packet_loss=0.2),
                ]
            )
            client.push([sample("cf", 12.0, reliability=0.5)])
            client.push([sample("cf", 13.0)])
            t1 = time.time()
            window = client.peer("cf").window
            assert srv.recorder is not None
            srv.recorder.flush()
        (trace,) = read_recordings(_dir(state))
        expected = [
            [lat0, 10.0, loss0, rel0],
            [7.0, 11.0, 0.2, rel0],
            [7.0, 12.0, 0.2, 0.5],
            [7.0, 13.0, 0.2, 0.5],
        ]
        np.testing.assert_allclose(trace.features, np.array(expected, dtype=np.float32))
        stored = [[s.latency_ms, s.bandwidth_mbps, s.packet_loss, s.reliability] for s in window]
        np.testing.assert_allclose(trace.features, np.array(stored, dtype=np.float32))
        assert trace.sent.tolist() == [0b0010, 0b0111, 0b1010, 0b0010]
        assert trace.t[0] == pytest.approx(stamped, abs=1e-6)
        assert all(t0 <= t <= t1 for t in trace.t[1:].tolist())
        assert trace.name.endswith("/cf")

    def test_peers_named_right_when_slots_change_hands(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With max_peers 4, each batch of 3 new peers evicts the last 3 and
        takes their slots while earlier batches still wait for the writer,
        one peer keeps its slot from the second batch on, and the names table
        starts afresh on the way: every row is recorded under the peer that
        sent it."""
        monkeypatch.setattr(recording, "WAKE_S", 3600.0)
        monkeypatch.setattr(recording, "_NAMES_SLACK", 0)
        state = tmp_path / "state"
        with running_server(tmp_path, state_dir=str(state), max_peers=4) as (srv, client):
            for k in range(10):
                # "stay" comes in the second batch, so its first code is not its slot.
                peers = [f"p{k}-{i}" for i in range(3)] + ["stay" if k else "first"]
                batch = [
                    sample(p, float(100 * k + 10 * i + j))
                    for j in range(2)
                    for i, p in enumerate(peers)
                ]
                assert client.push(batch).accepted == 8
            assert srv.recorder is not None
            srv.recorder.flush()
        expected = {
            f"p{k}-{i}": [float(100 * k + 10 * i), float(100 * k + 10 * i + 1)]
            for k in range(10)
            for i in range(3)
        }
        expected["first"] = [30.0, 31.0]
        expected["stay"] = [float(100 * k + 30 + j) for k in range(1, 10) for j in range(2)]
        assert _rows(state) == expected

    def test_restored_peers_keep_their_names(self, tmp_path: Path) -> None:
        """A peer restored from the snapshot at start-up is recorded under
        its id when its next sample comes."""
        state = tmp_path / "state"
        with running_server(tmp_path, state_dir=str(state), record=False) as (_, client):
            client.push([sample("kept", 1.0), sample("other", 2.0)])
        with running_server(tmp_path, state_dir=str(state)) as (_, client):
            assert client.peer("kept").sample_count == 1
            client.push([sample("kept", 3.0)])
        assert _rows(state) == {"kept": [3.0]}

    def test_a_files_worth_is_written_at_once(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Rows past a file's worth (FILE_ROWS) go to the next file, even in
        the middle of a batch."""
        monkeypatch.setattr(recording, "FILE_ROWS", 1500)
        state = tmp_path / "state"
        with running_server(tmp_path, state_dir=str(state), record_flush_s=3600.0) as (srv, client):
            assert (
                client.push([sample(f"w{i % 7}", float(i)) for i in range(4000)]).accepted == 4000
            )
            assert srv.recorder is not None
            srv.recorder.flush()
            files = recording_files(_dir(state))
        assert [len(_load(f)["t"]) for f in files] == [1500, 1500, 1000]
        assert _rows(state) == {f"w{p}": [float(i) for i in range(p, 4000, 7)] for p in range(7)}

    def test_name_order_is_write_order(self, tmp_path: Path) -> None:
        """Files written in the same millisecond, and after the clock stepped
        back behind the newest file there, still sort in write order: the
        reader's stable sort keeps equal timestamps in that order. A clock
        still at 1970 records (zip dates start in 1980)."""
        directory = tmp_path / "recordings"
        ahead = _plant(directory, 5_000_000, "ffffffff", ["old"])
        frozen = 1_000.0  # seconds: behind the planted file's 5,000 s
        rec = Recorder(
            directory,
            "n",
            4,
            max_bytes=1 << 30,
            max_age_s=0,
            flush_s=3600.0,
            clock=lambda: frozen,
        )
        try:
            rec.assign(np.array([0], dtype=np.int64), ["p"])
            for k in range(5):
                rec.add(
                    np.array([0], dtype=np.int64),
                    np.array([7.0]),
                    np.array([[1.0, float(k), 0.0, 1.0]], dtype=np.float32),
                    np.zeros((1, 4), dtype=np.bool_),
                )
                rec.flush()
        finally:
            rec.close()
        files = recording_files(directory)
        assert files[0] == ahead
        stamps = [int(NAME_RE.fullmatch(f.name).group(1)) for f in files]  # type: ignore[union-attr]
        assert stamps == list(range(5_000_000, 5_000_006))
        with zipfile.ZipFile(files[1]) as z:  # a 1970 clock: zip's earliest date
            assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        got = [read_recording_file(f)["features"][:, 1].tolist() for f in files[1:]]
        assert got == [[float(k)] for k in range(5)]
        assert [t.features[:, 1].tolist() for t in read_recordings(directory) if t.peer == "p"] == [
            [0.0, 1.0, 2.0, 3.0, 4.0]
        ]

    def test_queue_wraps_around(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Rows queued across the end of the queue's ring (100 rows here)
        come back whole and in order."""
        monkeypatch.setattr(recording, "QUEUE_SAMPLES", 100)
        monkeypatch.setattr(recording, "WAKE_S", 3600.0)
        state = tmp_path / "state"
        with running_server(tmp_path, state_dir=str(state)) as (srv, client):
            assert srv.recorder is not None
            for k in range(9):
                client.push([sample(f"r{i % 3}", float(100 * k + i)) for i in range(30)])
                if k % 3 == 2:
                    srv.recorder.flush()
            assert _metric(srv, DROPPED, reason="queue_full") == 0
        assert _rows(state) == {
            f"r{p}": [float(100 * k + i) for k in range(9) for i in range(p, 30, 3)]
            for p in range(3)
        }

    def test_shutdown_writes_the_tail(self, tmp_path: Path) -> None:
        """What is still waiting when the daemon stops (the SIGTERM path) is
        written before it exits."""
        state = tmp_path / "state"
        with running_server(tmp_path, state_dir=str(state), record_flush_s=3600.0) as (_, client):
            client.push([sample("tail", float(i + 1)) for i in range(7)])
            assert recording_files(_dir(state)) == []
        assert _rows(state) == {"tail": [float(i + 1) for i in range(7)]}


class TestRetention:
    """Rotation, and the oldest files going first."""

    def test_rotates_and_prunes_by_size(self, tmp_path: Path) -> None:
        """Each write is a new file; past record_max_bytes the oldest go, the
        newest stay, and the bytes and files metrics say what is kept."""
        state = tmp_path / "state"
        cap = 65536
        with running_server(
            tmp_path, state_dir=str(state), record_max_bytes=cap, record_flush_s=3600.0
        ) as (srv, client):
            assert srv.recorder is not None
            names: list[str] = []
            for k in range(8):
                client.push([sample(f"s{i:03d}", float(k * 1000 + i + 1)) for i in range(400)])
                srv.recorder.flush()
                files = recording_files(_dir(state))
                names += [f.name for f in files if f.name not in names]
                assert sum(f.stat().st_size for f in files) <= cap
            kept = recording_files(_dir(state))
            assert _metric(srv, "bwpredd_recording_bytes") == sum(f.stat().st_size for f in kept)
            assert _metric(srv, "bwpredd_recording_files") == len(kept)
            assert _metric(srv, "bwpredd_recorded_samples_total") == 8 * 400
        assert len(names) == 8
        assert 1 < len(kept) < 8
        assert [f.name for f in kept] == names[-len(kept) :]
        rounds = sorted({int(bw // 1000) for bws in _rows(state).values() for bw in bws})
        assert rounds == list(range(8 - len(kept), 8))

    def test_prunes_by_age_at_startup(self, tmp_path: Path) -> None:
        """Files older than record_max_age_s (by the time in their name) are
        removed when the daemon starts; younger ones are kept."""
        state = tmp_path / "state"
        now_ms = int(time.time() * 1000)
        old = _plant(_dir(state), now_ms - 2 * 3600 * 1000, "0000000a", ["x"])
        young = _plant(_dir(state), now_ms - 1000, "0000000b", ["y"])
        with running_server(tmp_path, state_dir=str(state), record_max_age_s=3600.0):
            assert not old.exists()
            assert young.exists()

    def test_prunes_by_age_while_running(self, tmp_path: Path) -> None:
        """A file that grows older than record_max_age_s goes at the next write."""
        state = tmp_path / "state"
        with running_server(tmp_path, state_dir=str(state), record_max_age_s=1.0) as (srv, client):
            assert srv.recorder is not None
            client.push([sample("a", 1.0)])
            srv.recorder.flush()
            (first,) = recording_files(_dir(state))
            time.sleep(1.2)
            client.push([sample("a", 2.0)])
            srv.recorder.flush()
            (second,) = recording_files(_dir(state))
        assert first != second
        assert _rows(state) == {"a": [2.0]}

    def test_startup_removes_interrupted_writes_only(self, tmp_path: Path) -> None:
        """A temporary left by a write that a kill interrupted is removed at
        start-up; a file that is neither a recording nor one of its
        temporaries is left alone, and readers ignore both."""
        state = tmp_path / "state"
        keep = _plant(_dir(state), int(time.time() * 1000), "0000000c", ["k"])
        temp = _dir(state) / f".{file_name(int(time.time() * 1000), '0000000d')}.tmp-0123abcd"
        temp.write_bytes(b"PK\x03\x04 half a file")
        other = _dir(state) / "notes.txt"
        other.write_text("mine")
        with running_server(tmp_path, state_dir=str(state)):
            assert not temp.exists()
            assert other.read_text() == "mine" and keep.exists()
        with capture_logs() as logs:
            assert _rows(state) == {"k": [2.0]}
        assert not [e for e in logs if e["event"] == "recording_unreadable"]

    def test_refuses_a_directory_others_can_write(self, tmp_path: Path) -> None:
        """A recordings directory that group or others may write stops the
        start naming record, and its mode is left as it was."""
        state = tmp_path / "state"
        _dir(state).mkdir(parents=True)
        _dir(state).chmod(0o777)
        with (
            pytest.raises(StartupError, match=r"record: .*writable by group or others"),
            running_server(tmp_path, state_dir=str(state)),
        ):
            pass
        assert stat.S_IMODE(_dir(state).stat().st_mode) == 0o777


class TestDropping:
    """A full queue or a failing disk drops recorded samples, never accepted ones."""

    def test_queue_full(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """With the writer not taking the queue, batches past its bound are
        left out of the recording, counted (queue_full) and said in a
        recording_dropped line; every sample is still accepted and stored."""
        monkeypatch.setattr(recording, "QUEUE_SAMPLES", 50)
        monkeypatch.setattr(recording, "WAKE_S", 3600.0)
        state = tmp_path / "state"
        with (
            capture_logs() as logs,
            running_server(tmp_path, state_dir=str(state)) as (srv, client),
        ):
            acks = [
                client.push([sample(f"q{k}", float(i + 1)) for i in range(40)]) for k in range(3)
            ]
            assert [a.accepted for a in acks] == [40, 40, 40]
            assert [client.peer(f"q{k}").sample_count for k in range(3)] == [40, 40, 40]
            assert _metric(srv, DROPPED, reason="queue_full") == 80
            assert srv.recorder is not None
            srv.recorder.flush()
            assert _metric(srv, "bwpredd_recorded_samples_total") == 40
        assert _rows(state) == {"q0": [float(i + 1) for i in range(40)]}
        lines = [e for e in logs if e["event"] == "recording_dropped"]
        assert len(lines) == 1 and lines[0]["reason"] == "queue_full"
        assert lines[0]["samples"] == 80

    def test_disk_full(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A write failing with ENOSPC drops that file's samples from the
        recording (counted write_failed, one recording_dropped line), leaves
        no temporary behind and ingest untouched; the next write succeeds."""
        failing = [True]
        real = recording._save_npz

        def save(*args: Any) -> int:
            if failing[0]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args)

        monkeypatch.setattr(recording, "_save_npz", save)
        state = tmp_path / "state"
        with (
            capture_logs() as logs,
            running_server(tmp_path, state_dir=str(state)) as (srv, client),
        ):
            assert srv.recorder is not None
            assert client.push([sample("d", float(i + 1)) for i in range(30)]).accepted == 30
            srv.recorder.flush()
            assert os.listdir(_dir(state)) == []
            assert _metric(srv, DROPPED, reason="write_failed") == 30
            assert client.peer("d").sample_count == 30
            failing[0] = False
            assert client.push([sample("d", 100.0)]).accepted == 1
            srv.recorder.flush()
            assert _metric(srv, "bwpredd_recorded_samples_total") == 1
        assert _rows(state) == {"d": [100.0]}
        (line,) = [e for e in logs if e["event"] == "recording_dropped"]
        assert line["reason"] == "write_failed" and "ENOSPC" in line["error"]

    def test_file_size_limit_in_a_real_daemon(self, tmp_path: Path) -> None:
        """A daemon whose writes really fail (RLIMIT_FSIZE: EFBIG past 8 KiB)
        accepts every sample, counts the recording's loss on its metrics
        endpoint and logs recording_dropped."""
        state = tmp_path / "state"
        metrics = f"127.0.0.1:{free_port()}"
        env = {
            "BWPREDD_LISTEN": f"unix:{tmp_path}/run/d.sock",
            "BWPREDD_STATE_DIR": str(state),
            "BWPREDD_RECORD_FLUSH_S": "0.2",
            "BWPREDD_METRICS_ADDR": metrics,
            "BWPREDD_LOG_FORMAT": "json",
        }
        with _spawned(env, wrap=["prlimit", "--fsize=8192", "--"]) as proc:
            client = wait_for_health(env["BWPREDD_LISTEN"], proc=proc)
            resp = client.push([sample(f"f{i % 10}", float(i + 1)) for i in range(1000)])
            assert resp.accepted == 1000
            deadline = time.monotonic() + 20
            while scrape_metrics(metrics).get(f"{DROPPED}{{reason=write_failed}}", 0) < 1000:
                assert time.monotonic() < deadline, "the failed write was not counted"
                time.sleep(0.1)
            assert sum(p.sample_count for p in client.peers()) == 1000
            client.close()
            proc.kill()
            out = proc.communicate(timeout=10)[0]
        assert b'"recording_dropped"' in out and b"EFBIG" in out
        assert recording_files(_dir(state)) == []


@contextlib.contextmanager
def _spawned(env: dict[str, str], wrap: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = spawn_daemon(env=env, wrap=wrap)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


class TestKills:
    """What a killed daemon leaves, and what the reader makes of it."""

    def _env(self, tmp_path: Path, flush_s: str) -> dict[str, str]:
        return {
            "BWPREDD_LISTEN": f"unix:{tmp_path}/run/d.sock",
            "BWPREDD_STATE_DIR": str(tmp_path / "state"),
            "BWPREDD_RECORD_FLUSH_S": flush_s,
        }

    def test_sigkill_leaves_readable_files(self, tmp_path: Path) -> None:
        """After kill -9, every file in place reads back, the samples sent
        long enough before the kill are all there, and the rest is at most
        lost as a tail (each peer's rows are a prefix of what it sent)."""
        env = self._env(tmp_path, "0.2")
        sent: dict[str, list[float]] = {f"k{p}": [] for p in range(10)}

        def push(client: Any, base: float) -> None:
            batch = [sample(f"k{i % 10}", base + i) for i in range(200)]
            assert client.push(batch).accepted == 200
            for s in batch:
                sent[s.peer_id].append(s.bandwidth_mbps)

        with daemon_process([], env=env) as proc:
            client = wait_for_health(env["BWPREDD_LISTEN"], proc=proc)
            push(client, 1000.0)
            early = {p: list(v) for p, v in sent.items()}
            time.sleep(2.0)
            push(client, 5000.0)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            client.close()
        state = tmp_path / "state"
        files = recording_files(_dir(state))
        assert files
        for f in files:
            read_recording_file(f)  # raises if unreadable
        with capture_logs() as logs:
            got = _rows(state)
        assert not [e for e in logs if e["event"] == "recording_unreadable"]
        for peer, values in sent.items():
            assert got[peer][: len(early[peer])] == early[peer]
            assert got[peer] == values[: len(got[peer])]

    def test_sigterm_writes_everything(self, tmp_path: Path) -> None:
        """SIGTERM writes every accepted sample before the daemon exits 0,
        however long the flush interval."""
        env = self._env(tmp_path, "3600")
        with daemon_process([], env=env) as proc:
            client = wait_for_health(env["BWPREDD_LISTEN"], proc=proc)
            assert client.push([sample("term", float(i + 1)) for i in range(50)]).accepted == 50
            client.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        assert _rows(tmp_path / "state") == {"term": [float(i + 1) for i in range(50)]}

    def test_torn_file_is_skipped_with_a_warning(self, tmp_path: Path) -> None:
        """A truncated file and one breaking the format are skipped, each
        with a recording_unreadable warning naming it; the good file's rows
        are read."""
        state = tmp_path / "state"
        with running_server(tmp_path, state_dir=str(state)) as (srv, client):
            client.push([sample("g", 1.0), sample("g", 2.0)])
            assert srv.recorder is not None
            srv.recorder.flush()
        (good,) = recording_files(_dir(state))
        data = good.read_bytes()
        later = int(NAME_RE.fullmatch(good.name).group(1)) + 1  # type: ignore[union-attr]
        torn = _dir(state) / file_name(later, "0badf00d")
        torn.write_bytes(data[: len(data) // 2])
        odd = _plant(_dir(state), later + 1, "0badf00e", ["g"])
        cols = _load(odd)
        cols["features"] = cols["features"].astype(np.float64)
        with odd.open("wb") as fh:
            np.savez(fh, **cols)
        with capture_logs() as logs:
            assert _rows(state) == {"g": [1.0, 2.0]}
        warned = {e["file"]: e["error"] for e in logs if e["event"] == "recording_unreadable"}
        assert set(warned) == {str(torn), str(odd)}
        assert "features" in warned[str(odd)]


class TestReader:
    """read_recordings over one node or many."""

    def test_nodes_side_by_side(self, tmp_path: Path) -> None:
        """Two nodes' directories read together give one trace per (node,
        peer), named <node>/<peer>, even for the same peer id."""
        for node, base in (("n1", 10.0), ("n2", 20.0)):
            state = tmp_path / node
            with running_server(tmp_path, state_dir=str(state), record_node=node) as (_, client):
                client.push([sample("x", base), sample("x", base + 1)])
        traces = list(read_recordings(_dir(tmp_path / "n1"), _dir(tmp_path / "n2")))
        assert [(t.name, t.features[:, 1].tolist()) for t in traces] == [
            ("n1/x", [10.0, 11.0]),
            ("n2/x", [20.0, 21.0]),
        ]


class TestOff:
    """Recording off writes nothing."""

    def test_record_false(self, tmp_path: Path) -> None:
        """record = false with a state directory: no recorder, no recordings
        directory, the metric at 0; snapshots go on as before."""
        state = tmp_path / "state"
        with running_server(tmp_path, state_dir=str(state), record=False) as (srv, client):
            assert client.push([sample("o", 1.0)]).accepted == 1
            assert srv.recorder is None and srv.core is not None and srv.core.recorder is None
            assert _metric(srv, "bwpredd_recorded_samples_total") == 0
        assert sorted(p.name for p in state.iterdir()) == ["windows.npz"]

    def test_without_state_dir(self, tmp_path: Path) -> None:
        """No state directory: nothing is recorded (record's default is on)."""
        with running_server(tmp_path) as (srv, client):
            assert client.push([sample("o", 1.0)]).accepted == 1
            assert srv.config.record and srv.recorder is None
