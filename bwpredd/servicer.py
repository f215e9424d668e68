"""The gRPC servicer: protobuf <-> domain types, and nothing else.

Every RPC goes through :func:`_rpc`, the one place that maps domain
exceptions to status codes, counts the call and writes its log line.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf.timestamp_pb2 import Timestamp

from bwpredd._proto.bwpred.v1 import bwpred_pb2 as pb
from bwpredd._proto.bwpred.v1 import bwpred_pb2_grpc as pb_grpc
from bwpredd.advise import Advice
from bwpredd.core import Core, IngestOutcome, Stamp
from bwpredd.engine import Forecasts
from bwpredd.errors import BwpreddError, InvalidArgument, PeerNotFound, ResourceExhausted
from bwpredd.logging import DeferredLines, RateLimitedLine, get_logger
from bwpredd.schema import FEATURES
from bwpredd.validate import SampleBatch, check_peer_id, check_peer_ids

__all__ = [
    "SERVICE_NAME",
    "BandwidthPredictorServicer",
    "Undecodable",
    "add_to_server",
    "extract_batch",
]

_SERVICE = pb.DESCRIPTOR.services_by_name["BandwidthPredictorService"]
SERVICE_NAME = _SERVICE.full_name
log = get_logger(__name__)
WATCH_CHUNK = 512  # peers forecast per step of a WatchForecasts stream
REPLY_CACHE_PEERS = 8  # Forecast/Allocate requests this small keep their reply
REPLY_CACHE_ENTRIES = 4096
# A client can send undecodable bytes at will: one log line per this many
# seconds at most, counting the ones held back.
UNDECODABLE_LOG_INTERVAL_S = 10.0
T = TypeVar("T")


class Undecodable:
    """What the deserializer hands a handler for bytes that are not a valid
    request message, so the handler answers INVALID_ARGUMENT (grpcio would
    answer UNKNOWN, and on a stream raise out of the request iterator)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lenient(message: Any) -> Callable[[bytes], Any]:
    parse = message.FromString
    name = message.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # any failure to parse is the client's bytes
            return Undecodable(f"request: not a valid {name} message ({type(exc).__name__})")

    return deserialize


def add_to_server(servicer: BandwidthPredictorServicer, server: Any) -> None:
    """Register ``servicer`` as the generated ``add_..._to_server`` does, with
    deserializers that hand undecodable requests to the handler as
    :class:`Undecodable` instead of failing the call inside grpcio.

    Args:
        servicer: the servicer.
        server: a ``grpc.aio.Server``.
    """
    shapes = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        m.name: shapes[m.client_streaming, m.server_streaming](
            getattr(servicer, m.name),
            request_deserializer=_lenient(getattr(pb, m.input_type.name)),
            response_serializer=getattr(pb, m.output_type.name).SerializeToString,
        )
        for m in _SERVICE.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


_CODES: dict[type[BwpreddError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    PeerNotFound: grpc.StatusCode.NOT_FOUND,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code of a domain exception (INTERNAL for anything else)."""
    for kind, code in _CODES.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def extract_batch(samples: Iterable[pb.Sample]) -> SampleBatch:
    """Pull a batch's fields into lists in one pass (the hot ingest path).

    Unrolled over the features of :mod:`bwpredd.schema`: a loop over their
    names cost 7-9% more per sample (1.08 vs 1.02 us, 1,000-sample batches);
    ``tests/bwpredd/test_schema.py`` checks the two agree.

    Args:
        samples: the request's repeated ``Sample``.
    """
    ids: list[str] = []
    bw: list[float] = []
    has_bw: list[bool] = []
    lat: list[float] = []
    has_lat: list[bool] = []
    loss: list[float] = []
    has_loss: list[bool] = []
    rel: list[float] = []
    has_rel: list[bool] = []
    ts: list[float] = []
    bad_nanos: list[tuple[int, int]] = []
    nan = math.nan
    for s in samples:
        ids.append(s.peer_id)
        has = s.HasField
        bw.append(s.bandwidth_mbps)
        has_bw.append(has("bandwidth_mbps"))
        lat.append(s.latency_ms)
        has_lat.append(has("latency_ms"))
        loss.append(s.packet_loss)
        has_loss.append(has("packet_loss"))
        rel.append(s.reliability)
        has_rel.append(has("reliability"))
        if has("timestamp"):
            t = s.timestamp
            nanos = t.nanos
            if not 0 <= nanos < 1_000_000_000:
                bad_nanos.append((len(ts), nanos))
            ts.append(t.seconds + nanos * 1e-9)
        else:
            ts.append(nan)
    # In the order of bwpredd.schema.FEATURES.
    values, given = [lat, bw, loss, rel], [has_lat, has_bw, has_loss, has_rel]
    return SampleBatch(ids, values, given, ts, bad_nanos)


_SOURCE_NAMES = [
    pb.ForecastSource.Name(v).removeprefix("FORECAST_SOURCE_")
    for v in range(max(pb.ForecastSource.values()) + 1)
]


def _served(source: npt.NDArray[np.int8]) -> list[tuple[int, int]]:
    """``(source value, peers)`` for each source present."""
    counts = np.bincount(source, minlength=len(_SOURCE_NAMES)).tolist()
    return [(v, n) for v, n in enumerate(counts) if n]


def source_counts(source: npt.NDArray[np.int8]) -> dict[str, int]:
    """``{"MODEL": n, ...}`` for a log line."""
    return {_SOURCE_NAMES[v]: n for v, n in _served(source)}


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    if math.isfinite(seconds):
        whole = math.floor(seconds)
        ts.seconds, ts.nanos = int(whole), int((seconds - whole) * 1e9)
    return ts


def forecast_messages(
    peer_ids: list[str], fc: Forecasts, horizons: npt.NDArray[np.float64] | None = None
) -> list[pb.PeerForecast]:
    """Domain forecasts -> ``PeerForecast`` messages, in ``peer_ids`` order
    (``horizons``: what each covers, for a Forecast with horizon_seconds)."""
    hz = [0.0] * len(peer_ids) if horizons is None else horizons.tolist()
    return [
        pb.PeerForecast(
            peer_id=pid,
            bandwidth_mbps=p,
            low_mbps=lo,
            high_mbps=hi,
            source=s,
            samples_in_window=c,
            model_version=fc.model_version,
            horizon_seconds=h,
        )
        for pid, p, lo, hi, s, c, h in zip(
            peer_ids,
            fc.point.tolist(),
            fc.low.tolist(),
            fc.high.tolist(),
            fc.source.tolist(),
            fc.counts.tolist(),
            hz,
            strict=True,
        )
    ]


def _forecast_message(peer_id: str, fc: Forecasts, i: int) -> pb.PeerForecast:
    """The ``PeerForecast`` of row ``i`` of ``fc``."""
    return pb.PeerForecast(
        peer_id=peer_id,
        bandwidth_mbps=float(fc.point[i]),
        low_mbps=float(fc.low[i]),
        high_mbps=float(fc.high[i]),
        source=pb.ForecastSource.Name(int(fc.source[i])),
        samples_in_window=int(fc.counts[i]),
        model_version=fc.model_version,
    )


def _ack(outcome: IngestOutcome, kind: type[T]) -> T:
    return kind(  # type: ignore[call-arg]
        accepted=outcome.accepted,
        rejected=len(outcome.rejections),
        rejections=[pb.Rejection(index=i, field=f, reason=r) for i, f, r in outcome.rejections],
    )


M = TypeVar("M")


@dataclass(slots=True)
class _Reply(Generic[M]):
    stamp: Stamp
    message: M
    served: list[tuple[int, int]]  # (source, peers), to count it served again
    sources: dict[str, int]  # the same, by name, for the log line


class _Replies(Generic[M]):
    """The reply messages of recent small Forecast or Allocate requests, by
    their peer ids, served again while no answer behind them has changed.

    A sidecar is asked about the same peers over and over between samples;
    the per-peer answers are cached in Core already, and keeping the built
    reply as well skips validation, look-ups and message building. A reply
    is current while :meth:`Core.unchanged` says so for its stamp: a model
    swap, or any change to one of its peers' windows (a sample, an eviction,
    an expiry, a restore), retires it.
    Memory is bounded: at most ``REPLY_CACHE_ENTRIES`` replies of at most
    ``REPLY_CACHE_PEERS`` peers, forgotten all at once when full.
    """

    def __init__(self, core: Core) -> None:
        self._core = core
        self._entries: dict[tuple[str, ...], _Reply[M]] = {}

    def get(self, key: tuple[str, ...]) -> _Reply[M] | None:
        reply = self._entries.get(key)
        if reply is None or not self._core.unchanged(reply.stamp):
            return None
        return reply

    def put(self, key: tuple[str, ...], message: M, source: npt.NDArray[np.int8]) -> None:
        if len(key) > REPLY_CACHE_PEERS:
            return
        if len(self._entries) >= REPLY_CACHE_ENTRIES:
            self._entries.clear()
        stamp = self._core.stamp(list(key))
        served = _served(source)
        sources = {_SOURCE_NAMES[v]: n for v, n in served}
        self._entries[key] = _Reply(stamp, message, served, sources)


def _rpc(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a unary handler: status mapping, metrics, one log line."""

    def decorate(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        name = method.__name__

        @functools.wraps(method)
        async def handler(self: BandwidthPredictorServicer, request: Any, context: Any) -> Any:
            start = time.perf_counter()
            if isinstance(request, Undecodable):
                await self._refuse_undecodable(name, kind, request, context, start=start, detail={})
                return None  # not reached: abort() raises
            detail: dict[str, Any] = {}
            # Count before abort(): it sends the status at once, so a client
            # could otherwise see the error before the metric moves.
            try:
                result = await method(self, request, context, detail)
            except BwpreddError as exc:
                code = status_for(exc)
                detail["error"] = str(exc)
                self._done(name, kind, code, start, detail)
                await context.abort(code, str(exc))
            except Exception as exc:
                log.exception("rpc_failed", rpc=name)
                self._done(name, kind, grpc.StatusCode.INTERNAL, start, detail)
                await context.abort(
                    grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
                )
            self._done(name, kind, grpc.StatusCode.OK, start, detail)
            return result

        return handler

    return decorate


class BandwidthPredictorServicer(pb_grpc.BandwidthPredictorServiceServicer):
    """``bwpred.v1.BandwidthPredictorService`` on the asyncio server.

    Args:
        core: the domain logic.
        log_rpcs: write one log line per RPC (errors are always logged).
    """

    def __init__(self, core: Core, log_rpcs: bool = True) -> None:
        self.core = core
        self.log_rpcs = log_rpcs
        # Metric children bound once per (method, type, code): a labels()
        # look-up per call costs more than the increment.
        self._children: dict[tuple[str, str, grpc.StatusCode], tuple[Any, Any]] = {}
        # grpc's max_concurrent_streams is per HTTP/2 connection; this caps
        # StreamSamples streams across all connections (WatchForecasts
        # streams are bounded by the WatchHub, so neither kind can take the
        # other's slots).
        self.open_streams = 0
        self._lines = DeferredLines(log, "rpc")
        self._undecodable = RateLimitedLine(log, "undecodable_request", UNDECODABLE_LOG_INTERVAL_S)
        self._forecasts: _Replies[pb.ForecastResponse] = _Replies(core)
        self._allocations: _Replies[pb.AllocateResponse] = _Replies(core)

    async def _admit_stream(self, name: str, context: Any) -> None:
        limit = self.core.config.max_concurrent_streams
        if self.open_streams >= limit:
            self._done(name, "stream", grpc.StatusCode.RESOURCE_EXHAUSTED, time.perf_counter(), {})
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"max_concurrent_streams: {limit} StreamSamples streams already open",
            )
        self.open_streams += 1

    async def _refuse_undecodable(
        self,
        name: str,
        kind: str,
        request: Undecodable,
        context: Any,
        *,
        start: float,
        detail: dict[str, Any],
    ) -> None:
        """End the call INVALID_ARGUMENT: counted like any call, logged at
        most once per UNDECODABLE_LOG_INTERVAL_S (its rpc line only with
        log_rpcs, like a successful call's)."""
        detail["error"] = request.reason
        self._done(name, kind, grpc.StatusCode.INVALID_ARGUMENT, start, detail, quiet=True)
        self._undecodable.warning(rpc=name, error=request.reason)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)

    def _done(
        self,
        name: str,
        kind: str,
        code: grpc.StatusCode,
        start: float,
        detail: dict[str, Any],
        *,
        quiet: bool = False,
    ) -> None:
        elapsed = time.perf_counter() - start
        key = (name, kind, code)
        children = self._children.get(key)
        if children is None:
            m = self.core.metrics
            children = (
                m.handled.labels(SERVICE_NAME, name, kind, code.name),
                m.handling.labels(SERVICE_NAME, name, kind),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(elapsed)
        ok = code == grpc.StatusCode.OK
        if self.log_rpcs or not (ok or quiet):
            detail.update(
                rpc=name,
                code=code.name,
                duration_ms=round(elapsed * 1e3, 3),
                model_version=self.core.engine.version,
            )
            # A failure is written at once, after the lines waiting before it.
            self._lines.add(detail, now=not (ok or quiet))

    # -- ingest -------------------------------------------------------------------

    @_rpc("unary")
    async def PushSamples(
        self, request: pb.PushSamplesRequest, context: Any, detail: dict[str, Any]
    ) -> pb.PushSamplesResponse:
        outcome = self.core.ingest(extract_batch(request.samples))
        detail.update(accepted=outcome.accepted, rejected=len(outcome.rejections))
        return _ack(outcome, pb.PushSamplesResponse)

    async def StreamSamples(
        self,
        request_iterator: AsyncIterator[pb.StreamSamplesRequest | Undecodable],
        context: Any,
    ) -> AsyncIterator[pb.StreamSamplesResponse]:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        detail: dict[str, Any] = {"batches": 0, "accepted": 0, "rejected": 0}
        received = self.core.metrics.msg_received.labels(
            SERVICE_NAME, "StreamSamples", "bidi_stream"
        )
        await self._admit_stream("StreamSamples", context)
        undecodable: Undecodable | None = None
        try:
            async for request in request_iterator:
                received.inc()
                if isinstance(request, Undecodable):
                    undecodable = request
                    break
                try:
                    outcome = self.core.ingest(extract_batch(request.samples))
                except InvalidArgument as exc:
                    # A batch-level rule (too many samples): reject the batch,
                    # keep the stream.
                    n = len(request.samples)
                    outcome = IngestOutcome(0, [(i, exc.field, str(exc)) for i in range(n)])
                    self.core.metrics.rejected.labels(field=exc.field).inc(n)
                detail["batches"] += 1
                detail["accepted"] += outcome.accepted
                detail["rejected"] += len(outcome.rejections)
                yield _ack(outcome, pb.StreamSamplesResponse)
            code = _ended_code(context)
        except BaseException as exc:
            code = grpc.StatusCode.CANCELLED if _is_cancel(exc) else grpc.StatusCode.INTERNAL
            if code == grpc.StatusCode.INTERNAL:
                log.exception("rpc_failed", rpc="StreamSamples")
            raise
        finally:
            self.open_streams -= 1
            if undecodable is None:
                self._done("StreamSamples", "bidi_stream", code, start, detail)
        if undecodable is not None:
            # The batches before it were acked; the stream ends here.
            await self._refuse_undecodable(
                "StreamSamples", "bidi_stream", undecodable, context, start=start, detail=detail
            )

    # -- answers ------------------------------------------------------------------

    @_rpc("unary")
    async def Forecast(
        self, request: pb.ForecastRequest, context: Any, detail: dict[str, Any]
    ) -> pb.ForecastResponse:
        key = tuple(request.peer_ids)
        detail["peers"] = len(key)
        if request.horizon_seconds != 0:  # NaN too: the core names the rule
            detail["horizon_seconds"] = request.horizon_seconds
            fc, covered = self.core.forecast_horizon(list(key), request.horizon_seconds)
            return pb.ForecastResponse(forecasts=forecast_messages(list(key), fc, covered))
        hit = self._forecasts.get(key)
        if hit is not None:
            self.core.count_served(hit.served)
            if self.log_rpcs:
                detail["sources"] = hit.sources
            return hit.message
        peer_ids = list(key)
        fc = self.core.forecast(peer_ids)
        if self.log_rpcs:
            detail["sources"] = source_counts(fc.source)
        reply = pb.ForecastResponse(forecasts=forecast_messages(peer_ids, fc))
        self._forecasts.put(key, reply, fc.source)
        return reply

    @_rpc("unary")
    async def Allocate(
        self, request: pb.AllocateRequest, context: Any, detail: dict[str, Any]
    ) -> pb.AllocateResponse:
        key = tuple(request.peer_ids)
        detail["peers"] = len(key)
        hit = self._allocations.get(key)
        if hit is not None:
            if self.log_rpcs:
                detail["sources"] = hit.sources
            return hit.message
        peer_ids = list(key)
        al = self.core.allocate(peer_ids)
        if self.log_rpcs:
            detail["sources"] = source_counts(al.source)
        version = al.forecasts.model_version
        reply = pb.AllocateResponse(
            allocations=[
                pb.PeerAllocation(
                    peer_id=pid,
                    action=a,
                    allocation_percent=pct,
                    allocated_mbps=mbps,
                    source=s,
                    reference_capacity_mbps=cap,
                    model_version=version,
                )
                for pid, a, pct, mbps, s, cap in zip(
                    peer_ids,
                    al.action.tolist(),
                    al.percent.tolist(),
                    al.allocated_mbps.tolist(),
                    al.source.tolist(),
                    al.capacity.tolist(),
                    strict=True,
                )
            ]
        )
        self._allocations.put(key, reply, al.source)
        return reply

    @_rpc("unary")
    async def GetPeer(
        self, request: pb.GetPeerRequest, context: Any, detail: dict[str, Any]
    ) -> pb.GetPeerResponse:
        view, acc = self.core.peer(request.peer_id)
        window = [
            pb.Sample(
                peer_id=view.peer_id,
                timestamp=_timestamp(t),
                **dict(zip(FEATURES, row, strict=True)),
            )
            for row, t in zip(view.window.tolist(), view.timestamps.tolist(), strict=True)
        ]
        return pb.GetPeerResponse(
            peer=pb.Peer(
                peer_id=view.peer_id,
                samples_in_window=len(window),
                sample_count=view.sample_count,
                last_seen=_timestamp(view.last_seen),
                window=window,
                live_accuracy=pb.LiveAccuracy(
                    scored_steps=acc.scored_steps,
                    model_mae_mbps=acc.model_mae,
                    baseline_mae_mbps=acc.baseline_mae,
                    guardrail_active=acc.guardrail_active,
                ),
            )
        )

    @_rpc("unary")
    async def ListPeers(
        self, request: pb.ListPeersRequest, context: Any, detail: dict[str, Any]
    ) -> pb.ListPeersResponse:
        rows, token = self.core.list_peers(request.page_size, request.page_token)
        return pb.ListPeersResponse(
            peers=[
                pb.Peer(
                    peer_id=r.peer_id,
                    samples_in_window=r.samples_in_window,
                    sample_count=r.sample_count,
                    last_seen=_timestamp(r.last_seen),
                )
                for r in rows
            ],
            next_page_token=token,
        )

    async def WatchForecasts(
        self, request: pb.WatchForecastsRequest | Undecodable, context: Any
    ) -> AsyncIterator[pb.WatchForecastsResponse]:
        start = time.perf_counter()
        if isinstance(request, Undecodable):
            await self._refuse_undecodable(
                "WatchForecasts", "server_stream", request, context, start=start, detail={}
            )
            return  # not reached: abort() raises
        code = grpc.StatusCode.OK
        detail: dict[str, Any] = {"pushed": 0}
        core = self.core
        wanted = list(request.peer_ids)
        try:
            if wanted:
                check_peer_ids(wanted, core.config.max_batch_peers)
            watcher = core.watch.subscribe(wanted or None)
        except BwpreddError as exc:
            refused = status_for(exc)
            self._done("WatchForecasts", "server_stream", refused, start, {"error": str(exc)})
            await context.abort(refused, str(exc))
            return  # not reached: abort() raises
        core.metrics.watchers.inc()
        try:
            # Start with the current forecast of every watched peer we hold.
            watcher.push(wanted or core.store.peer_ids())
            async for ids in watcher:
                # In chunks, so a watcher of every peer never holds the event
                # loop for one model run over all of them.
                for i in range(0, len(ids), WATCH_CHUNK):
                    kept, fc = core.forecast_tracked(ids[i : i + WATCH_CHUNK])
                    if fc is None:
                        continue
                    # One message at a time: a stream blocked on a client
                    # that does not read holds one, not a chunk of them.
                    for j, pid in enumerate(kept):
                        yield pb.WatchForecastsResponse(forecast=_forecast_message(pid, fc, j))
                    detail["pushed"] += len(kept)
        except BaseException as exc:
            code = grpc.StatusCode.CANCELLED if _is_cancel(exc) else grpc.StatusCode.INTERNAL
            if code == grpc.StatusCode.INTERNAL:
                log.exception("rpc_failed", rpc="WatchForecasts")
            raise
        finally:
            watcher.close()
            core.metrics.watchers.dec()
            self._done("WatchForecasts", "server_stream", code, start, detail)

    @_rpc("unary")
    async def Advise(
        self, request: pb.AdviseRequest, context: Any, detail: dict[str, Any]
    ) -> pb.AdviseResponse:
        check_peer_id(request.peer_id)
        advice, fc = self.core.advise(
            [request.peer_id],
            request.payload_bytes,
            _DATA_KINDS.get(request.data_kind, "unspecified"),
            request.compressibility if request.HasField("compressibility") else None,
        )
        return pb.AdviseResponse(advice=_advice_message(advice[0], fc, 0))

    @_rpc("unary")
    async def RankPeers(
        self, request: pb.RankPeersRequest, context: Any, detail: dict[str, Any]
    ) -> pb.RankPeersResponse:
        peer_ids = list(request.peer_ids)
        ranked, fc = self.core.rank_peers(
            peer_ids,
            request.payload_bytes,
            _DATA_KINDS.get(request.data_kind, "unspecified"),
            request.compressibility if request.HasField("compressibility") else None,
        )
        index = {p: i for i, p in enumerate(peer_ids)}
        detail["peers"] = len(peer_ids)
        return pb.RankPeersResponse(
            advice=[_advice_message(a, fc, index[a.peer_id]) for a in ranked]
        )


_DATA_KINDS = {
    pb.DATA_KIND_MEMORY: "memory",
    pb.DATA_KIND_TEXT: "text",
    pb.DATA_KIND_RANDOM: "random",
}
_MODES = {
    "datacenter": pb.NETWORK_MODE_DATACENTER,
    "internet": pb.NETWORK_MODE_INTERNET,
    "unknown": pb.NETWORK_MODE_UNKNOWN,
}
_CODECS = {"none": pb.CODEC_NONE, "lz4": pb.CODEC_LZ4, "zstd": pb.CODEC_ZSTD}


def _advice_message(a: Advice, fc: Forecasts, i: int) -> pb.Advice:
    """One Advice message; ``i`` is the peer's row in ``fc``."""
    return pb.Advice(
        forecast=_forecast_message(a.peer_id, fc, i),
        payload_bytes=a.payload_bytes,
        transfer_seconds=a.transfer_seconds,
        transfer_seconds_low=a.transfer_seconds_low,
        transfer_seconds_high=a.transfer_seconds_high,
        parallel_streams=a.parallel_streams,
        socket_buffer_bytes=a.socket_buffer_bytes,
        network_mode=_MODES[a.network_mode],
        compression=pb.Compression(codec=_CODECS[a.codec], level=a.level, ratio=a.ratio),
        confidence=a.confidence,
        latency_ms=a.latency_ms,
    )


def _ended_code(context: Any) -> grpc.StatusCode:
    """How a stream whose requests simply stopped really ended: a client that
    cancels or runs out of deadline ends the iterator like a clean close."""
    if context.cancelled():
        return grpc.StatusCode.CANCELLED
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.OK


def _is_cancel(exc: BaseException) -> bool:
    import asyncio

    return isinstance(exc, asyncio.CancelledError | GeneratorExit)
