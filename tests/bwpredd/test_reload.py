"""Model reloads: atomic swap under load, failed reloads, start-up refusal."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bwpredd.client import Client, channel_for, pb
from bwpredd.modeldir import DEFAULT_MODEL_DIR
from bwpredd.server import Server, StartupError
from tests.bwpredd.test_notify import NotifySocket
from tests.conftest_models import make_model_dir
from tests.helpers import daemon_process, running_server, sample, wait_for_health

MODEL = pb.FORECAST_SOURCE_MODEL


def reload(server: Server) -> bool:
    """Run Server.reload on its loop from the test thread."""
    loop = server.loop
    assert loop is not None
    return asyncio.run_coroutine_threadsafe(server.reload(), loop).result(timeout=60)


def fill(client: Client, peers: int = 4) -> list[str]:
    ids = [f"peer-{i}" for i in range(peers)]
    client.push([sample(p, 10.0 + i, latency_ms=5.0) for i in range(10) for p in ids])
    return ids


class TestReload:
    """Reloading the model directory."""

    def test_reload_under_concurrent_forecasts(self, tmp_path: Path) -> None:
        """4 threads of Forecast calls across a reload: none fails, the new version shows."""
        model_dir = make_model_dir(tmp_path / "model", version="v1", seed=1)
        with running_server(tmp_path, model_dir=str(model_dir)) as (server, client):
            ids = fill(client)
            assert client.forecast(ids[:1])[0].model_version == "v1"
            stop = threading.Event()
            errors: list[BaseException] = []
            versions: set[str] = set()
            calls = [0]

            def hammer() -> None:
                c = Client(channel_for(server.address), timeout=10)
                try:
                    while not stop.is_set():
                        for fc in c.forecast(ids):
                            assert fc.source == MODEL
                            versions.add(fc.model_version)
                        calls[0] += 1
                except BaseException as exc:  # surfaced below
                    errors.append(exc)
                finally:
                    c.close()

            threads = [threading.Thread(target=hammer) for _ in range(4)]
            for t in threads:
                t.start()
            make_model_dir(model_dir, version="v2", seed=2)
            assert reload(server)
            (after,) = client.forecast(ids[:1])
            stop.set()
            for t in threads:
                t.join(timeout=30)
            assert errors == []
            assert calls[0] > 0
            assert after.model_version == "v2"
            assert versions <= {"v1", "v2"}

    def test_corrupt_reload_keeps_old(self, tmp_path: Path) -> None:
        """A reload of a corrupt directory fails and the old version keeps serving."""
        model_dir = tmp_path / "model"
        shutil.copytree(DEFAULT_MODEL_DIR, model_dir)
        with running_server(tmp_path, model_dir=str(model_dir)) as (server, client):
            ids = fill(client, 1)
            old = client.forecast(ids)[0].model_version
            blob = bytearray((model_dir / "allocator.onnx").read_bytes())
            blob[100] ^= 0x55
            (model_dir / "allocator.onnx").write_bytes(bytes(blob))
            assert not reload(server)
            fc = client.forecast(ids)[0]
            assert fc.model_version == old and fc.source == MODEL
            (model_dir / "forecaster.onnx").unlink()
            assert not reload(server)
            assert client.forecast(ids)[0].model_version == old

    def test_watch_model_dir(self, tmp_path: Path) -> None:
        """With watch_model_dir a new publish is picked up without a signal."""
        model_dir = make_model_dir(tmp_path / "model", version="w1")
        with running_server(
            tmp_path, model_dir=str(model_dir), watch_model_dir=True, snapshot_interval_s=0.1
        ) as (_, client):
            ids = fill(client, 1)
            make_model_dir(model_dir, version="w2", seed=3)
            for _ in range(100):
                if client.forecast(ids)[0].model_version == "w2":
                    break
                threading.Event().wait(0.05)
            assert client.forecast(ids)[0].model_version == "w2"


class TestStartup:
    """A model directory that fails verification at start-up."""

    def test_fallback_when_model_refused(self, tmp_path: Path) -> None:
        """The daemon serves BASELINE_FALLBACK and says so in health."""
        bad = tmp_path / "bad"
        shutil.copytree(DEFAULT_MODEL_DIR, bad)
        (bad / "manifest.json").write_text("{not json")
        with running_server(tmp_path, model_dir=str(bad)) as (_, client):
            assert client.health() == "SERVING"
            assert client.health("bwpredd.model") == "NOT_SERVING"
            ids = fill(client, 1)
            fc = client.forecast(ids)[0]
            assert fc.source == pb.FORECAST_SOURCE_BASELINE_FALLBACK and fc.model_version == ""

    def test_require_model_exits_nonzero(self, tmp_path: Path) -> None:
        """With --require-model a bad model directory stops start-up with exit 3."""
        with daemon_process(
            ["--require-model", "--model-dir", str(tmp_path / "none")],
            env={"BWPREDD_LISTEN": f"unix:{tmp_path}/r/d.sock"},
        ) as proc:
            out = proc.communicate(timeout=30)[0].decode()
        assert proc.returncode == 3
        assert "manifest.json" in out


def _manifest(model_dir: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((model_dir / "manifest.json").read_text())
    return doc


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# Manifests that broke the daemon (issue 14, item 7), as (name, edit of the
# decoded manifest or raw text replacing it, the field the error must name).
MALFORMED: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("opset-string", lambda m: m.update(opset="x"), "opset"),
    ("opset-null", lambda m: m.update(opset=None), "opset"),
    ("opset-huge-float", lambda m: m.update(opset=1e300), "opset"),
    ("nul-in-file-name", lambda m: m["forecaster"].update(file="fore\0caster.onnx"), "file"),
    ("interval-string", lambda m: m["interval"].update(low_quantile="0.1"), "interval"),
    ("interval-extra-string", lambda m: m["interval"].update(horizon="x"), "interval"),
    ("interval-null", lambda m: m.update(interval=None), "interval"),
    ("defaults-bool", lambda m: m["feature_defaults"].update(latency_ms=True), "latency_ms"),
    ("defaults-loss-above-1", lambda m: m["feature_defaults"].update(packet_loss=5), "packet_loss"),
    ("shape-bool", lambda m: m["allocator"]["inputs"][0].update(shape=[None, True]), "shape"),
    ("versions-list", lambda m: m["versions"].update(torch=[1]), "versions"),
    ("units-number", lambda m: m["units"].update(latency_ms=3), "units"),
    ("version-newline", lambda m: m.update(version="v1\nforged"), "version"),
    ("deep-nesting", lambda m: _deep(200_000), "manifest.json"),
    ("huge-integer", lambda m: '{"format": ' + "9" * 5000 + "}", "manifest.json"),
    ("not-an-object", lambda m: "[1, 2]", "manifest"),
]


def _write_malformed(model_dir: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    doc = _manifest(model_dir)
    raw = edit(doc)
    text = raw if isinstance(raw, str) else json.dumps(doc)
    (model_dir / "manifest.json").write_text(text)


class TestMalformedManifest:
    """A malformed manifest is a refused load, never a crash (issue 14, item 7)."""

    def test_reload_refused_old_model_serves(self, tmp_path: Path) -> None:
        """Each malformed manifest fails the reload; the old model keeps serving MODEL."""
        model_dir = tmp_path / "model"
        shutil.copytree(DEFAULT_MODEL_DIR, model_dir)
        good = (model_dir / "manifest.json").read_text()
        with running_server(tmp_path, model_dir=str(model_dir)) as (server, client):
            ids = fill(client, 1)
            old = client.forecast(ids)[0].model_version
            for name, edit, _ in MALFORMED:
                _write_malformed(model_dir, edit)
                assert not reload(server), name
                fc = client.forecast(ids)[0]
                assert (fc.model_version, fc.source) == (old, MODEL), name
                (model_dir / "manifest.json").write_text(good)
            assert reload(server)

    @pytest.mark.parametrize(("name", "edit", "field"), MALFORMED, ids=[m[0] for m in MALFORMED])
    def test_startup_error_names_the_field(
        self, tmp_path: Path, name: str, edit: Callable[[dict[str, Any]], Any], field: str
    ) -> None:
        """At start-up with require_model the error names the field; without
        it the daemon serves baselines."""
        model_dir = tmp_path / "model"
        shutil.copytree(DEFAULT_MODEL_DIR, model_dir)
        _write_malformed(model_dir, edit)
        with (
            pytest.raises(StartupError, match=f"^model: .*{field}"),
            running_server(tmp_path, model_dir=str(model_dir), require_model=True),
        ):
            pass
        with running_server(tmp_path, model_dir=str(model_dir)) as (_, client):
            assert client.health("bwpredd.model") == "NOT_SERVING"
            fc = client.forecast(fill(client, 1))[0]
            assert fc.source == pb.FORECAST_SOURCE_BASELINE_FALLBACK

    def test_sighup_with_bad_manifest_keeps_daemon(self, tmp_path: Path) -> None:
        """As a process: SIGHUP with "opset": "x" is a failed reload (systemd
        hears so) and the old model keeps serving; a restart with that
        manifest still starts, on baselines."""
        model_dir = tmp_path / "model"
        shutil.copytree(DEFAULT_MODEL_DIR, model_dir)
        notify = NotifySocket(str(tmp_path / "notify.sock"))
        env = {
            "BWPREDD_LISTEN": f"unix:{tmp_path}/h/d.sock",
            "BWPREDD_MODEL_DIR": str(model_dir),
            "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
        }
        try:
            with daemon_process([], env=env) as proc:
                notify.wait_for("READY=1", 30)
                client = wait_for_health(env["BWPREDD_LISTEN"])
                ids = fill(client, 1)
                old = client.forecast(ids)[0].model_version
                _write_malformed(model_dir, lambda m: m.update(opset="x"))
                proc.send_signal(signal.SIGHUP)
                notify.wait_for("RELOADING=1", 30)
                lines = notify.wait_for("READY=1", 30)
                status = f"STATUS=reload failed; serving on {env['BWPREDD_LISTEN']}, model {old}"
                assert status in lines
                assert proc.poll() is None
                assert client.forecast(ids)[0].model_version == old
                client.close()
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=30) == 0
            with daemon_process([], env=env):
                client = wait_for_health(env["BWPREDD_LISTEN"])
                assert client.health("bwpredd.model") == "NOT_SERVING"
                client.close()
        finally:
            notify.close()
