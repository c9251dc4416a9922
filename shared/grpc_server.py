"""What every Baton gRPC server has: health checking (grpc.health.v1), reflection, and one
interceptor mapping exceptions to status codes (bad input is INVALID_ARGUMENT, never INTERNAL)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from baton.shared.errors import CapacityError, ConflictError, UnavailableError
from baton.shared.grpc_tls import GrpcTls, add_port, aio_channel

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 2**20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Small HTTP/2 flow-control windows (16 KiB a stream, not grown with the bandwidth-delay
    # product): a token stream's reader that falls behind pushes back on the writer within a few
    # steps, and the writer merges its queued outputs (fewer, larger messages at every hop) instead
    # of megabytes of one-token messages piling up unread. Our gRPC carries control and token
    # messages only (KV goes over UCX), so the small windows cost no bandwidth that matters.
    # Measured on the served anchor (benchmarks/NOTES.md): probing off 4.17-4.72 s against
    # 5.58-6.74 s; then 16 KiB windows 4.83-4.92 s against 5.35-5.46 s.
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 16384),
]


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The one mapping of Baton's exceptions to gRPC status codes (no imports here: the first error a
    torch-free service meets must not load the engine)."""
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, KeyError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, CapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, UnavailableError | ConnectionError):  # EngineDeadError, TransferError included
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, ConflictError):
        return grpc.StatusCode.ABORTED
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL


def error_message(exc: BaseException) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns an exception escaping a handler into the status `status_for` gives, with its message."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _wrap_unary(inner: Any, method: str) -> Any:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await inner(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, method)

    return call


def _wrap_stream(inner: Any, method: str) -> Any:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in inner(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, method)

    return call


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        logger.exception("%s failed", method)
    await context.abort(code, error_message(exc))


@dataclass(frozen=True)
class ServiceBinding:
    """One service to serve: its generated `add_*Servicer_to_server`, the servicer, its full name."""

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    full_name: str


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer

    async def set_serving(self, serving: bool) -> None:
        """Flip every service's health status (NOT_SERVING while draining)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self.service_names:
            await self.health.set(name, status)

    service_names: Sequence[str] = ()


async def start_server(
    bindings: Sequence[ServiceBinding], host: str, port: int, tls: GrpcTls | None = None
) -> RunningServer:
    """Serve the bindings plus health and reflection on host:port (0 picks a free port), over TLS
    when `tls` (grpc_tls.load's)."""
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()], options=CHANNEL_OPTIONS)
    for binding in bindings:
        binding.add_to_server(binding.servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [b.full_name for b in bindings]
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    bound = add_port(server, f"{host}:{port}", tls)
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}")
    await server.start()
    running = RunningServer(server, bound, health_servicer, ["", *names])
    await running.set_serving(True)
    return running


def open_channel(address: str, tls: GrpcTls | None = None) -> grpc.aio.Channel:
    """A channel to a Baton gRPC server with Baton's options, over TLS when `tls`."""
    return aio_channel(address, tls, CHANNEL_OPTIONS)
