"""The gateway's RouterPool over two real Router servicers on loopback (scripted backends): requests
spread by load, an unreachable Router is failed over and passed over, and a Router's own refusal is
the request's answer, not a reason to try another."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from test_router_subscription import ScriptedBackend, out, request

from baton.services.gateway import router_pool
from baton.services.gateway.router_pool import RouterPool
from baton.services.router.service import RouterService
from baton.shared.grpc_server import ServiceBinding, UnavailableError, start_server
from baton.shared.rpc import router_pb2_grpc


class Replica:
    def __init__(self, llama_dir: Path) -> None:
        self.backend = ScriptedBackend()
        self.service = RouterService(llama_dir, self.backend)
        self.server: object = None
        self.address = ""

    async def start(self) -> None:
        add = router_pb2_grpc.add_RouterServicer_to_server
        binding = ServiceBinding(add, self.service, "baton.v1.Router")
        self.server = await start_server([binding], "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.port}"  # type: ignore[attr-defined]

    async def stop(self) -> None:
        await self.service.drain(0.5)
        await self.server.server.stop(grace=0.5)  # type: ignore[attr-defined]


Scenario = Callable[[RouterPool, Replica, Replica], Awaitable[None]]


def run(llama_dir: Path, scenario: Scenario) -> None:
    async def main() -> None:
        a, b = Replica(llama_dir), Replica(llama_dir)
        await a.start()
        await b.start()
        pool = RouterPool([a.address, b.address])
        try:
            await asyncio.wait_for(scenario(pool, a, b), 30)
        finally:
            await pool.close()
            for replica in (a, b):
                if replica.server is not None:
                    await replica.stop()

    asyncio.run(main())


async def collect(pool: RouterPool, rid: str) -> list[int]:
    tokens: list[int] = []
    async for response in pool.generate(request(rid)):
        tokens.extend(response.token_ids)
    return tokens


def test_requests_go_to_the_router_with_the_fewest_in_flight(llama_dir: Path) -> None:
    async def scenario(pool: RouterPool, a: Replica, b: Replica) -> None:
        first = asyncio.ensure_future(collect(pool, "r1"))
        await a.backend.started.setdefault("r1", asyncio.Event()).wait()  # ties go to the first listed
        second = asyncio.ensure_future(collect(pool, "r2"))
        await b.backend.started.setdefault("r2", asyncio.Event()).wait()  # a has one in flight, b none
        assert pool.in_flight == [1, 1]
        a.backend.feed("r1").put_nowait(out("r1", 11, finish="length"))
        b.backend.feed("r2").put_nowait(out("r2", 22, finish="length"))
        assert await first == [11] and await second == [22]
        assert pool.in_flight == [0, 0]

    run(llama_dir, scenario)


def test_an_unreachable_router_is_failed_over_then_passed_over(llama_dir: Path) -> None:
    async def scenario(pool: RouterPool, a: Replica, b: Replica) -> None:
        await a.stop()
        a.server = None
        for rid in ("r1", "r2"):
            task = asyncio.ensure_future(collect(pool, rid))
            await b.backend.started.setdefault(rid, asyncio.Event()).wait()
            b.backend.feed(rid).put_nowait(out(rid, 7, finish="length"))
            assert await task == [7]
        assert pool._by_preference(())[0] == 1  # a is passed over: r2 went straight to b
        assert "r1" not in a.backend.started and "r2" not in a.backend.started

    run(llama_dir, scenario)


def test_a_routers_own_unavailable_is_the_answer_and_no_reason_to_pass_it_over(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(pool: RouterPool, a: Replica, b: Replica) -> None:
        task = asyncio.ensure_future(collect(pool, "r1"))
        await a.backend.started.setdefault("r1", asyncio.Event()).wait()
        a.backend.feed("r1").put_nowait(UnavailableError("no decode worker is available"))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await task
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "no decode worker" in (failed.value.details() or "")
        assert "r1" not in b.backend.started  # not tried again elsewhere
        assert pool._by_preference(())[0] == 0  # and a is not passed over

    monkeypatch.setattr(router_pool, "PASS_OVER_S", 60.0)
    run(llama_dir, scenario)
