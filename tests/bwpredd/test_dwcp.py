"""Advise, RankPeers and WatchForecasts through a real server."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from bwpredd.client import Client, pb
from tests.helpers import running_server, sample


def fill(client: Client, peer: str, bw: float, latency: float, n: int = 10) -> None:
    client.push([sample(peer, bw * (1 + 0.01 * (i % 3)), latency_ms=latency) for i in range(n)])


def advise(client: Client, peer: str, size: int, kind: int = pb.DATA_KIND_MEMORY) -> pb.Advice:
    req = pb.AdviseRequest(peer_id=peer, payload_bytes=size, data_kind=kind)
    return client.stub.Advise(req, timeout=10).advice


class TestAdvise:
    """Transfer advice for DWCP."""

    def test_modes_times_streams(self, tmp_path: Path) -> None:
        """A datacenter-like and an internet-like peer get the right modes; time
        scales with payload over bandwidth; the larger BDP gets more streams or buffer."""
        with running_server(tmp_path) as (_, client):
            fill(client, "dc", 9500.0, 0.4)
            fill(client, "inet", 90.0, 80.0)
            dc = advise(client, "dc", 1 << 30)
            inet = advise(client, "inet", 1 << 30)
            assert dc.network_mode == pb.NETWORK_MODE_DATACENTER
            assert inet.network_mode == pb.NETWORK_MODE_INTERNET
            assert inet.transfer_seconds > dc.transfer_seconds
            small = advise(client, "inet", 1 << 20)
            assert small.transfer_seconds < inet.transfer_seconds / 100
            assert (inet.parallel_streams, inet.socket_buffer_bytes) > (
                dc.parallel_streams,
                dc.socket_buffer_bytes,
            )
            assert inet.transfer_seconds_low <= inet.transfer_seconds <= inet.transfer_seconds_high
            assert 0.0 <= inet.confidence <= 1.0
            assert dc.forecast.peer_id == "dc" and dc.forecast.model_version

    def test_compression_follows_link_speed(self, tmp_path: Path) -> None:
        """A strong codec on a slow link, none or lz4 on a fast one; random data stays raw."""
        with running_server(tmp_path) as (_, client):
            fill(client, "slow", 10.0, 60.0)
            fill(client, "fast", 40_000.0, 0.2)
            slow = advise(client, "slow", 1 << 30).compression
            fast = advise(client, "fast", 1 << 30).compression
            assert slow.codec == pb.CODEC_ZSTD and slow.level >= 3
            assert fast.codec in (pb.CODEC_NONE, pb.CODEC_LZ4)
            raw = advise(client, "slow", 1 << 30, pb.DATA_KIND_RANDOM).compression
            assert raw.codec == pb.CODEC_NONE

    def test_rank_and_errors(self, tmp_path: Path) -> None:
        """RankPeers orders by transfer time; an unknown peer is NOT_FOUND."""
        with running_server(tmp_path) as (_, client):
            fill(client, "a", 50.0, 40.0)
            fill(client, "b", 5000.0, 1.0)
            fill(client, "c", 500.0, 20.0)
            resp = client.stub.RankPeers(
                pb.RankPeersRequest(peer_ids=["a", "b", "c"], payload_bytes=1 << 28), timeout=10
            )
            order = [a.forecast.peer_id for a in resp.advice]
            assert order == ["b", "c", "a"]
            times = [a.transfer_seconds for a in resp.advice]
            assert times == sorted(times)
            with pytest.raises(grpc.RpcError) as err:
                advise(client, "zzz", 1)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND


class TestWatch:
    """WatchForecasts pushes new forecasts."""

    def test_pushes_after_samples(self, tmp_path: Path) -> None:
        """A watcher gets the current forecast, then one after each new sample batch."""
        with running_server(tmp_path) as (_, client):
            fill(client, "w", 100.0, 10.0)
            call = client.stub.WatchForecasts(pb.WatchForecastsRequest(peer_ids=["w"]), timeout=20)
            got: list[pb.PeerForecast] = []

            def read() -> None:
                for resp in call:
                    got.append(resp.forecast)
                    if len(got) >= 3:
                        return

            reader = threading.Thread(target=read)
            reader.start()
            for i in range(2):
                time.sleep(0.3)
                client.push([sample("w", 200.0 + i), sample("other", 1.0)])
            reader.join(timeout=15)
            call.cancel()
            assert len(got) >= 3
            assert {f.peer_id for f in got} == {"w"}
            assert got[-1].samples_in_window == 10

    def test_slow_consumer_bounded(self, tmp_path: Path) -> None:
        """A watcher that never reads holds one pending entry per peer, not a queue."""
        with running_server(tmp_path) as (server, client):
            call = client.stub.WatchForecasts(pb.WatchForecastsRequest(), timeout=30)
            for i in range(200):
                client.push([sample(f"p{i % 5}", 10.0 + i)])
            assert server.core is not None
            hub = server.core.watch
            assert len(hub) == 1
            watcher = next(iter(hub._all))
            assert watcher.pending <= 5
            call.cancel()


class TestWatchAll:
    """A watcher of every peer."""

    def test_all_peers_in_chunks(self, tmp_path: Path) -> None:
        """An empty peer list watches everyone: the first pushes cover every
        tracked peer, more than one chunk of them, each exactly once."""
        from bwpredd.core import WATCH_CHUNK

        n = WATCH_CHUNK + 40
        with running_server(tmp_path) as (_, client):
            client.push([sample(f"n{i}", 10.0 + i % 7) for i in range(n)])
            call = client.stub.WatchForecasts(pb.WatchForecastsRequest(), timeout=20)
            seen = []
            for resp in call:
                seen.append(resp.forecast.peer_id)
                if len(seen) == n:
                    break
            call.cancel()
            assert sorted(seen) == sorted(f"n{i}" for i in range(n))
