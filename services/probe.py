"""`baton probe`: a health check for container runtimes that have no native gRPC probe (Compose's
`healthcheck`, Docker's HEALTHCHECK). A gRPC address is asked through grpc.health.v1; an http(s) URL
is fetched. Exit 0 when the service says it serves, 1 otherwise (with the reason on stderr)."""

from __future__ import annotations

import sys

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton.shared.grpc_tls import GrpcTls, sync_channel


def probe(target: str, service: str = "", timeout_s: float = 2.0, tls: GrpcTls | None = None) -> str | None:
    """None if `target` (host:port of a gRPC server, asked over TLS when `tls`, or an http(s) URL)
    serves; else why not."""
    if target.startswith(("http://", "https://")):
        return _probe_http(target, timeout_s)
    return _probe_grpc(target, service, timeout_s, tls)


def _probe_http(url: str, timeout_s: float) -> str | None:
    try:
        reply = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return f"{url}: {exc!r}"
    return None if reply.status_code == 200 else f"{url}: HTTP {reply.status_code} {reply.text[:200]}"


def _probe_grpc(address: str, service: str, timeout_s: float, tls: GrpcTls | None) -> str | None:
    with sync_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return f"{address}: {exc.code().name} {exc.details()}"  # type: ignore[attr-defined]
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def main(target: str, service: str, timeout_s: float, tls: GrpcTls | None = None) -> int:
    reason = probe(target, service, timeout_s, tls)
    if reason is not None:
        print(f"baton probe: {reason}", file=sys.stderr)
        return 1
    return 0
