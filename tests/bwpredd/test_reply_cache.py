"""The reply cache of Forecast and Allocate: a repeated request is answered
from the reply built the last time, and only while nothing behind it changed."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from bwpredd import answers as answers_mod
from bwpredd._proto.bwpred.v1 import bwpred_pb2 as pb
from bwpredd.answers import REPLY_CACHE_PEERS, Replies
from bwpredd.config import Config
from bwpredd.core import Core
from bwpredd.engine import Engine
from bwpredd.metrics import Metrics
from bwpredd.modeldir import DEFAULT_MODEL_DIR, load_model
from bwpredd.servicer import extract_batch
from tests.helpers import running_server, sample

MODEL = pb.FORECAST_SOURCE_MODEL


def _fill(client: object, peer: str, base: float = 50.0) -> None:
    client.push([sample(peer, base + i) for i in range(10)])  # type: ignore[attr-defined]


def _metric(server: object, name: str, labels: dict[str, str]) -> float:
    return server.registry.get_sample_value(name, labels) or 0.0  # type: ignore[attr-defined]


class TestServed:
    """Through a real server."""

    def test_repeat_is_identical_until_a_sample(self, tmp_path: Path) -> None:
        """The same request gets the same reply; a new sample for the peer
        makes the next reply a fresh forecast of the new window."""
        with running_server(tmp_path) as (_, client):
            _fill(client, "a")
            first = client.forecast(["a"])[0]
            assert client.forecast(["a"])[0] == first
            client.push([sample("a", 500.0)])
            fresh = client.forecast(["a"])[0]
            assert fresh.source == MODEL
            assert fresh.bandwidth_mbps != first.bandwidth_mbps
            alloc = client.allocate(["a"])[0]
            assert client.allocate(["a"])[0] == alloc
            client.push([sample("a", 5000.0)])
            assert client.allocate(["a"])[0].reference_capacity_mbps != (
                alloc.reference_capacity_mbps
            )

    def test_other_peers_samples_keep_the_reply(self, tmp_path: Path) -> None:
        """Samples for other peers do not retire a peer's reply."""
        with running_server(tmp_path) as (server, client):
            _fill(client, "a")
            _fill(client, "b")
            client.forecast(["a"])
            assert server.core is not None
            stamp = server.core.stamp(["a"])
            client.push([sample("b", 99.0)])
            assert server.core.unchanged(stamp)
            client.push([sample("a", 99.0)])
            assert not server.core.unchanged(stamp)

    def test_model_swap_retires_replies(self, tmp_path: Path) -> None:
        """After the model is swapped out, the repeated request is answered by
        the baseline, with the new (empty) model version."""
        with running_server(tmp_path) as (server, client):
            _fill(client, "a")
            before = client.forecast(["a"])[0]
            assert before.source == MODEL and before.model_version
            assert server.core is not None
            server.core.swap_model(None)
            after = client.forecast(["a"])[0]
            assert after.source != MODEL and after.model_version == ""

    def test_evicted_peer_is_not_found(self, tmp_path: Path) -> None:
        """A peer evicted since its reply was cached is NOT_FOUND, not answered
        from the cache (its slot now holds someone else)."""
        with running_server(tmp_path, max_peers=2) as (_, client):
            _fill(client, "a")
            client.forecast(["a"])
            _fill(client, "b")
            _fill(client, "c")  # evicts a, the least recently used
            with pytest.raises(grpc.RpcError) as err:
                client.forecast(["a"])
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

    def test_cached_replies_are_counted(self, tmp_path: Path) -> None:
        """Every reply counts in the RPC and forecast metrics, cached or not;
        allocations are not forecasts served."""
        with running_server(tmp_path) as (server, client):
            _fill(client, "a")
            for _ in range(3):
                client.forecast(["a"])
                client.allocate(["a"])
            served = _metric(server, "bwpredd_forecasts_total", {"source": "model"})
            handled = _metric(
                server,
                "grpc_server_handled_total",
                {
                    "grpc_service": "bwpred.v1.BandwidthPredictorService",
                    "grpc_method": "Allocate",
                    "grpc_type": "unary",
                    "grpc_code": "OK",
                },
            )
        assert served == 3
        assert handled == 3


def _core(max_peers: int = 100) -> Core:
    return Core(
        Config(max_peers=max_peers),
        Engine(load_model(DEFAULT_MODEL_DIR, 1)),
        Metrics(CollectorRegistry()),
    )


def _push(core: Core, peer: str, bw: float, n: int = 1) -> None:
    request = pb.PushSamplesRequest(samples=[sample(peer, bw + i) for i in range(n)])
    assert core.ingest(extract_batch(request.samples)).accepted == n


class TestReplies:
    """The cache itself: what it keeps, and for how long."""

    def test_large_requests_not_kept(self) -> None:
        """Requests of more than REPLY_CACHE_PEERS peers are not kept."""
        core = _core()
        ids = [f"p{i}" for i in range(REPLY_CACHE_PEERS + 1)]
        for p in ids:
            _push(core, p, 10.0, 10)
        replies = Replies(core)
        source = np.full(len(ids), MODEL, dtype=np.int8)
        replies.put(tuple(ids), object(), source)
        assert replies.get(tuple(ids)) is None
        small = tuple(ids[:REPLY_CACHE_PEERS])
        replies.put(small, "reply", source[: len(small)])
        hit = replies.get(small)
        assert hit is not None and hit.message == "reply"
        assert hit.served == [(MODEL, len(small))] and hit.sources == {"MODEL": len(small)}

    def test_bounded(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """At most REPLY_CACHE_ENTRIES replies are held."""
        monkeypatch.setattr(answers_mod, "REPLY_CACHE_ENTRIES", 3)
        core = _core()
        replies = Replies(core)
        for i in range(10):
            _push(core, f"p{i}", 10.0)
            replies.put((f"p{i}",), i, np.array([MODEL], dtype=np.int8))
            assert len(replies._entries) <= 3
        hit = replies.get(("p9",))
        assert hit is not None and hit.message == 9

    def test_reset_retires(self) -> None:
        """An evicted slot's version moves, so a stamp taken before fails."""
        core = _core(max_peers=1)
        _push(core, "a", 10.0)
        stamp = core.stamp(["a"])
        _push(core, "b", 10.0)  # evicts a and reuses its slot
        assert not core.unchanged(stamp)
