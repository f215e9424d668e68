"""A small synchronous client on the generated stubs (used by bwpredctl,
the tests and the benchmarks)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bwpredd._proto.bwpred.v1 import bwpred_pb2 as pb
from bwpredd._proto.bwpred.v1 import bwpred_pb2_grpc as pb_grpc

__all__ = ["Client", "channel_for", "pb"]


def channel_for(
    target: str,
    *,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    server_name: str | None = None,
) -> grpc.Channel:
    """A channel to ``unix:/path.sock`` or ``host:port`` (TLS when ``ca`` is
    given; mutual TLS when ``cert`` and ``key`` are too).

    Args:
        target: the daemon's address.
        ca: PEM file of the CA that signed the server's certificate.
        cert: client certificate PEM file (mTLS).
        key: client key PEM file (mTLS).
        server_name: name to check the server's certificate against.
    """
    options: list[tuple[str, int | str]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if ca is None:
        return grpc.insecure_channel(target, options=options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, creds, options=options)


class Client:
    """The daemon's RPCs as methods.

    Args:
        channel: from :func:`channel_for`.
        timeout: deadline of each call, seconds.
    """

    def __init__(self, channel: grpc.Channel, timeout: float = 10.0) -> None:
        self.channel = channel
        self.timeout = timeout
        self.stub = pb_grpc.BandwidthPredictorServiceStub(channel)
        self.health_stub = health_pb2_grpc.HealthStub(channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def health(self, service: str = "") -> str:
        """The health status name (``SERVING``, ``NOT_SERVING``, ...)."""
        resp = self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def push(self, samples: Iterable[pb.Sample]) -> pb.PushSamplesResponse:
        return self.stub.PushSamples(
            pb.PushSamplesRequest(samples=list(samples)), timeout=self.timeout
        )

    def stream(self, batches: Iterable[Iterable[pb.Sample]]) -> Iterator[pb.StreamSamplesResponse]:
        """Send batches on one StreamSamples call; yields one ack per batch."""
        requests = (pb.StreamSamplesRequest(samples=list(b)) for b in batches)
        return iter(self.stub.StreamSamples(requests))

    def forecast(
        self, peer_ids: Iterable[str], horizon_seconds: float = 0.0
    ) -> list[pb.PeerForecast]:
        """Forecasts of the next step, or (``horizon_seconds`` > 0) of the mean
        bandwidth over that horizon."""
        request = pb.ForecastRequest(peer_ids=list(peer_ids), horizon_seconds=horizon_seconds)
        resp = self.stub.Forecast(request, timeout=self.timeout)
        return list(resp.forecasts)

    def allocate(self, peer_ids: Iterable[str]) -> list[pb.PeerAllocation]:
        resp = self.stub.Allocate(pb.AllocateRequest(peer_ids=list(peer_ids)), timeout=self.timeout)
        return list(resp.allocations)

    def peer(self, peer_id: str) -> pb.Peer:
        return self.stub.GetPeer(pb.GetPeerRequest(peer_id=peer_id), timeout=self.timeout).peer

    def peers(self) -> list[pb.Peer]:
        """Every tracked peer, following the pages."""
        out: list[pb.Peer] = []
        token = ""
        while True:
            resp = self.stub.ListPeers(pb.ListPeersRequest(page_token=token), timeout=self.timeout)
            out.extend(resp.peers)
            token = resp.next_page_token
            if not token:
                return out
