"""The gateway's connection to the Router: the served model (asked once, then remembered), Generate
streams, cluster stats and readiness."""

from __future__ import annotations

import asyncio

import grpc

from baton.services.gateway.errors import OpenAIError, unavailable
from baton.shared.grpc_server import open_channel
from baton.shared.rpc import router_pb2, router_pb2_grpc

INFO_TIMEOUT_S = 5.0


class RouterClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = open_channel(address)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._model: router_pb2.ModelInfo | None = None
        self._model_lock = asyncio.Lock()

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
        model = await self.model()
        if requested is not None and requested != model.name:
            raise OpenAIError(
                404, f"The model `{requested[:200]}` does not exist. This server serves `{model.name}`.",
                param="model", code="model_not_found",
            )  # fmt: skip
        return model

    def generate(self, request: router_pb2.GenerateRequest) -> grpc.aio.UnaryStreamCall:
        return self._stub.Generate(request)

    async def cluster_stats(self, timeout_s: float) -> router_pb2.ClusterStats | None:
        """The workers' counters, or None when the Router does not answer in time."""
        try:
            return await self._stub.GetClusterStats(router_pb2.GetClusterStatsRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return None

    async def close(self) -> None:
        await self._channel.close()
