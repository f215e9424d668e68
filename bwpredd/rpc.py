"""The servicer's gRPC edge: registration, and the cross-cutting work of
every call in one place.

:func:`unary` wraps a unary handler and :func:`stream` a streaming one; both
hand the end of the call to one :class:`Calls`, which maps domain exceptions
to status codes, counts and times the call (``grpc_server_*`` metrics) and
writes its log line. Handlers only translate protobuf <-> domain types and
fill ``detail``, the fields of their log line. Bytes that are not a valid
request reach the wrapper as :class:`Undecodable` and end the call
INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from bwpredd._proto.bwpred.v1 import bwpred_pb2 as pb
from bwpredd.errors import BwpreddError, InvalidArgument, PeerNotFound, ResourceExhausted
from bwpredd.logging import DeferredLines, RateLimitedLine, get_logger
from bwpredd.metrics import Metrics

__all__ = [
    "SERVICE_NAME",
    "Calls",
    "Undecodable",
    "add_to_server",
    "status_for",
    "stream",
    "unary",
]

_SERVICE = pb.DESCRIPTOR.services_by_name["BandwidthPredictorService"]
SERVICE_NAME = _SERVICE.full_name
# A client can send undecodable bytes at will: one log line per this many
# seconds at most, counting the ones held back.
UNDECODABLE_LOG_INTERVAL_S = 10.0
log = get_logger(__name__)
Detail = dict[str, Any]
Req = TypeVar("Req")
Resp = TypeVar("Resp")


class Undecodable(Exception):
    """What the deserializer hands a handler for bytes that are not a valid
    request message, so the call ends INVALID_ARGUMENT (grpcio would answer
    UNKNOWN, and on a stream raise out of the request iterator). Raised by
    the request iterator of a client stream when it meets one."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
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


def add_to_server(servicer: Any, server: Any) -> None:
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


class Calls:
    """How every call ends: its status, metrics and log line.

    Args:
        metrics: where the ``grpc_server_*`` metrics are.
        log_rpcs: write one line per call (failures are always written).
        model_version: the model serving now, for the log line.
    """

    def __init__(self, metrics: Metrics, log_rpcs: bool, model_version: Callable[[], str]) -> None:
        self.metrics = metrics
        self.log_rpcs = log_rpcs
        self.model_version = model_version
        # Metric children bound once per (method, type, code): a labels()
        # look-up per call costs more than the increment.
        self._children: dict[tuple[str, str, grpc.StatusCode], tuple[Any, Any]] = {}
        self._lines = DeferredLines(log, "rpc")
        self._undecodable = RateLimitedLine(log, "undecodable_request", UNDECODABLE_LOG_INTERVAL_S)

    def done(
        self,
        name: str,
        kind: str,
        code: grpc.StatusCode,
        start: float,
        detail: Detail,
        *,
        quiet: bool = False,
    ) -> None:
        """Count and time a call that ended with ``code``; queue its log
        line (written at once for a failure unless ``quiet``)."""
        elapsed = time.perf_counter() - start
        key = (name, kind, code)
        children = self._children.get(key)
        if children is None:
            m = self.metrics
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
                model_version=self.model_version(),
            )
            # A failure is written at once, after the lines waiting before it.
            self._lines.add(detail, now=not (ok or quiet))

    async def refuse(
        self,
        name: str,
        kind: str,
        exc: BwpreddError,
        context: Any,
        *,
        start: float,
        detail: Detail,
    ) -> None:
        """End the call with the status of a domain exception."""
        code = status_for(exc)
        detail["error"] = str(exc)
        # Count before abort(): it sends the status at once, so a client
        # could otherwise see the error before the metric moves.
        self.done(name, kind, code, start, detail)
        await context.abort(code, str(exc))

    async def refuse_undecodable(
        self,
        name: str,
        kind: str,
        request: Undecodable,
        context: Any,
        *,
        start: float,
        detail: Detail,
    ) -> None:
        """End the call INVALID_ARGUMENT: counted like any call, logged at
        most once per UNDECODABLE_LOG_INTERVAL_S (its rpc line only with
        log_rpcs, like a successful call's)."""
        detail["error"] = request.reason
        self.done(name, kind, grpc.StatusCode.INVALID_ARGUMENT, start, detail, quiet=True)
        self._undecodable.warning(rpc=name, error=request.reason)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)

    async def received(
        self, name: str, kind: str, requests: AsyncIterator[Any]
    ) -> AsyncIterator[Any]:
        """The requests of a client stream, each counted as received; one
        that could not be decoded raises :class:`Undecodable`."""
        counter = self.metrics.msg_received.labels(SERVICE_NAME, name, kind)
        async for request in requests:
            counter.inc()
            if isinstance(request, Undecodable):
                raise request
            yield request


class _Servicer(Protocol):
    calls: Calls


S = TypeVar("S", bound=_Servicer)


def unary(
    method: Callable[[S, Req, Any, Detail], Awaitable[Resp]],
) -> Callable[[S, Req | Undecodable, Any], Awaitable[Resp]]:
    """Wrap a unary handler ``method(self, request, context, detail) -> reply``."""
    name = method.__name__

    @functools.wraps(method)
    async def handler(self: S, request: Req | Undecodable, context: Any) -> Resp:
        calls = self.calls
        start = time.perf_counter()
        detail: Detail = {}
        if isinstance(request, Undecodable):
            await calls.refuse_undecodable(
                name, "unary", request, context, start=start, detail=detail
            )
            raise AssertionError("not reached: abort() raises")
        try:
            reply = await method(self, request, context, detail)
        except BwpreddError as exc:
            await calls.refuse(name, "unary", exc, context, start=start, detail=detail)
            raise AssertionError("not reached: abort() raises") from None
        except Exception as exc:
            log.exception("rpc_failed", rpc=name)
            calls.done(name, "unary", grpc.StatusCode.INTERNAL, start, detail)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
            raise AssertionError("not reached: abort() raises") from None
        calls.done(name, "unary", grpc.StatusCode.OK, start, detail)
        return reply

    return handler


def stream(
    kind: str,
) -> Callable[
    [Callable[[S, Any, Any, Detail], AsyncGenerator[Resp, None]]],
    Callable[[S, Any, Any], AsyncIterator[Resp]],
]:
    """Wrap a streaming handler ``method(self, request(s), context, detail)``, an async
    generator of replies. ``kind`` is ``server_stream`` (one request) or
    ``bidi_stream`` (the handler gets the requests, counted as received).

    A domain exception ends the stream with its status; a stream that ends
    any other way is counted CANCELLED (the client went away) or INTERNAL,
    and the exception goes on.
    """
    client_streaming = kind == "bidi_stream"

    def decorate(
        method: Callable[[S, Any, Any, Detail], AsyncGenerator[Resp, None]],
    ) -> Callable[[S, Any, Any], AsyncIterator[Resp]]:
        name = method.__name__

        @functools.wraps(method)
        async def handler(self: S, request: Any, context: Any) -> AsyncIterator[Resp]:
            calls = self.calls
            start = time.perf_counter()
            detail: Detail = {}
            try:
                if client_streaming:
                    request = calls.received(name, kind, request)
                elif isinstance(request, Undecodable):
                    raise request
                # aclosing: a stream ended early closes the handler (and what
                # it holds) now, not when the garbage collector gets to it.
                async with contextlib.aclosing(method(self, request, context, detail)) as replies:
                    async for reply in replies:
                        yield reply
                code = _ended_code(context) if client_streaming else grpc.StatusCode.OK
            except Undecodable as exc:
                # On a client stream the batches before it were answered; the
                # stream ends here.
                await calls.refuse_undecodable(name, kind, exc, context, start=start, detail=detail)
                return
            except BwpreddError as exc:
                await calls.refuse(name, kind, exc, context, start=start, detail=detail)
                return
            except BaseException as exc:
                code = grpc.StatusCode.CANCELLED if _is_cancel(exc) else grpc.StatusCode.INTERNAL
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("rpc_failed", rpc=name)
                calls.done(name, kind, code, start, detail)
                raise
            calls.done(name, kind, code, start, detail)

        return handler

    return decorate


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
    return isinstance(exc, asyncio.CancelledError | GeneratorExit)
