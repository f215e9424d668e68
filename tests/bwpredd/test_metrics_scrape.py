"""Prometheus metrics: the names and labels of bwpredd.metrics on a fresh
registry, and the live endpoint of a real server scraped after traffic."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bwpredd.metrics import Metrics, MetricsServer
from bwpredd.servicer import SERVICE_NAME

# The server does not report the port it bound for metrics_addr port 0, so
# the tests pick a free one.
from tests.helpers import free_port, running_server, sample

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """GET /metrics and parse the text format into {(name, labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when absent (a labelled counter not yet used)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def rpc_labels(method: str, kind: str = "unary") -> dict[str, str]:
    return {"grpc_service": SERVICE_NAME, "grpc_method": method, "grpc_type": kind}


class TestMetricsRegistry:
    """bwpredd.metrics.Metrics on a fresh CollectorRegistry."""

    def test_names_follow_conventions(self) -> None:
        """The gRPC metrics keep go-grpc-prometheus names; the daemon's own
        carry the bwpredd_ namespace and _total/_seconds suffixes."""
        registry = CollectorRegistry()
        m = Metrics(registry)
        m.handled.labels(SERVICE_NAME, "Forecast", "unary", "OK").inc()
        m.handling.labels(SERVICE_NAME, "Forecast", "unary").observe(0.0003)
        m.accepted.inc(3)
        m.rejected.labels(field="bandwidth_mbps").inc()
        m.evictions.labels(cause="lru").inc()
        m.forecasts.labels(source="model").inc(2)
        m.reloads.labels(outcome="ok").inc()
        m.peers.set(7)
        get = registry.get_sample_value
        labels = rpc_labels("Forecast")
        assert get("grpc_server_handled_total", {**labels, "grpc_code": "OK"}) == 1
        assert get("grpc_server_handling_seconds_count", labels) == 1
        assert get("grpc_server_handling_seconds_bucket", {**labels, "le": "0.0005"}) == 1
        assert get("grpc_server_handling_seconds_bucket", {**labels, "le": "0.00025"}) == 0
        assert get("bwpredd_samples_accepted_total") == 3
        assert get("bwpredd_samples_rejected_total", {"field": "bandwidth_mbps"}) == 1
        assert get("bwpredd_peer_evictions_total", {"cause": "lru"}) == 1
        assert get("bwpredd_forecasts_total", {"source": "model"}) == 2
        assert get("bwpredd_model_reloads_total", {"outcome": "ok"}) == 1
        assert get("bwpredd_peers") == 7
        assert get("bwpredd_snapshot_age_seconds") == -1

    def test_model_info_names_one_version(self) -> None:
        """set_model points model_info at the new version and drops the old
        one; no model reads "none"."""
        registry = CollectorRegistry()
        m = Metrics(registry)
        m.set_model("v1")
        m.set_model("v2")
        get = registry.get_sample_value
        assert get("bwpredd_model_info", {"version": "v2"}) == 1
        assert get("bwpredd_model_info", {"version": "v1"}) is None
        m.set_model("")
        assert get("bwpredd_model_info", {"version": "none"}) == 1
        assert get("bwpredd_model_info", {"version": "v2"}) is None

    def test_registry_is_injected(self) -> None:
        """Two Metrics on two registries are independent; a second one on the
        same registry is refused (ValueError), not merged."""
        a, b = CollectorRegistry(), CollectorRegistry()
        Metrics(a).accepted.inc(5)
        Metrics(b)
        assert a.get_sample_value("bwpredd_samples_accepted_total") == 5
        assert b.get_sample_value("bwpredd_samples_accepted_total") == 0
        with pytest.raises(ValueError, match="Duplicated"):
            Metrics(a)

    def test_scrape_time_gauges_in_one_pass(self) -> None:
        """The live error, guardrail and snapshot age gauges are read at
        scrape time, with one summary() call per scrape for all of them."""
        registry = CollectorRegistry()
        m = Metrics(registry)
        calls = []

        def summary() -> dict[str, float]:
            calls.append(1)
            return {"model_nmae": 0.25, "baseline_nmae": 0.5, "peers_in_fallback": 3}

        m.live_scores_from(summary)
        m.snapshot_age_from(lambda: 12.5)
        text = generate_latest(registry).decode()
        assert len(calls) == 1
        types = {f.name: f.type for f in text_string_to_metric_families(text)}
        for name in (
            "bwpredd_live_mean_abs_error_ratio",
            "bwpredd_guardrail_peers",
            "bwpredd_snapshot_age_seconds",
        ):
            assert types[name] == "gauge"
        get = registry.get_sample_value
        assert get("bwpredd_live_mean_abs_error_ratio", {"predictor": "model"}) == 0.25
        assert get("bwpredd_live_mean_abs_error_ratio", {"predictor": "baseline"}) == 0.5
        assert get("bwpredd_guardrail_peers") == 3
        assert get("bwpredd_snapshot_age_seconds") == 12.5

    def test_scrape_time_gauges_before_a_source(self) -> None:
        """With nothing to read from yet, the gauges read as fresh ones:
        no live error sample, 0 guardrail peers, snapshot age -1."""
        registry = CollectorRegistry()
        Metrics(registry)
        text = generate_latest(registry).decode()
        assert "# TYPE bwpredd_live_mean_abs_error_ratio gauge" in text
        get = registry.get_sample_value
        assert get("bwpredd_live_mean_abs_error_ratio", {"predictor": "model"}) is None
        assert get("bwpredd_guardrail_peers") == 0
        assert get("bwpredd_snapshot_age_seconds") == -1

    def test_recording_metrics_at_scrape_time(self) -> None:
        """The recording counters and gauges are read from the recorder's
        summary() once per scrape, counters typed as counters; before a
        recorder is set they read 0."""
        registry = CollectorRegistry()
        m = Metrics(registry)
        get = registry.get_sample_value
        assert get("bwpredd_recording_dropped_samples_total", {"reason": "queue_full"}) == 0
        calls = []

        def summary() -> dict[str, float]:
            calls.append(1)
            return {
                "written": 7,
                "dropped_queue_full": 2,
                "dropped_write_failed": 3,
                "bytes": 4096,
                "files": 2,
            }

        m.recording_from(summary)
        text = generate_latest(registry).decode()
        assert len(calls) == 1
        types = {f.name: f.type for f in text_string_to_metric_families(text)}
        assert types["bwpredd_recorded_samples"] == "counter"
        assert types["bwpredd_recording_dropped_samples"] == "counter"
        assert types["bwpredd_recording_bytes"] == "gauge"
        assert get("bwpredd_recorded_samples_total") == 7
        assert get("bwpredd_recording_dropped_samples_total", {"reason": "queue_full"}) == 2
        assert get("bwpredd_recording_dropped_samples_total", {"reason": "write_failed"}) == 3
        assert get("bwpredd_recording_bytes") == 4096
        assert get("bwpredd_recording_files") == 2

    def test_namespace(self) -> None:
        """The namespace prefixes the daemon's metrics but not the gRPC ones."""
        registry = CollectorRegistry()
        Metrics(registry, namespace="edge").accepted.inc()
        assert registry.get_sample_value("edge_samples_accepted_total") == 1
        assert registry.get_sample_value("bwpredd_samples_accepted_total") is None


def _wait(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.05)


class TestScrape:
    """The /metrics endpoint of a real server."""

    def test_counters_move_with_traffic(self, tmp_path: Path) -> None:
        """After pushes, a stream, forecasts, a NOT_FOUND, evictions and a
        reload, every counter the issue names has moved by what was sent."""
        port = free_port()
        with running_server(tmp_path, metrics_addr=f"127.0.0.1:{port}", max_peers=3) as (
            server,
            client,
        ):
            before = scrape(port)
            version = server.core.engine.version if server.core else ""
            assert version
            assert value(before, "bwpredd_model_info", version=version) == 1
            assert value(before, "bwpredd_peers") == 0

            # 12 good samples for "full", 3 for "cold"; 2 bad ones.
            resp = client.push(
                [sample("full", 100.0 + i, latency_ms=2.0) for i in range(12)]
                + [sample("cold", 50.0 + i) for i in range(3)]
                + [sample("bad", math.nan), sample("bad", 1.0, packet_loss=2.0)]
            )
            assert (resp.accepted, resp.rejected) == (15, 2)
            acks = list(client.stream([[sample("cold", 1.0)], [sample("cold", -1.0)]]))
            assert [(a.accepted, a.rejected) for a in acks] == [(1, 0), (0, 1)]
            client.forecast(["full", "cold"])
            client.forecast(["full"])
            client.allocate(["full"])
            with pytest.raises(grpc.RpcError):
                client.forecast(["ghost"])
            mid = scrape(port)
            # Two more peers beyond max_peers=3 evict the least recently seen.
            client.push([sample("e1", 1.0), sample("e2", 1.0)])
            loop = server.loop
            assert loop is not None
            loop.call_soon_threadsafe(server.request_reload)
            _wait(lambda: value(scrape(port), "bwpredd_model_reloads_total", outcome="ok") == 1)
            after = scrape(port)

        def moved(name: str, **labels: str) -> float:
            return value(mid, name, **labels) - value(before, name, **labels)

        push_ok = {**rpc_labels("PushSamples"), "grpc_code": "OK"}
        assert moved("grpc_server_handled_total", **push_ok) == 1
        forecast_ok = {**rpc_labels("Forecast"), "grpc_code": "OK"}
        assert moved("grpc_server_handled_total", **forecast_ok) == 2
        forecast_nf = {**rpc_labels("Forecast"), "grpc_code": "NOT_FOUND"}
        assert moved("grpc_server_handled_total", **forecast_nf) == 1
        stream_ok = {**rpc_labels("StreamSamples", "bidi_stream"), "grpc_code": "OK"}
        assert moved("grpc_server_handled_total", **stream_ok) == 1
        assert (
            moved("grpc_server_msg_received_total", **rpc_labels("StreamSamples", "bidi_stream"))
            == 2
        )
        assert moved("grpc_server_handling_seconds_count", **rpc_labels("Forecast")) == 3
        assert moved("grpc_server_handling_seconds_sum", **rpc_labels("Forecast")) > 0
        inf = {**rpc_labels("PushSamples"), "le": "+Inf"}
        assert moved("grpc_server_handling_seconds_bucket", **inf) == 1
        assert moved("bwpredd_samples_accepted_total") == 16
        assert moved("bwpredd_samples_rejected_total", field="bandwidth_mbps") == 2
        assert moved("bwpredd_samples_rejected_total", field="packet_loss") == 1
        assert value(mid, "bwpredd_peers") == 2
        assert moved("bwpredd_forecasts_total", source="model") == 2
        assert moved("bwpredd_forecasts_total", source="baseline_cold_start") == 1

        assert value(after, "bwpredd_peers") == 3
        assert value(after, "bwpredd_peer_evictions_total", cause="lru") == 1
        assert value(after, "bwpredd_model_reloads_total", outcome="ok") == 1
        assert value(after, "bwpredd_model_info", version=version) == 1

    def test_scrape_time_gauges_of_a_server(self, tmp_path: Path) -> None:
        """A server's scrape shows the live error of scored forecasts, the
        peers in fallback and the age of its last snapshot."""
        port = free_port()
        with running_server(
            tmp_path, metrics_addr=f"127.0.0.1:{port}", state_dir=str(tmp_path / "state")
        ) as (server, client):
            before = scrape(port)
            assert value(before, "bwpredd_snapshot_age_seconds") == -1
            for step in range(14):
                client.push([sample("a", 100.0 + step % 3)])
                client.forecast(["a"])
            loop = server.loop
            assert loop is not None
            asyncio.run_coroutine_threadsafe(server.snapshot(), loop).result(timeout=30)
            after = scrape(port)
        model = value(after, "bwpredd_live_mean_abs_error_ratio", predictor="model")
        baseline = value(after, "bwpredd_live_mean_abs_error_ratio", predictor="baseline")
        assert 0 < model < 1 and 0 < baseline < 1
        assert value(after, "bwpredd_guardrail_peers") == 0
        assert 0 <= value(after, "bwpredd_snapshot_age_seconds") < 30

    def test_metrics_port_released_on_stop(self, tmp_path: Path) -> None:
        """After the server stops, its metrics port refuses connections."""
        port = free_port()
        with running_server(tmp_path, metrics_addr=f"127.0.0.1:{port}"):
            assert scrape(port)
        with pytest.raises(urllib.error.URLError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
        assert isinstance(err.value.reason, ConnectionRefusedError)


def _slow(port: int, partial: bool) -> socket.socket:
    """A connection that sends nothing, or half a request head, and waits."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if partial:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: slow\r\n")
    return sock


def _closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """True once the server closes (or resets) the connection."""
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


class TestEndpointBounds:
    """The /metrics endpoint under slow and idle connections."""

    def test_slow_connections_hold_no_threads(self, tmp_path: Path) -> None:
        """200 connections that send nothing or half a request leave the
        daemon's thread count where it was (it was one thread each), and a
        normal scrape still answers while they are open."""
        port = free_port()
        with running_server(tmp_path, metrics_addr=f"127.0.0.1:{port}"):
            assert scrape(port)
            threads = threading.active_count()
            slow = [_slow(port, partial=i % 2 == 1) for i in range(200)]
            try:
                time.sleep(0.5)
                assert threading.active_count() <= threads + 1, threading.active_count()
                assert value(scrape(port), "bwpredd_peers") == 0
                assert threading.active_count() <= threads + 1
            finally:
                for sock in slow:
                    sock.close()

    def test_connection_timeout_is_for_the_whole_request(self) -> None:
        """An idle connection, and one trickling a byte every 0.1 s, are both
        closed once timeout_s has passed since they opened."""
        server = MetricsServer(CollectorRegistry(), "127.0.0.1", 0, timeout_s=0.5)
        server.start()
        try:
            idle = _slow(server.port, partial=False)
            trickle = _slow(server.port, partial=True)
            start = time.monotonic()
            for _ in range(8):
                time.sleep(0.1)
                with contextlib.suppress(OSError):
                    trickle.sendall(b"X")
            assert _closed_by_server(trickle, 2.0)
            assert _closed_by_server(idle, 2.0)
            assert time.monotonic() - start < 2.5
        finally:
            server.shutdown()
            for sock in (idle, trickle):
                sock.close()

    def test_scrape_gets_in_at_the_connection_cap(self) -> None:
        """With max_connections slow clients open, a scrape still answers:
        the oldest connection still sending its request makes room."""
        registry = CollectorRegistry()
        Metrics(registry).peers.set(7)
        server = MetricsServer(registry, "127.0.0.1", 0, max_connections=4)
        server.start()
        slow = [_slow(server.port, partial=True) for _ in range(4)]
        try:
            time.sleep(0.2)
            assert value(scrape(server.port), "bwpredd_peers") == 7
            assert _closed_by_server(slow[0], 2.0)
        finally:
            server.shutdown()
            for sock in slow:
                sock.close()

    def test_requests_other_than_get(self) -> None:
        """HEAD answers headers only, POST is 405, garbage is 400, and the
        reply is gzipped when asked."""
        registry = CollectorRegistry()
        Metrics(registry)
        server = MetricsServer(registry, "127.0.0.1", 0)
        server.start()
        url = f"http://127.0.0.1:{server.port}/metrics"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as resp:
                assert resp.status == 200 and int(resp.headers["Content-Length"]) > 0
                assert resp.read() == b""
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(urllib.request.Request(url, data=b"x", method="POST"))
            assert err.value.code == 405
            req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
            with urllib.request.urlopen(req) as resp:
                assert resp.headers["Content-Encoding"] == "gzip"
                assert b"bwpredd_peers" in gzip.decompress(resp.read())
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(b"hello\r\n\r\n")
                assert sock.recv(100).startswith(b"HTTP/1.1 400")
        finally:
            server.shutdown()
