"""The gateway's Routers: one `RouterClient` per Router replica, each request sent to the one with the
fewest of this gateway's requests in flight. A request whose Router cannot be reached before its first
token is sent to the next one, and that Router is passed over for a while, so one Router dying or
restarting costs its in-flight streams, not the gateway's service. With one address it behaves as the
single client does."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc

from baton.services.gateway.errors import OpenAIError
from baton.services.gateway.router_client import RouterClient, SubmittedRequest, model_named
from baton.shared.grpc_tls import GrpcTls
from baton.shared.rpc import router_pb2

logger = logging.getLogger(__name__)

PASS_OVER_S = 5.0
"""How long a Router found unreachable is passed over (unless every Router is)."""


class RouterPool:
    def __init__(self, addresses: list[str], tls: GrpcTls | None = None) -> None:
        self.clients = [RouterClient(address, tls) for address in addresses]
        self.in_flight = [0] * len(self.clients)
        self._passed_over_until = [0.0] * len(self.clients)

    @property
    def addresses(self) -> str:
        return ", ".join(c.address for c in self.clients)

    async def model(self) -> router_pb2.ModelInfo:
        """The served model, from the first Router that answers (503 if none does)."""
        last: OpenAIError | None = None
        for index in self._by_preference(()):
            try:
                return await self.clients[index].model()
            except OpenAIError as exc:  # the client's 503; the next Router may answer
                last = exc
        assert last is not None
        raise last

    async def served_model(self, requested: str | None) -> router_pb2.ModelInfo:
        """The model a request names (None: the only one); 404 for any other name."""
        return model_named(await self.model(), requested)

    def generate(self, request: router_pb2.GenerateRequest) -> PooledRequest:
        """The request's responses, read like a Generate call's (`request.request_id` must be set)."""
        return PooledRequest(self, request)

    async def cluster_stats(self, timeout_s: float) -> router_pb2.ClusterStats | None:
        """The first answering Router's view of the workers (None when none answers in time)."""
        for index in self._by_preference(()):
            stats = await self.clients[index].cluster_stats(timeout_s)
            if stats is not None:
                return stats
            self._pass_over(index)
        return None

    async def close(self) -> None:
        for client in self.clients:
            await client.close()

    def _by_preference(self, exclude: tuple[int, ...] | set[int]) -> list[int]:
        """Routers not excluded: those not passed over first, then by requests in flight."""
        now = time.monotonic()
        candidates = [i for i in range(len(self.clients)) if i not in exclude]
        return sorted(candidates, key=lambda i: (self._passed_over_until[i] > now, self.in_flight[i], i))

    def _pass_over(self, index: int) -> None:
        if len(self.clients) > 1 and self._passed_over_until[index] < time.monotonic():
            logger.warning(
                "router %s is unreachable: passed over for %g s", self.clients[index].address, PASS_OVER_S
            )
        self._passed_over_until[index] = time.monotonic() + PASS_OVER_S


class PooledRequest:
    """One request on the pool: iterate for its responses; `cancel()` aborts it unless it ended."""

    def __init__(self, pool: RouterPool, request: router_pb2.GenerateRequest) -> None:
        self._pool = pool
        self._request = request
        self._current: SubmittedRequest | None = None
        self._cancelled = False

    def __aiter__(self) -> AsyncIterator[router_pb2.GenerateResponse]:
        return self._read()

    def cancel(self) -> None:
        self._cancelled = True
        if self._current is not None:
            self._current.cancel()

    async def _read(self) -> AsyncIterator[router_pb2.GenerateResponse]:
        pool, tried = self._pool, set[int]()
        while True:
            index = pool._by_preference(tried)[0]
            client = pool.clients[index]
            self._current = client.generate(self._request)
            pool.in_flight[index] += 1
            responded = False
            try:
                async for response in self._current:
                    responded = True
                    yield response
                return
            except grpc.aio.AioRpcError as exc:
                unreachable = exc.code() is grpc.StatusCode.UNAVAILABLE and not client.connected()
                if unreachable:
                    pool._pass_over(index)
                tried.add(index)
                if responded or not unreachable or self._cancelled or len(tried) == len(pool.clients):
                    raise
                logger.warning(
                    "request %s: router %s unreachable (%s): sent to another",
                    self._request.request_id, client.address, exc.details(),
                )  # fmt: skip
            finally:
                pool.in_flight[index] -= 1
