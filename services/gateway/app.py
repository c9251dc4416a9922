"""The gateway's HTTP surface: OpenAI's /v1 routes, /health, /ready and /metrics, behind one edge
middleware (request ids, API key, the bound on requests in flight) and one error mapping."""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import baton
from baton.services.gateway.chat import create_chat_completion
from baton.services.gateway.completions import create_completion
from baton.services.gateway.context import GatewayContext
from baton.services.gateway.errors import (
    OpenAIError,
    from_grpc,
    from_parameter_error,
    from_validation,
    unavailable,
)
from baton.services.gateway.protocol import ChatCompletionRequest, CompletionRequest, ParameterError
from baton.services.gateway.serving import ClientDisconnected
from baton.services.lifecycle import request_logger
from baton.shared.config import GatewayConfig

logger = logging.getLogger(__name__)
request_log = request_logger(__name__)

READY_TIMEOUT_S = 2.0
_REQUEST_ID = re.compile(r"[A-Za-z0-9._~:-]{1,128}")


def create_app(config: GatewayConfig) -> FastAPI:
    ctx = GatewayContext(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await ctx.router.close()

    app = FastAPI(title="Baton", summary="OpenAI-compatible API of a Baton cluster", lifespan=lifespan)
    app.state.ctx = ctx
    _add_error_handlers(app)
    started = int(time.time())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(ctx, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(ctx, body, request)

    async def model_card(requested: str | None) -> dict[str, Any]:
        model = await ctx.router.served_model(requested)
        return {
            "id": model.name,
            "object": "model",
            "created": started,
            "owned_by": "baton",
            "root": model.name,
            "max_model_len": model.max_model_len,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [await model_card(None)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        return await model_card(model)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": baton.__version__}

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the gateway process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: the Router answers and at least one decode worker is alive."""
        stats = await ctx.router.cluster_stats(READY_TIMEOUT_S)
        if stats is None:
            return unavailable(f"the router at {ctx.router.addresses} does not answer").response()
        if stats.num_decode_workers == 0:
            return unavailable("no decode worker is alive").response()
        return JSONResponse(
            {
                "status": "ready",
                "decode_workers": stats.num_decode_workers,
                "prefill_workers": stats.num_prefill_workers,
            }
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        stats = await ctx.router.cluster_stats(READY_TIMEOUT_S)
        return Response(ctx.metrics.exposition(stats), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(EdgeMiddleware, config=config)  # type: ignore[arg-type]
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> Response:
        return exc.response()

    @app.exception_handler(ParameterError)
    async def bad_parameter(request: Request, exc: ParameterError) -> Response:
        return from_parameter_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return from_validation(exc).response()

    @app.exception_handler(grpc.aio.AioRpcError)
    async def router_error(request: Request, exc: grpc.aio.AioRpcError) -> Response:
        return from_grpc(exc).response()

    @app.exception_handler(ClientDisconnected)
    async def gone(request: Request, exc: ClientDisconnected) -> Response:
        request_log.info("request %s: client disconnected, aborted", request.state.request_id)
        return Response(status_code=499)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = "request_too_large" if exc.status_code == 413 else None
        return OpenAIError(exc.status_code, str(exc.detail), type=kind, code=code).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("request %s failed", getattr(request.state, "request_id", "?"))
        return OpenAIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()


class EdgeMiddleware:
    """Every HTTP request: takes or makes its X-Request-Id (echoed on the response), checks the API
    key on /v1 routes (constant-time), refuses bodies over `max_body_bytes` with 413 (by their
    Content-Length before reading, or as soon as a chunked one grows past it), and refuses generation
    requests beyond this process's share of `max_pending_requests` with 503 before any work is spent."""

    def __init__(self, app: ASGIApp, config: GatewayConfig) -> None:
        self.app = app
        self.api_key = config.api_key.get_secret_value().encode() if config.api_key else None
        self.max_pending = config.max_pending_per_process
        self.max_body_bytes = config.max_body_bytes
        self.pending = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        valid_id = _REQUEST_ID.fullmatch(request_id) is not None
        reply = _with_request_id(send, request_id if valid_id else uuid.uuid4().hex)
        if not valid_id:
            error = OpenAIError(
                400, "X-Request-Id must be 1 to 128 letters, digits or ._~:- characters", param="X-Request-Id"
            )
            await error.response()(scope, receive, reply)
            return
        scope.setdefault("state", {})["request_id"] = request_id
        path: str = scope["path"]
        if path.startswith("/v1/") and self.api_key is not None and not self._authorized(headers):
            error = OpenAIError(401, "invalid or missing API key", code="invalid_api_key")
            await error.response()(scope, receive, reply)
            return
        if scope["method"] != "POST" or not path.startswith("/v1/"):
            await self.app(scope, receive, reply)
            return
        if _declared_length(headers) > self.max_body_bytes:
            await _too_large(self.max_body_bytes).response()(scope, receive, reply)
            return
        receive = _bounded(receive, self.max_body_bytes)
        if self.pending >= self.max_pending:
            error = unavailable(f"the gateway has {self.pending} requests in flight, its limit; retry later")
            await error.response()(scope, receive, reply)
            return
        self.pending += 1
        try:
            await self.app(scope, receive, reply)
        finally:
            self.pending -= 1

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        assert self.api_key is not None
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key)


class _BodyTooLarge(HTTPException):
    """A request body grew past the gateway's limit while it was being read (an HTTPException, so that
    FastAPI's body parsing passes it on as it is)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, _too_large(limit).message)


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"request body is larger than {limit} bytes", code="request_too_large")


def _declared_length(headers: Headers) -> int:
    """The body's Content-Length; 0 when absent (a chunked body is counted as it arrives), and no
    limit passes a malformed one (h11 has refused those already)."""
    text = headers.get("content-length", "0")
    return int(text) if text.isdigit() else 0


def _bounded(receive: Receive, limit: int) -> Receive:
    """`receive` that raises _BodyTooLarge once the body read so far passes `limit` bytes."""
    seen = 0

    async def bounded() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge(limit)
        return message

    return bounded


def _with_request_id(send: Send, request_id: str) -> Send:
    async def reply(message: Message) -> None:
        if message["type"] == "http.response.start":
            MutableHeaders(scope=message)["X-Request-Id"] = request_id
        await send(message)

    return reply
