"""The standard ``grpc.health.v1.Health`` service, with Watch streams that end at shutdown.

grpc's own asyncio servicer keeps every Watch stream open until its client
leaves, so one open watch held a graceful stop for its whole grace period.
Here :meth:`Health.close` sets every service NOT_SERVING, each watcher sends
that last status and its stream ends with OK, and the drain finishes as soon
as the other calls have.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
SERVICE_NAME = "grpc.health.v1.Health"


class Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # grpc_health has no stubs
    """Check and Watch over a map of service name to status."""

    def __init__(self) -> None:
        self._status: dict[str, health_pb2.HealthCheckResponse.ServingStatus] = {"": SERVING}
        self._changed = asyncio.Condition()
        self._closed = False

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Send the service's status now and on every change; end after close()."""
        sent = None

        def news() -> bool:
            return self._closed or self._status.get(request.service, SERVICE_UNKNOWN) != sent

        while True:
            async with self._changed:
                await self._changed.wait_for(news)
                status = self._status.get(request.service, SERVICE_UNKNOWN)
                closed = self._closed
            # Written outside the lock: a client that stops reading blocks
            # only its own stream, never set() or the other watchers.
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            if closed:
                return

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        """Set ``service``'s status (ignored once closed)."""
        async with self._changed:
            if self._closed:
                return
            self._status[service] = status
            self._changed.notify_all()

    async def close(self) -> None:
        """Every service NOT_SERVING for good; Watch streams send it and end."""
        async with self._changed:
            self._closed = True
            for service in self._status:
                self._status[service] = NOT_SERVING
            self._changed.notify_all()
