"""The floors ``make bench`` measures the daemon against: bare gRPC servers.

One process serves, on a unix socket, with either the sync (thread pool) or
the asyncio grpcio server:

- ``/bench.Floor/Echo``: a bare unary RPC. The request's first 4 bytes give
  the reply's length (little endian) and the rest pads it to the daemon's
  request size, so request and reply match the daemon's messages byte for
  byte while the server does no work at all.
- ``/bwpred.v1.BandwidthPredictorService/StreamSamples``: the minimal ingest
  server of issue 6. It parses each batch, validates every sample (peer id
  for new peers, bandwidth required and in range, the optional features in
  range) and writes it into preallocated numpy windows, in order, and acks
  with a real ``StreamSamplesResponse``. No carry-forward, time-order rule,
  metrics, live scoring or logging: what the Python stack costs before any of
  the daemon's features.

``python -m bench.floor {sync,aio} unix:/path.sock`` prints ``READY`` on
stdout once it serves and runs until SIGTERM; :class:`Floor` starts one.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from bench.harness import REPO, channel
from bwpredd._proto.bwpred.v1 import bwpred_pb2 as pb
from bwpredd.schema import BW, LAT, LOSS, REL, WIDTH, WINDOW

__all__ = ["ECHO_METHOD", "INGEST_METHOD", "Floor", "MinimalStore", "echo_request", "main"]

ECHO_METHOD = "/bench.Floor/Echo"
INGEST_METHOD = "/bwpred.v1.BandwidthPredictorService/StreamSamples"
_PEER_RE = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")
_REPLIES: dict[int, bytes] = {}


def echo_request(request_bytes: int, reply_bytes: int) -> bytes:
    """An Echo request of ``request_bytes`` (at least 4) asking for a reply of
    ``reply_bytes``.

    Args:
        request_bytes: size of the daemon's request being matched.
        reply_bytes: size of the daemon's reply being matched.
    """
    head = reply_bytes.to_bytes(4, "little")
    return head + b"\0" * max(0, request_bytes - 4)


def _echo(request: bytes) -> bytes:
    n = int.from_bytes(request[:4], "little")
    reply = _REPLIES.get(n)
    if reply is None:
        reply = _REPLIES[n] = b"\1" * n
    return reply


class MinimalStore:
    """Validate-and-write ingest into ``[capacity, W, WIDTH]`` float32 windows.

    Args:
        capacity: peers held at most (new peers beyond it are rejected).
        window: samples per peer.
    """

    def __init__(self, capacity: int = 100_000, window: int = WINDOW) -> None:
        self.window = window
        self.data = np.zeros((capacity, window, WIDTH), dtype=np.float32)
        self.head = np.zeros(capacity, dtype=np.int64)
        self.count = np.zeros(capacity, dtype=np.int64)
        self.slots: dict[str, int] = {}
        self.capacity = capacity

    def _slot(self, peer_id: str) -> int:
        slot = self.slots.get(peer_id)
        if slot is None:
            if len(self.slots) >= self.capacity or not _PEER_RE.fullmatch(peer_id):
                return -1
            slot = self.slots[peer_id] = len(self.slots)
        return slot

    def ingest(self, request: pb.StreamSamplesRequest) -> pb.StreamSamplesResponse:
        """Validate and store one batch; ack it."""
        samples = request.samples
        n = len(samples)
        slot = self._slot
        slots = np.fromiter((slot(s.peer_id) for s in samples), dtype=np.int64, count=n)
        rows = np.empty((n, WIDTH), dtype=np.float64)
        rows[:, LAT] = [s.latency_ms for s in samples]
        rows[:, BW] = [s.bandwidth_mbps for s in samples]
        rows[:, LOSS] = [s.packet_loss for s in samples]
        rows[:, REL] = [s.reliability for s in samples]
        has_bw = np.fromiter((s.HasField("bandwidth_mbps") for s in samples), dtype=bool, count=n)
        lat, bw, loss, rel = rows[:, LAT], rows[:, BW], rows[:, LOSS], rows[:, REL]
        with np.errstate(invalid="ignore"):
            ok = (
                (slots >= 0)
                & has_bw
                & np.isfinite(rows).all(axis=1)
                & (bw >= 0)
                & (bw <= 1e7)
                & (lat >= 0)
                & (lat <= 600_000)
                & (loss >= 0)
                & (loss <= 1)
                & (rel >= 0)
                & (rel <= 1)
            )
        good = np.flatnonzero(ok)
        self._write(slots[good], rows[good])
        bad = np.flatnonzero(~ok)
        return pb.StreamSamplesResponse(
            accepted=int(good.size),
            rejected=int(bad.size),
            rejections=[pb.Rejection(index=int(i), field="sample") for i in bad],
        )

    def _write(self, slots: npt.NDArray[np.int64], rows: npt.NDArray[np.float64]) -> None:
        """Append rows in request order (a peer may appear more than once)."""
        if slots.size == 0:
            return
        order = np.argsort(slots, kind="stable")
        s = slots[order]
        start = np.r_[True, s[1:] != s[:-1]]
        first = np.flatnonzero(start)
        rank = np.arange(s.size) - first[np.cumsum(start) - 1]
        pos = (self.head[s] + rank) % self.window
        self.data[s, pos] = rows[order]
        sizes = np.diff(np.r_[first, s.size])
        heads = s[first]
        self.head[heads] = (self.head[heads] + sizes) % self.window
        self.count[heads] = np.minimum(self.count[heads] + sizes, self.window)


def _handlers(store: MinimalStore, aio: bool) -> list[grpc.GenericRpcHandler]:
    def parse(b: bytes) -> pb.StreamSamplesRequest:
        return pb.StreamSamplesRequest.FromString(b)

    def write(m: pb.StreamSamplesResponse) -> bytes:
        return m.SerializeToString()

    ingest: Callable[..., Any]
    if aio:

        async def ingest_aio(
            requests: AsyncIterator[pb.StreamSamplesRequest], context: Any
        ) -> AsyncIterator[pb.StreamSamplesResponse]:
            async for request in requests:
                yield store.ingest(request)

        ingest = ingest_aio
    else:

        def ingest_sync(
            requests: Iterator[pb.StreamSamplesRequest], context: Any
        ) -> Iterator[pb.StreamSamplesResponse]:
            for request in requests:
                yield store.ingest(request)

        ingest = ingest_sync

    if aio:

        async def echo_aio(request: bytes, context: Any) -> bytes:
            return _echo(request)

        echo: Callable[..., Any] = echo_aio
    else:

        def echo_sync(request: bytes, context: Any) -> bytes:
            return _echo(request)

        echo = echo_sync

    return [
        grpc.method_handlers_generic_handler(
            "bench.Floor", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        ),
        grpc.method_handlers_generic_handler(
            "bwpred.v1.BandwidthPredictorService",
            {
                "StreamSamples": grpc.stream_stream_rpc_method_handler(
                    ingest, request_deserializer=parse, response_serializer=write
                )
            },
        ),
    ]


_OPTIONS = [("grpc.max_receive_message_length", 8 * 1024 * 1024), ("grpc.so_reuseport", 0)]


def _serve_sync(address: str) -> None:
    # A sync server holds a pool thread for the whole life of a stream: size
    # the pool above the bench's 16 clients or streams starve unary calls.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=_OPTIONS)
    server.add_generic_rpc_handlers(_handlers(MinimalStore(), aio=False))
    if not server.add_insecure_port(address):
        raise SystemExit(f"cannot bind {address}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("READY", flush=True)
    stop.wait()
    server.stop(0)


async def _serve_aio(address: str) -> None:
    server = grpc.aio.server(options=_OPTIONS)
    server.add_generic_rpc_handlers(_handlers(MinimalStore(), aio=True))
    if not server.add_insecure_port(address):
        raise SystemExit(f"cannot bind {address}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("READY", flush=True)
    await stop.wait()
    await server.stop(0)


class Floor:
    """A floor server as a child process, serving once constructed.

    Args:
        workdir: where the socket goes.
        kind: ``sync`` (thread pool) or ``aio`` (asyncio).
    """

    def __init__(self, workdir: Path, kind: str) -> None:
        self.kind = kind
        self.address = f"unix:{workdir / f'floor-{kind}.sock'}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.floor", kind, self.address],
            stdout=subprocess.DEVNULL,
            cwd=REPO,
        )
        with channel(self.address) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)

    def stop(self) -> None:
        """SIGTERM; SIGKILL if it outlives 10 s."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.floor {sync,aio} ADDRESS``.

    Args:
        argv: arguments (``sys.argv[1:]`` when None).
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("sync", "aio"):
        print("usage: python -m bench.floor {sync,aio} unix:/path.sock", file=sys.stderr)
        return 2
    kind, address = args
    if kind == "sync":
        _serve_sync(address)
    else:
        asyncio.run(_serve_aio(address))
    return 0


if __name__ == "__main__":
    sys.exit(main())
