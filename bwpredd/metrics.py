"""Prometheus metrics of the daemon, created against an injected registry.

gRPC call metrics follow the ``grpc_server_handled_total`` /
``grpc_server_handling_seconds`` conventions of go-grpc-prometheus; the
daemon's own metrics live in the ``bwpredd`` namespace.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

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
        self.snapshot_age = Gauge(
            "snapshot_age_seconds",
            "Seconds since the last successful snapshot (-1: none yet).",
            namespace=namespace,
            registry=registry,
        )
        self.snapshot_age.set(-1)
        self.live_error = Gauge(
            "live_mean_abs_error_ratio",
            "Mean over peers of rolling absolute error / rolling mean actual, by predictor.",
            ["predictor"],
            namespace=namespace,
            registry=registry,
        )
        self.guardrail_peers = Gauge(
            "guardrail_peers",
            "Peers currently answered from the baseline by the guardrail.",
            namespace=namespace,
            registry=registry,
        )
        self.watchers = Gauge(
            "watchers", "Open WatchForecasts streams.", namespace=namespace, registry=registry
        )

    def set_model(self, version: str) -> None:
        """Point ``model_info`` at ``version`` (empty: no model)."""
        self.model_info.clear()
        self.model_info.labels(version=version or "none").set(1)
