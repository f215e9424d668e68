"""Prometheus metrics of the daemon, created against an injected registry,
and the HTTP endpoint that serves them.

gRPC call metrics follow the ``grpc_server_handled_total`` /
``grpc_server_handling_seconds`` conventions of go-grpc-prometheus; the
daemon's own metrics live in the ``bwpredd`` namespace. Values computed at
scrape time (live accuracy, guardrail peers, snapshot age) come from one
collector that reads each source once per scrape, as do the recorder's
counters (plain integers it keeps itself, so ingest takes no metric lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import threading
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["Metrics", "MetricsServer"]

# The endpoint's bounds: connections open at once, and seconds a connection
# has, in all, to send its request and take the reply.
METRICS_MAX_CONNECTIONS = 32
METRICS_TIMEOUT_S = 10.0
_MAX_REQUEST_HEAD = 16 * 1024

_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class Metrics:
    """Every metric the daemon exports.

    Args:
        registry: where to register (tests pass a fresh ``CollectorRegistry()``).
        namespace: prefix of the daemon's own metrics.
    """

    def __init__(self, registry: CollectorRegistry, namespace: str = "bwpredd") -> None:
        self.registry = registry
        labels = ["grpc_service", "grpc_method", "grpc_type"]
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Time to handle an RPC (for streams: the whole stream).",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received_total",
            "Request messages received.",
            labels,
            registry=registry,
        )
        self.accepted = Counter(
            "samples_accepted_total", "Samples stored.", namespace=namespace, registry=registry
        )
        self.rejected = Counter(
            "samples_rejected_total",
            "Samples rejected, by the field at fault.",
            ["field"],
            namespace=namespace,
            registry=registry,
        )
        self.peers = Gauge("peers", "Peers tracked.", namespace=namespace, registry=registry)
        self.evictions = Counter(
            "peer_evictions_total",
            "Peers dropped: lru (at capacity) or idle (expired).",
            ["cause"],
            namespace=namespace,
            registry=registry,
        )
        self.forecasts = Counter(
            "forecasts_total",
            "Forecasts served, by source.",
            ["source"],
            namespace=namespace,
            registry=registry,
        )
        self.eager = Counter(
            "eager_answers_total",
            "Peers queued for eager answers (eager_answers) right after their samples, by "
            "outcome: computed, or skipped (a question had computed them first, or the "
            "peer's window changed or went away before the computation ran).",
            ["outcome"],
            namespace=namespace,
            registry=registry,
        )
        self.model_info = Gauge(
            "model_info",
            "The model being served (value 1), by version.",
            ["version"],
            namespace=namespace,
            registry=registry,
        )
        self.reloads = Counter(
            "model_reloads_total",
            "Model reloads, by outcome (ok, failed).",
            ["outcome"],
            namespace=namespace,
            registry=registry,
        )
        self._scraped = _ScrapeTime(namespace)
        registry.register(self._scraped)
        self.watchers = Gauge(
            "watchers", "Open WatchForecasts streams.", namespace=namespace, registry=registry
        )

    def set_model(self, version: str) -> None:
        """Point ``model_info`` at ``version`` (empty: no model)."""
        self.model_info.clear()
        self.model_info.labels(version=version or "none").set(1)

    def live_scores_from(self, summary: Callable[[], Mapping[str, float]]) -> None:
        """Read ``live_mean_abs_error_ratio`` and ``guardrail_peers`` from
        ``summary()`` (``LiveScores.summary``: ``model_nmae``,
        ``baseline_nmae``, ``peers_in_fallback``), called once per scrape."""
        self._scraped.live_scores = summary

    def snapshot_age_from(self, age: Callable[[], float]) -> None:
        """Read ``snapshot_age_seconds`` from ``age()`` at each scrape."""
        self._scraped.snapshot_age = age

    def recording_from(self, summary: Callable[[], Mapping[str, float]]) -> None:
        """Read the recording metrics from ``summary()`` (``Recorder.summary``:
        ``written``, ``dropped_queue_full``, ``dropped_write_failed``,
        ``bytes``, ``files``) at each scrape: the recorder keeps plain
        counters, so the ingest path pays no metric lock."""
        self._scraped.recording = summary


_Families = tuple[
    GaugeMetricFamily,
    GaugeMetricFamily,
    GaugeMetricFamily,
    CounterMetricFamily,
    CounterMetricFamily,
    GaugeMetricFamily,
    GaugeMetricFamily,
]


class _ScrapeTime(Collector):
    """The metrics computed when scraped, in one pass: ``summary()`` is
    O(capacity), so it runs once per scrape for all the gauges it feeds.
    Until a source is set they read as a fresh metric would: no live error
    sample, 0 guardrail peers, a snapshot age of -1 (none yet), no samples
    recorded or dropped."""

    def __init__(self, namespace: str) -> None:
        self.live_error = f"{namespace}_live_mean_abs_error_ratio"
        self.guardrail_peers = f"{namespace}_guardrail_peers"
        self.snapshot_age_seconds = f"{namespace}_snapshot_age_seconds"
        self.recorded = f"{namespace}_recorded_samples"
        self.recording_dropped = f"{namespace}_recording_dropped_samples"
        self.recording_bytes = f"{namespace}_recording_bytes"
        self.recording_files = f"{namespace}_recording_files"
        self.live_scores: Callable[[], Mapping[str, float]] | None = None
        self.snapshot_age: Callable[[], float] | None = None
        self.recording: Callable[[], Mapping[str, float]] | None = None

    def _families(self) -> _Families:
        return (
            GaugeMetricFamily(
                self.live_error,
                "Mean over peers of rolling absolute error / rolling mean actual, by predictor.",
                labels=["predictor"],
            ),
            GaugeMetricFamily(
                self.guardrail_peers,
                "Peers currently answered from the baseline by the guardrail.",
            ),
            GaugeMetricFamily(
                self.snapshot_age_seconds,
                "Seconds since the last successful snapshot (-1: none yet).",
            ),
            CounterMetricFamily(self.recorded, "Accepted samples written to recording files."),
            CounterMetricFamily(
                self.recording_dropped,
                "Accepted samples left out of the recording (they are in the windows), "
                "by reason: queue_full (the writer fell behind), write_failed (a file "
                "could not be written: disk full, any OS error).",
                labels=["reason"],
            ),
            GaugeMetricFamily(self.recording_bytes, "Bytes of the recording files kept."),
            GaugeMetricFamily(self.recording_files, "Recording files kept."),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        live, guard, age, recorded, dropped, rec_bytes, rec_files = self._families()
        rec = self.recording() if self.recording is not None else {}
        recorded.add_metric([], rec.get("written", 0.0))
        for reason in ("queue_full", "write_failed"):
            dropped.add_metric([reason], rec.get(f"dropped_{reason}", 0.0))
        rec_bytes.add_metric([], rec.get("bytes", 0.0))
        rec_files.add_metric([], rec.get("files", 0.0))
        if self.live_scores is not None:
            summary = self.live_scores()
            live.add_metric(["model"], float(summary["model_nmae"]))
            live.add_metric(["baseline"], float(summary["baseline_nmae"]))
            guard.add_metric([], float(summary["peers_in_fallback"]))
        else:
            guard.add_metric([], 0.0)
        age.add_metric([], -1.0 if self.snapshot_age is None else float(self.snapshot_age()))
        return (live, guard, age, recorded, dropped, rec_bytes, rec_files)


class MetricsServer:
    """``GET /metrics`` over HTTP/1.1 on one thread running its own event
    loop, so an open connection costs a socket, never a thread.

    prometheus_client's ``start_http_server`` starts a thread per connection
    and waits on a silent one forever: 217 idle connections held 222
    threads. Here at most ``max_connections`` are open at once; at the cap,
    the oldest connection still sending its request is dropped for the new
    one (a scraper sends its request at once, so slow clients cannot lock it
    out); each connection has ``timeout_s`` in all to send a request head of
    at most 16 KiB and take the reply, which ends it (``Connection: close``).

    Args:
        registry: what to serve.
        host: address to listen on (a name, IPv4 or IPv6, without brackets).
        port: TCP port; 0 picks a free one (see :attr:`port`).
        max_connections: connections open at once, at most.
        timeout_s: seconds per connection, in all.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        max_connections: int = METRICS_MAX_CONNECTIONS,
        timeout_s: float = METRICS_TIMEOUT_S,
    ) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        # Open connections, oldest first: True while still reading the request.
        self._open: dict[asyncio.StreamWriter, bool] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve on a background thread.

        Raises:
            OSError: the address cannot be bound.
        """
        family, kind, proto, _, address = socket.getaddrinfo(
            self.host or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, args=(loop, sock), name="bwpredd-metrics", daemon=True
        )
        self._thread.start()

    def _run(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(
            asyncio.start_server(self._serve, sock=sock, limit=_MAX_REQUEST_HEAD)
        )
        try:
            loop.run_forever()
        finally:
            server.close()
            for writer in list(self._open):
                writer.transport.abort()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    def shutdown(self) -> None:
        """Stop serving, close every connection and the listening socket."""
        if self._loop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already stopped
                self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._thread = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= self.max_connections:
            oldest = next((w for w, reading in self._open.items() if reading), None)
            if oldest is None:  # every one is being answered: refuse the new one
                writer.transport.abort()
                return
            del self._open[oldest]
            oldest.transport.abort()
        self._open[writer] = True
        # drain() then waits until the kernel holds the whole reply, so a
        # client that does not read cannot keep the connection past the timeout.
        writer.transport.set_write_buffer_limits(high=0)
        try:
            async with asyncio.timeout(self.timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
                if writer in self._open:
                    self._open[writer] = False
                writer.write(self._reply(head))
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            self._open.pop(writer, None)
            writer.transport.abort()

    def _reply(self, head: bytes) -> bytes:
        """The whole HTTP response to a request head."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response("400 Bad Request", "text/plain", b"bad request\n")
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return _response("405 Method Not Allowed", "text/plain", b"GET or HEAD\n")
        if target.split("?", 1)[0] == "/favicon.ico":
            return _response("404 Not Found", "text/plain", b"")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        body = encoder(self.registry)
        extra = ""
        if "gzip" in headers.get("accept-encoding", ""):
            body = gzip.compress(body)
            extra = "Content-Encoding: gzip\r\n"
        return _response("200 OK", content_type, body, extra, head_only=method == "HEAD")


def _response(
    status: str, content_type: str, body: bytes, extra: str = "", head_only: bool = False
) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + (b"" if head_only else body)
