"""Cached answers against every way a peer's window can change or disappear.

Forecast and Allocate answers are cached per peer (and small replies per
request) until the window behind them changes. Each test here changes a
window one way (a sample, LRU eviction, idle expiry, a snapshot restore, a
model reload) and checks, through a real server, that the next answer is the
one computed afresh from the window the daemon now holds: NOT_FOUND for a
peer that is gone, and the new window's forecast for a peer that came back.

Eager answers (:mod:`bwpredd.eager`) write the same cache from a callback
the event loop runs right after the ingesting call: :class:`TestEagerPending`
makes each of those changes between a sample and that callback, and the
differential test runs with eager answers on and off.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest

from bwpredd.client import Client, pb
from bwpredd.engine import Engine
from bwpredd.modeldir import DEFAULT_MODEL_DIR, load_model
from bwpredd.server import Server
from bwpredd.servicer import extract_batch
from bwpredd.state import step_seconds
from tests.bwpredd.test_reload import reload
from tests.conftest_models import make_model_dir
from tests.helpers import running_server, sample

MODEL = pb.FORECAST_SOURCE_MODEL
COLD = pb.FORECAST_SOURCE_BASELINE_COLD_START
T = TypeVar("T")


def on_loop(server: Server, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the server's event loop (the only thread that may touch
    the windows) and return its result."""
    loop = server.loop
    assert loop is not None

    async def call() -> T:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), loop).result(timeout=30)


def not_found(call: Callable[[], Any]) -> bool:
    try:
        call()
    except grpc.RpcError as exc:
        return bool(exc.code() == grpc.StatusCode.NOT_FOUND)
    return False


class Reference:
    """The answers computed afresh, without any cache, from the window that
    GetPeer shows: what Forecast and Allocate must say."""

    def __init__(self, model_dir: Path = DEFAULT_MODEL_DIR) -> None:
        self.engine = Engine(load_model(model_dir, 1))

    def _window(self, peer: pb.Peer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = [[s.latency_ms, s.bandwidth_mbps, s.packet_loss, s.reliability] for s in peer.window]
        ts = [s.timestamp.seconds + s.timestamp.nanos * 1e-9 for s in peer.window]
        n = len(rows)
        window = np.zeros((1, 10, 4), dtype=np.float32)
        window[0, 10 - n :] = rows
        stamps = np.zeros((1, 10), dtype=np.float64)
        stamps[0, 10 - n :] = ts
        return window, np.array([n], dtype=np.int64), stamps

    def forecast(self, peer: pb.Peer) -> tuple[float, float, float, int]:
        window, counts, _ = self._window(peer)
        fc = self.engine.forecast(window, counts)
        return float(fc.point[0]), float(fc.low[0]), float(fc.high[0]), int(fc.source[0])

    def allocate(self, peer: pb.Peer) -> tuple[int, float]:
        window, counts, stamps = self._window(peer)
        fc = self.engine.forecast(window, counts)
        al = self.engine.allocate(window, counts, fc, step_seconds(stamps, counts))
        return int(al.action[0]), float(al.capacity[0])


def assert_current(client: Client, ref: Reference, peer_id: str) -> None:
    """Forecast and Allocate of ``peer_id`` equal the answers computed afresh
    from its window now."""
    peer = client.peer(peer_id)
    fc = client.forecast([peer_id])[0]
    point, low, high, source = ref.forecast(peer)
    assert fc.samples_in_window == peer.samples_in_window
    assert fc.source == source
    np.testing.assert_allclose(
        [fc.bandwidth_mbps, fc.low_mbps, fc.high_mbps], [point, low, high], rtol=1e-5
    )
    al = client.allocate([peer_id])[0]
    action, capacity = ref.allocate(peer)
    assert al.action == action
    np.testing.assert_allclose(al.reference_capacity_mbps, capacity, rtol=1e-5)


def eager_idle(server: Server) -> None:
    """Let the event loop run the eager callbacks due (nothing queued)."""
    core = server.core
    assert core is not None and core.eager is not None
    eager = core.eager
    deadline = time.monotonic() + 30
    while on_loop(server, lambda: eager.pending):
        assert time.monotonic() < deadline, "eager answers never ran"
        time.sleep(0.005)


def eager_count(server: Server, outcome: str) -> float:
    value = server.registry.get_sample_value("bwpredd_eager_answers_total", {"outcome": outcome})
    return value or 0.0


def ingest(server: Server, *samples: pb.Sample) -> None:
    """Ingest on the event loop, as PushSamples does (for a callback that
    changes something else before the eager callback runs)."""
    assert server.core is not None
    assert server.core.ingest(extract_batch(samples)).accepted == len(samples)


def fill(client: Client, peer: str, level: float, n: int = 10) -> None:
    resp = client.push([sample(peer, level * (1 + 0.01 * i), latency_ms=5.0) for i in range(n)])
    assert resp.accepted == n


class TestRemoval:
    """A peer that is gone is NOT_FOUND, and one that came back is answered
    from its new window, never from what was cached for its old one."""

    def test_idle_expiry(self, tmp_path: Path) -> None:
        """Expired peers are NOT_FOUND on Forecast and Allocate; one that
        returns (into another peer's old slot) is answered from its 3 new
        samples, not its old 10."""
        with running_server(tmp_path, idle_expiry_s=1.0) as (server, client):
            ref = Reference()
            for p in ("a", "b", "c"):
                fill(client, p, 100.0)
            before_fc = client.forecast(["a"])[0]
            before_al = client.allocate(["a"])[0]
            assert before_fc.source == MODEL and before_fc.samples_in_window == 10
            assert server.core is not None
            core = server.core
            assert on_loop(server, core.expire_idle) == 0
            time.sleep(1.2)
            assert on_loop(server, core.expire_idle) == 3
            assert not_found(lambda: client.peer("a"))
            assert not_found(lambda: client.forecast(["a"]))
            assert not_found(lambda: client.allocate(["a"]))
            client.push([sample("a", 9000.0, latency_ms=5.0) for _ in range(3)])
            fc = client.forecast(["a"])[0]
            assert fc.samples_in_window == 3 and fc.source == COLD
            assert fc.bandwidth_mbps == pytest.approx(9000.0)
            al = client.allocate(["a"])[0]
            assert al.reference_capacity_mbps == pytest.approx(9000.0)
            assert al.reference_capacity_mbps != before_al.reference_capacity_mbps
            assert_current(client, ref, "a")

    def test_lru_eviction(self, tmp_path: Path) -> None:
        """LRU eviction frees slots in bulk (capacity / 256 at a time): every
        evicted peer is NOT_FOUND, including one whose slot nobody took."""
        with running_server(tmp_path, max_peers=512) as (_, client):
            ref = Reference()
            fill(client, "old-a", 100.0)
            fill(client, "old-b", 200.0)
            assert client.forecast(["old-a"])[0].samples_in_window == 10
            assert client.forecast(["old-b"])[0].samples_in_window == 10
            client.allocate(["old-a"])
            client.allocate(["old-b"])
            client.push([sample(f"p{i}", 50.0) for i in range(510)])
            client.push([sample("new", 50.0)])  # evicts old-a and old-b
            for p in ("old-a", "old-b"):
                assert not_found(lambda p=p: client.peer(p))  # type: ignore[misc]
                assert not_found(lambda p=p: client.forecast([p]))  # type: ignore[misc]
                assert not_found(lambda p=p: client.allocate([p]))  # type: ignore[misc]
            client.push([sample("old-b", 9000.0) for _ in range(3)])
            fc = client.forecast(["old-b"])[0]
            assert fc.samples_in_window == 3 and fc.bandwidth_mbps == pytest.approx(9000.0)
            assert_current(client, ref, "old-b")


class TestChange:
    """A window that changes in place gets a fresh answer."""

    def test_sample(self, tmp_path: Path) -> None:
        """A new sample retires the cached answer of that peer."""
        with running_server(tmp_path) as (_, client):
            ref = Reference()
            fill(client, "a", 100.0)
            assert_current(client, ref, "a")
            client.push([sample("a", 3000.0, latency_ms=50.0)])
            assert_current(client, ref, "a")

    def test_restore(self, tmp_path: Path) -> None:
        """Restoring a snapshot into a live store retires every cached answer:
        the restored window is answered, not the one it replaced."""
        with running_server(tmp_path) as (server, client):
            ref = Reference()
            fill(client, "a", 100.0)
            assert server.core is not None
            store = server.core.store
            snap = on_loop(server, store.snapshot)
            fill(client, "a", 5000.0)
            late = client.forecast(["a"])[0]
            client.allocate(["a"])
            restored = on_loop(server, lambda: store.restore(snap, time.time(), 3600.0))
            assert restored == 1
            fc = client.forecast(["a"])[0]
            assert fc.bandwidth_mbps != late.bandwidth_mbps
            assert fc.bandwidth_mbps < 1000.0
            assert_current(client, ref, "a")

    def test_reload(self, tmp_path: Path) -> None:
        """A reloaded model answers every peer, cached or not."""
        model_dir = make_model_dir(tmp_path / "model", version="v1", seed=1)
        with running_server(tmp_path, model_dir=str(model_dir)) as (server, client):
            fill(client, "a", 100.0)
            assert_current(client, Reference(model_dir), "a")
            make_model_dir(model_dir, version="v2", seed=2, forecast_scale=3.0)
            loop = server.loop
            assert loop is not None
            assert asyncio.run_coroutine_threadsafe(server.reload(), loop).result(timeout=60)
            assert client.forecast(["a"])[0].model_version == "v2"
            assert client.allocate(["a"])[0].model_version == "v2"
            assert_current(client, Reference(model_dir), "a")


class TestDifferential:
    """A random mix of samples, evictions, Forecast and Allocate: every answer
    equals the one computed afresh from the window GetPeer shows."""

    @pytest.mark.parametrize("eager", [True, False], ids=["eager", "plain"])
    def test_random_operations(self, tmp_path: Path, eager: bool) -> None:
        """300 random operations over 12 peer ids on a 6-peer table; with
        eager answers, questions come right after the samples and after the
        eager computation has run, and eager answers are among those
        checked."""
        rng = np.random.default_rng(7)
        ids = [f"peer-{i}" for i in range(12)]
        now = int(time.time()) - 3000
        settings = {"max_peers": 6, "guardrail": False, "eager_answers": eager}
        with running_server(tmp_path, **settings) as (server, client):
            ref = Reference()
            for _ in range(300):
                op = rng.integers(3)
                chosen = [str(p) for p in rng.choice(ids, size=rng.integers(1, 4), replace=False)]
                if op == 0:
                    level = float(10 ** rng.uniform(0, 4))
                    batch = []
                    for p in chosen:
                        for _ in range(int(rng.integers(1, 12))):
                            now += 1
                            s = sample(p, level * float(rng.uniform(0.5, 1.5)), latency_ms=5.0)
                            s.timestamp.seconds = now
                            batch.append(s)
                    assert client.push(batch).accepted == len(batch)
                    if eager and rng.integers(2):
                        eager_idle(server)  # the next question finds it stored
                    continue
                tracked = {p.peer_id for p in client.peers()}
                call = client.forecast if op == 1 else client.allocate
                if not set(chosen) <= tracked:
                    assert not_found(lambda call=call, c=chosen: call(c))  # type: ignore[misc]
                    continue
                answers = call(chosen)
                for p, got in zip(chosen, answers, strict=True):
                    peer = client.peer(p)
                    if op == 1:
                        point, low, high, source = ref.forecast(peer)
                        assert got.source == source
                        np.testing.assert_allclose(
                            [got.bandwidth_mbps, got.low_mbps, got.high_mbps],
                            [point, low, high],
                            rtol=1e-5,
                        )
                    else:
                        action, capacity = ref.allocate(peer)
                        assert got.action == action
                        np.testing.assert_allclose(got.reference_capacity_mbps, capacity, rtol=1e-5)
            computed = eager_count(server, "computed")
            assert (computed >= 5) if eager else (computed == 0)


class TestEagerPending:
    """Each way a window changes, made on the event loop between a peer's
    sample and the eager callback that follows it: the answer served is the
    one computed afresh from the window the daemon holds."""

    def test_sample(self, tmp_path: Path) -> None:
        """A second sample before the callback: the peer is computed once,
        for the newest window."""
        with running_server(tmp_path) as (server, client):
            ref = Reference()
            fill(client, "a", 100.0)
            client.forecast(["a"])  # interest
            on_loop(
                server,
                lambda: (
                    ingest(server, sample("a", 400.0, latency_ms=5.0)),
                    ingest(server, sample("a", 3000.0, latency_ms=50.0)),
                ),
            )
            eager_idle(server)
            assert eager_count(server, "computed") == 1
            assert_current(client, ref, "a")

    def test_lru_eviction(self, tmp_path: Path) -> None:
        """The peer is evicted (and its slot given to another) before the
        callback: it is skipped, the peer is NOT_FOUND, the slot's new peer
        is answered from its own window, the returning peer from its new
        one."""
        with running_server(tmp_path, max_peers=512) as (server, client):
            ref = Reference()
            fill(client, "old-a", 100.0)
            fill(client, "old-b", 200.0)
            client.allocate(["old-a"])  # interest, allocation included
            others = [sample(f"p{i}", 50.0) for i in range(510)]
            on_loop(
                server,
                lambda: (
                    ingest(server, sample("old-a", 150.0, latency_ms=5.0)),
                    ingest(server, *others),
                    ingest(server, *[sample("new", 7000.0) for _ in range(10)]),  # evicts old-a
                ),
            )
            eager_idle(server)
            assert eager_count(server, "skipped") == 1 and eager_count(server, "computed") == 0
            assert not_found(lambda: client.forecast(["old-a"]))
            assert not_found(lambda: client.allocate(["old-a"]))
            assert_current(client, ref, "new")
            client.push([sample("old-a", 9000.0) for _ in range(3)])
            fc = client.forecast(["old-a"])[0]
            assert fc.samples_in_window == 3 and fc.bandwidth_mbps == pytest.approx(9000.0)
            assert_current(client, ref, "old-a")

    def test_idle_expiry(self, tmp_path: Path) -> None:
        """The peer expires before the callback: skipped, NOT_FOUND, then
        answered from its new window when it returns."""
        with running_server(tmp_path, idle_expiry_s=1.0) as (server, client):
            ref = Reference()
            fill(client, "a", 100.0)
            client.forecast(["a"])
            assert server.core is not None
            store = server.core.store
            on_loop(
                server,
                lambda: (
                    ingest(server, sample("a", 120.0, latency_ms=5.0)),
                    store.expire_idle(time.time() + 60.0, 1.0),
                ),
            )
            eager_idle(server)
            assert eager_count(server, "skipped") == 1 and eager_count(server, "computed") == 0
            assert not_found(lambda: client.forecast(["a"]))
            client.push([sample("a", 9000.0, latency_ms=5.0) for _ in range(3)])
            assert client.forecast(["a"])[0].bandwidth_mbps == pytest.approx(9000.0)
            assert_current(client, ref, "a")

    def test_restore(self, tmp_path: Path) -> None:
        """A snapshot restored before the callback: skipped; the restored
        window is answered, not the one the sample made."""
        with running_server(tmp_path) as (server, client):
            ref = Reference()
            fill(client, "a", 100.0)
            assert server.core is not None
            store = server.core.store
            snap = on_loop(server, store.snapshot)
            client.forecast(["a"])
            on_loop(
                server,
                lambda: (
                    ingest(server, *[sample("a", 5000.0, latency_ms=5.0) for _ in range(10)]),
                    store.restore(snap, time.time(), 3600.0),
                ),
            )
            eager_idle(server)
            assert eager_count(server, "skipped") == 1 and eager_count(server, "computed") == 0
            assert client.forecast(["a"])[0].bandwidth_mbps < 1000.0
            assert_current(client, ref, "a")

    def test_reload(self, tmp_path: Path) -> None:
        """A model swapped in between the sample and the callback: the new
        model computes, and answers."""
        model_dir = make_model_dir(tmp_path / "model", version="v1", seed=1)
        with running_server(tmp_path, model_dir=str(model_dir)) as (server, client):
            fill(client, "a", 100.0)
            client.allocate(["a"])
            make_model_dir(model_dir, version="v2", seed=2, forecast_scale=3.0)
            v2 = load_model(model_dir, 1)
            assert server.core is not None
            core = server.core
            on_loop(
                server,
                lambda: (ingest(server, sample("a", 130.0, latency_ms=5.0)), core.swap_model(v2)),
            )
            eager_idle(server)
            assert eager_count(server, "computed") == 1
            assert client.forecast(["a"])[0].model_version == "v2"
            assert client.allocate(["a"])[0].model_version == "v2"
            assert_current(client, Reference(model_dir), "a")

    def test_question_first(self, tmp_path: Path) -> None:
        """A question answered before the callback runs computes inline;
        the callback then has nothing to compute and changes nothing."""
        with running_server(tmp_path) as (server, client):
            ref = Reference()
            fill(client, "a", 100.0)
            client.allocate(["a"])
            assert server.core is not None
            core = server.core

            def sample_then_ask() -> tuple[float, float]:
                ingest(server, sample("a", 700.0, latency_ms=5.0))
                al = core.allocate(["a"])
                return float(al.forecasts.point[0]), float(al.capacity[0])

            asked = on_loop(server, sample_then_ask)
            eager_idle(server)
            assert eager_count(server, "skipped") == 1 and eager_count(server, "computed") == 0
            fc = client.forecast(["a"])[0]
            assert (fc.bandwidth_mbps, client.allocate(["a"])[0].reference_capacity_mbps) == (
                pytest.approx(asked[0]),
                pytest.approx(asked[1]),
            )
            assert_current(client, ref, "a")


def fresh(server: Server, ids: list[str], horizon_s: float = 0.0) -> dict[str, Any]:
    """What Forecast (with ``horizon_s``, 0: the next step) and Allocate must
    say of ``ids`` now, computed on the daemon's loop from its windows, its
    guardrail mask and its model, without any cache."""
    core = server.core
    assert core is not None

    def compute() -> dict[str, Any]:
        store, engine = core.store, core.engine
        slots = np.array([store.slot(p) for p in ids], dtype=np.int64)
        windows, counts = store.gather(slots)
        fc = engine.forecast(windows, counts, core.scores.fallback_mask(slots))
        al = engine.allocate(windows, counts, fc, store.step_s(slots))
        out = {
            "point": fc.point.copy(),
            "low": fc.low.copy(),
            "high": fc.high.copy(),
            "source": fc.source.copy(),
            "covered": np.zeros(len(ids)),
            "action": al.action,
            "capacity": al.capacity,
            "version": fc.model_version,
        }
        full = np.flatnonzero(counts >= windows.shape[1])
        curves = engine.horizon_curves(windows[full], store.step_s(slots[full]))
        if horizon_s and full.size and curves is not None:
            out["point"][full], out["low"][full], out["high"][full] = curves.at(horizon_s)
            out["source"][full] = MODEL
            out["covered"][full] = horizon_s
        return out

    return on_loop(server, compute)


class TestEveryInput:
    """Inputs the tests above leave out: the guardrail switching a peer to
    the baseline, model swaps between a model with horizons and one without,
    Forecast with horizon_seconds, Advise, rejected samples, requests naming
    peers in any order."""

    @pytest.mark.parametrize("eager", [True, False], ids=["eager", "plain"])
    def test_random_operations(self, tmp_path: Path, eager: bool) -> None:
        """300 random operations over 8 peer ids on a 7-peer table, under a
        model that forecasts 5x too high or one 5x too low (so the guardrail
        switches peers to the baseline after 2 scored steps), the first with
        horizons, the second without: samples (some rejected), Forecast
        with and without horizon_seconds, Allocate, Advise, model swaps,
        snapshots restored. Every answer equals the one computed without any
        cache from the daemon's state at that moment."""
        wrong = make_model_dir(
            tmp_path / "wrong", version="wrong", forecast_scale=5.0, horizon=True
        )
        low = make_model_dir(tmp_path / "low", version="low", seed=2, forecast_scale=0.2)
        models = [load_model(wrong, 1), load_model(low, 1)]
        rng = np.random.default_rng(11)
        ids = [f"peer-{i}" for i in range(8)]
        levels = {p: float(10 ** rng.uniform(0, 4)) for p in ids}
        now = int(time.time()) - 3000
        served: list[int] = []
        settings = {"max_peers": 7, "guardrail_steps": 2, "eager_answers": eager}
        with running_server(tmp_path, model_dir=str(wrong), **settings) as (server, client):
            core = server.core
            assert core is not None
            store = core.store
            snap = None
            for _ in range(300):
                op = int(rng.choice(8, p=[0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05, 0.05]))
                chosen = [str(p) for p in rng.choice(ids, size=rng.integers(1, 4), replace=False)]
                if op == 0:
                    batch = []
                    for p in chosen:
                        for _ in range(int(rng.integers(1, 5))):
                            now += 1
                            bw = levels[p] * float(rng.uniform(0.8, 1.2))
                            s = sample(p, bw, latency_ms=float(rng.uniform(1, 50)))
                            s.timestamp.seconds = now
                            batch.append(s)
                    accepted = len(batch)
                    if rng.integers(4) == 0:  # out of order: rejected
                        late = sample(chosen[0], 1.0)
                        late.timestamp.seconds = now - 2000
                        batch.append(late)
                    assert client.push(batch).accepted == accepted
                    if eager and rng.integers(2):
                        eager_idle(server)
                    continue
                if op == 5:
                    model = models[int(rng.integers(2))]
                    on_loop(server, lambda m=model: core.swap_model(m))  # type: ignore[misc]
                    continue
                if op == 6:
                    if snap is None or rng.integers(2):
                        snap = on_loop(server, store.snapshot)
                    else:
                        on_loop(server, lambda s=snap: store.restore(s, time.time(), 1e9))  # type: ignore[misc]
                    continue
                if not set(chosen) <= set(on_loop(server, store.peer_ids)):
                    assert not_found(lambda c=chosen: client.forecast(c))  # type: ignore[misc]
                    continue
                if op in (1, 3):
                    horizon = float(rng.choice([0.5, 7.0, 100.0])) if op == 3 else 0.0
                    got = client.forecast(chosen, horizon_seconds=horizon)
                    want = fresh(server, chosen, horizon)
                    for i, fc in enumerate(got):
                        assert fc.peer_id == chosen[i]
                        assert fc.source == want["source"][i]
                        assert fc.horizon_seconds == want["covered"][i]
                        assert fc.model_version == want["version"]
                        np.testing.assert_allclose(
                            [fc.bandwidth_mbps, fc.low_mbps, fc.high_mbps],
                            [want["point"][i], want["low"][i], want["high"][i]],
                            rtol=1e-5,
                        )
                        served.append(fc.source)
                elif op in (2, 4):
                    allocations = client.allocate(chosen)
                    want = fresh(server, chosen)
                    for i, al in enumerate(allocations):
                        assert al.peer_id == chosen[i]
                        assert (al.source, al.action) == (want["source"][i], want["action"][i])
                        assert al.model_version == want["version"]
                        np.testing.assert_allclose(
                            al.reference_capacity_mbps, want["capacity"][i], rtol=1e-5
                        )
                else:
                    req = pb.AdviseRequest(peer_id=chosen[0], payload_bytes=10**7)
                    advice = client.stub.Advise(req, timeout=10).advice
                    want = fresh(server, chosen[:1])
                    assert advice.forecast.source == want["source"][0]
                    np.testing.assert_allclose(
                        advice.forecast.bandwidth_mbps, want["point"][0], rtol=1e-5
                    )
            assert pb.FORECAST_SOURCE_BASELINE_FALLBACK in served
            computed = eager_count(server, "computed")
            assert (computed >= 5) if eager else (computed == 0)

    def test_rejected_samples_keep_answers(self, tmp_path: Path) -> None:
        """Samples rejected (out of order, out of range) change no answer:
        the cached replies stay current and no eager answer is computed."""
        with running_server(tmp_path) as (server, client):
            t0 = int(time.time()) - 100
            batch = []
            for i in range(10):
                s = sample("a", 100.0 + i, latency_ms=5.0)
                s.timestamp.seconds = t0 + i
                batch.append(s)
            client.push(batch)
            fc, al = client.forecast(["a"]), client.allocate(["a"])
            core = server.core
            assert core is not None
            stamp = on_loop(server, lambda: core.stamp(["a"]))
            late = sample("a", 9000.0)
            late.timestamp.seconds = t0
            resp = client.push([late, sample("a", -5.0)])
            assert (resp.accepted, resp.rejected) == (0, 2)
            eager_idle(server)
            assert on_loop(server, lambda: core.unchanged(stamp))
            assert eager_count(server, "computed") == eager_count(server, "skipped") == 0
            assert (client.forecast(["a"]), client.allocate(["a"])) == (fc, al)
            assert_current(client, Reference(), "a")

    def test_reload_without_horizons_and_back(self, tmp_path: Path) -> None:
        """A Forecast with horizon_seconds follows the reloaded model: a
        directory without horizons answers the next step (horizon 0, the
        plain Forecast's answer), one with other horizon weights answers
        from them."""
        model_dir = make_model_dir(tmp_path / "model", version="h1", seed=1, horizon=True)
        with running_server(tmp_path, model_dir=str(model_dir)) as (server, client):
            fill(client, "a", 200.0)
            plain = client.forecast(["a"])[0]
            first = client.forecast(["a"], horizon_seconds=30.0)[0]
            assert first.horizon_seconds == 30.0
            assert client.forecast(["a"])[0] == plain
            make_model_dir(model_dir, version="none", seed=1)
            assert reload(server)
            now = client.forecast(["a"], horizon_seconds=30.0)[0]
            assert (now.horizon_seconds, now.model_version) == (0.0, "none")
            assert now == client.forecast(["a"])[0]
            make_model_dir(model_dir, version="h2", seed=5, horizon=True)
            assert reload(server)
            last = client.forecast(["a"], horizon_seconds=30.0)[0]
            assert (last.horizon_seconds, last.model_version) == (30.0, "h2")
            assert last.bandwidth_mbps != first.bandwidth_mbps
