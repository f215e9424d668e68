"""Model reloads: atomic swap under load, failed reloads, start-up refusal."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

from bwpredd.client import Client, channel_for, pb
from bwpredd.engine import DEFAULT_MODEL_DIR
from bwpredd.server import Server
from tests.conftest_models import make_model_dir
from tests.helpers import daemon_process, running_server, sample

MODEL = pb.FORECAST_SOURCE_MODEL


def reload(server: Server) -> bool:
    """Run Server.reload on its loop from the test thread."""
    loop = server._wake._loop  # type: ignore[union-attr]
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
