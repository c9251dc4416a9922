"""The gateway's connection to the Router: the served model (asked once, then remembered), requests
and their responses, cluster stats and readiness.

Requests are Submitted for this gateway's subscriber, and every request's responses come back on one
Subscribe stream, batched: one gRPC message per Router wake-up instead of one per token per request,
which is most of what a gateway streaming hundreds of completions spends otherwise."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterable

import grpc

from baton.services.gateway.errors import OpenAIError, unavailable
from baton.shared.background import BackgroundTasks
from baton.shared.grpc_server import open_channel
from baton.shared.grpc_tls import GrpcTls
from baton.shared.rpc import router_pb2, router_pb2_grpc
from baton.shared.subscription import Subscription, rpc_error

logger = logging.getLogger(__name__)

INFO_TIMEOUT_S = 5.0
ABORT_TIMEOUT_S = 5.0


class RouterClient:
    def __init__(self, address: str, tls: GrpcTls | None = None) -> None:
        self.address = address
        self.subscriber = f"gateway-{uuid.uuid4().hex[:12]}"
        self._channel = open_channel(address, tls)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._model: router_pb2.ModelInfo | None = None
        self._model_lock = asyncio.Lock()
        self._responses: Subscription[router_pb2.GenerateResponse] = Subscription(
            f"the router's output stream at {address}",
            lambda: self._stub.Subscribe(router_pb2.SubscribeRequest(subscriber=self.subscriber)),
            _split,
            merge_responses,
            lambda response: response.finish_reason != 0,
        )
        self._aborts = BackgroundTasks()

    async def model(self) -> router_pb2.ModelInfo:
        """The Router's model (name, context length, vocabulary); 503 while the Router is unreachable."""
        if self._model is not None:
            return self._model
        async with self._model_lock:
            if self._model is None:
                request = router_pb2.ListModelsRequest()
                try:
                    reply = await self._stub.ListModels(request, timeout=INFO_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    reason = f"the router at {self.address} is not reachable: {exc.code().name}"
                    raise unavailable(reason) from exc
                self._model = reply.models[0]
        return self._model

    async def served_model(self, requested: str | None) -> router_pb2.ModelInfo:
        """The model a request names (None: the only one); 404 for any other name."""
        return model_named(await self.model(), requested)

    def connected(self) -> bool:
        """The channel to the Router is up (an UNAVAILABLE on an up channel came from the Router)."""
        return self._channel.get_state() is grpc.ChannelConnectivity.READY

    def generate(self, request: router_pb2.GenerateRequest) -> SubmittedRequest:
        """The request's responses, read like a Generate call's (`request.request_id` must be set)."""
        return SubmittedRequest(self, request)

    async def cluster_stats(self, timeout_s: float) -> router_pb2.ClusterStats | None:
        """The workers' counters, or None when the Router does not answer in time."""
        try:
            return await self._stub.GetClusterStats(router_pb2.GetClusterStatsRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return None

    async def close(self) -> None:
        await self._aborts.wait(ABORT_TIMEOUT_S)
        await self._responses.close()
        await self._channel.close()

    async def _abort(self, request_id: str) -> None:
        try:
            await self._stub.Abort(router_pb2.AbortRequest(request_id=request_id), timeout=ABORT_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:  # the router went away: it aborts what it held itself
            logger.warning("request %s: abort not delivered: %s", request_id, exc.details())


def model_named(model: router_pb2.ModelInfo, requested: str | None) -> router_pb2.ModelInfo:
    """`model` if the request names it (or none); 404 for any other name."""
    if requested is not None and requested != model.name:
        raise OpenAIError(
            404, f"The model `{requested[:200]}` does not exist. This server serves `{model.name}`.",
            param="model", code="model_not_found",
        )  # fmt: skip
    return model


class SubmittedRequest:
    """One request on the shared stream: iterate for its responses (gRPC errors are raised as a
    Generate call raises them); `cancel()` aborts it unless it ended."""

    def __init__(self, client: RouterClient, request: router_pb2.GenerateRequest) -> None:
        self._client = client
        self._request = request
        self._submitted = False
        self._ended = False
        self._detached = False

    def __aiter__(self) -> AsyncIterator[router_pb2.GenerateResponse]:
        return self._read()

    def cancel(self) -> None:
        if not self._ended and self._submitted:
            self._client._aborts.spawn(self._client._abort(self._request.request_id))
        self._ended = True
        self._detach()

    def _detach(self) -> None:
        if not self._detached:
            self._detached = True
            self._client._responses.detach(self._request.request_id)

    async def _read(self) -> AsyncIterator[router_pb2.GenerateResponse]:
        client = self._client
        try:
            responses = client._responses.attach(self._request.request_id)
        except ValueError as exc:
            self._detached = True  # the id is another request's
            raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        try:
            await client._responses.open()
            submit = router_pb2.SubmitRequest(request=self._request, subscriber=client.subscriber)
            self._submitted = True  # from here a cancel aborts it: the router may have it already
            await client._stub.Submit(submit)
            async for response in responses:
                self._ended = response.finish_reason != 0
                yield response
        except grpc.aio.AioRpcError:
            self._ended = True  # refused, failed, or the stream was lost: over on the router too
            raise
        finally:
            if self._ended:
                self._detach()


def merge_responses(
    first: router_pb2.GenerateResponse, then: router_pb2.GenerateResponse
) -> router_pb2.GenerateResponse:
    """One response carrying both pieces (`first` is extended in place); the end state is `then`'s."""
    first.token_ids.extend(then.token_ids)
    first.text += then.text
    first.logprobs.extend(then.logprobs)
    first.finish_reason = then.finish_reason
    first.usage.CopyFrom(then.usage)
    first.error = then.error
    if then.HasField("stop_token_id"):
        first.stop_token_id = then.stop_token_id
    return first


def _split(
    batch: router_pb2.GenerateResponseBatch,
) -> Iterable[tuple[str, router_pb2.GenerateResponse | BaseException]]:
    for response in batch.responses:
        yield response.request_id, response
    for failure in batch.failures:
        yield failure.request_id, rpc_error(_STATUS_BY_CODE[failure.code], failure.message)


_STATUS_BY_CODE = {code.value[0]: code for code in grpc.StatusCode}
