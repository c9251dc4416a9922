"""The decode worker's Reserve against the calls that can overtake it or cut it short, on a real
engine and a real Redis registry: an Abort that arrives before its Reserve (the router gave up while
Reserve was still on the way), one that arrives while the engine is reserving (and finds nothing
tracked yet), and a Reserve whose caller goes away midway. In every case the reservation is refused
or undone: no block stays held, nothing is left tracked, the receiving process is never told of it,
and the registry keeps no record. (Seen in CI under load: a cancelled request's 19 blocks held on
the decode worker, past the leak check's wait.)"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from baton.services.decode.service import DecodeService
from baton.shared.config import EngineConfig, RegistryConfig, WorkerConfig
from baton.shared.engine.async_engine import AsyncEngine
from baton.shared.grpc_server import ConflictError
from baton.shared.registry import Registry
from baton.shared.rpc import common_pb2, worker_pb2

PROMPT = list(range(5, 45))


class RecordingReceiver:
    """Stands in for the receiving process's link: records which reservations it was told of."""

    def __init__(self) -> None:
        self.reserved: list[str] = []

    def reserve(self, request_id: str, block_ids: list[int], ready: Any) -> None:
        self.reserved.append(request_id)


def reserve_request(rid: str) -> worker_pb2.ReserveRequest:
    return worker_pb2.ReserveRequest(
        request_id=rid,
        prompt_token_ids=PROMPT,
        sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0.0),
    )


Scenario = Callable[[DecodeService, AsyncEngine, threading.Event, threading.Event], Awaitable[None]]


def run(llama_dir: Path, redis_url: str, scenario: Scenario, namespace: str) -> RecordingReceiver:
    """Runs `scenario` with a decode service whose engine's reserve waits for `release` once
    `hold` is set, then checks that nothing is held, tracked or recorded."""
    receiver = RecordingReceiver()

    async def main() -> None:
        engine_config = EngineConfig(model=str(llama_dir), num_kv_blocks=64, max_model_len=256)
        engine = AsyncEngine.from_config(engine_config)
        reserve, hold, release = engine.core.reserve, threading.Event(), threading.Event()

        def held_reserve(*args: Any, **kwargs: Any) -> Any:
            if hold.is_set():
                release.wait(10)
            return reserve(*args, **kwargs)

        engine.core.reserve = held_reserve  # type: ignore[method-assign]
        engine.start()
        config = WorkerConfig(
            role="decode",
            engine=EngineConfig(model=str(llama_dir)),
            registry=RegistryConfig(redis_url=redis_url, namespace=namespace),
        )
        registry = Registry(redis_url, namespace=namespace)
        service = DecodeService(config, engine, registry, "decode-0", 2, receiver)  # type: ignore[arg-type]
        try:
            await asyncio.wait_for(scenario(service, engine, hold, release), 20)
            for _ in range(100):  # the undo's abort and record ending run in the background
                await asyncio.sleep(0.05)
                stats = await engine.call(lambda core: core.stats())
                records = await registry.live_requests()
                if not service.request_ids and not stats.num_held_blocks and not records:
                    break
            assert service.request_ids == []
            await engine.call(lambda core: core.assert_no_leaks())
            assert await registry.live_requests() == []
        finally:
            release.set()
            engine.shutdown()
            await registry.close()

    asyncio.run(main())
    return receiver


def test_an_abort_that_overtook_its_reserve_refuses_it(llama_dir: Path, redis_url: str) -> None:
    async def scenario(service: DecodeService, engine: AsyncEngine, *_: Any) -> None:
        asked, reserve = [], engine.core.reserve

        def counted_reserve(request_id: str, *args: Any, **kwargs: Any) -> Any:
            asked.append(request_id)
            return reserve(request_id, *args, **kwargs)

        engine.core.reserve = counted_reserve  # type: ignore[method-assign]
        found = await service.Abort(worker_pb2.AbortRequest(request_id="r~1"), None)  # type: ignore[arg-type]
        assert not found.found
        with pytest.raises(ConflictError, match="aborted before it was reserved"):
            await service.Reserve(reserve_request("r~1"), None)  # type: ignore[arg-type]
        await service.Reserve(reserve_request("r~2"), None)  # type: ignore[arg-type]  # others unaffected
        await service.Abort(worker_pb2.AbortRequest(request_id="r~2"), None)  # type: ignore[arg-type]
        assert asked == ["r~2"]  # the refused one cost the engine nothing

    receiver = run(llama_dir, redis_url, scenario, "race-early")
    assert receiver.reserved == ["r~2"]


def test_an_abort_while_the_engine_reserves_undoes_the_reservation(llama_dir: Path, redis_url: str) -> None:
    async def scenario(
        service: DecodeService, engine: AsyncEngine, hold: threading.Event, release: threading.Event
    ) -> None:
        hold.set()
        reserving = asyncio.ensure_future(service.Reserve(reserve_request("r~1"), None))  # type: ignore[arg-type]
        await asyncio.sleep(0.2)  # the engine thread is inside reserve
        found = await service.Abort(worker_pb2.AbortRequest(request_id="r~1"), None)  # type: ignore[arg-type]
        assert not found.found  # nothing tracked yet
        release.set()
        with pytest.raises(ConflictError, match="aborted before it was reserved"):
            await reserving

    receiver = run(llama_dir, redis_url, scenario, "race-during")
    assert receiver.reserved == []


def test_a_reserve_cancelled_while_the_engine_reserves_frees_its_blocks(
    llama_dir: Path, redis_url: str
) -> None:
    async def scenario(
        service: DecodeService, engine: AsyncEngine, hold: threading.Event, release: threading.Event
    ) -> None:
        hold.set()
        reserving = asyncio.ensure_future(service.Reserve(reserve_request("r~1"), None))  # type: ignore[arg-type]
        await asyncio.sleep(0.2)
        reserving.cancel()  # the router's call went away
        release.set()  # the engine still reserves: the abort queued behind it frees the blocks
        with pytest.raises(asyncio.CancelledError):
            await reserving

    receiver = run(llama_dir, redis_url, scenario, "race-cancel-engine")
    assert receiver.reserved == []


def test_a_reserve_cancelled_while_its_record_is_written_is_undone(llama_dir: Path, redis_url: str) -> None:
    async def scenario(service: DecodeService, *_: Any) -> None:
        write = service.registry.reserve
        writing = asyncio.Event()

        async def slow_write(*args: Any, **kwargs: Any) -> Any:
            record = await write(*args, **kwargs)  # the record is written, then the call is cut
            writing.set()
            await asyncio.sleep(5)
            return record

        service.registry.reserve = slow_write  # type: ignore[method-assign]
        reserving = asyncio.ensure_future(service.Reserve(reserve_request("r~1"), None))  # type: ignore[arg-type]
        await writing.wait()
        reserving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reserving

    receiver = run(llama_dir, redis_url, scenario, "race-cancel-record")
    assert receiver.reserved == []


def test_a_local_prefill_that_ends_before_its_record_is_written_is_served(
    llama_dir: Path, redis_url: str
) -> None:
    # a short request prefilled here can finish while Reserve still writes its registry record (a slow
    # Redis under load): that is not an abort; its outputs stand and its record is ended afterwards
    async def scenario(service: DecodeService, *_: Any) -> None:
        write = service.registry.reserve

        async def slow_write(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(1.0)  # the engine computes the whole request meanwhile
            return await write(*args, **kwargs)

        service.registry.reserve = slow_write  # type: ignore[method-assign]
        stream = service.StreamOutputs(worker_pb2.StreamOutputsRequest(subscriber="router-1"), None)  # type: ignore[arg-type]
        await anext(stream)  # the subscription is in place

        async def read() -> list[int]:  # as the router's reader does, all along
            tokens: list[int] = []
            while True:
                batch = await anext(stream)
                for delta in batch.deltas:
                    tokens += delta.token_ids
                if any(d.finish_reason for d in batch.deltas):
                    return tokens

        reading = asyncio.ensure_future(read())
        request = reserve_request("r~1")
        request.local_prefill, request.subscriber = True, "router-1"
        await service.Reserve(request, None)  # type: ignore[arg-type]
        assert reading.done()  # the request ended while its record was being written
        assert len(await reading) == 4
        await stream.aclose()

    receiver = run(llama_dir, redis_url, scenario, "race-local-done")
    assert receiver.reserved == []  # prefilled here: nothing to receive


def test_an_abort_while_a_subscribed_request_is_recorded_leaves_nothing_tracked(
    llama_dir: Path, redis_url: str
) -> None:
    # the abort's final output reaches the subscriber while Reserve still writes the record: Reserve
    # refuses the request and it is settled all the same (found by the soak: a request left tracked)
    async def scenario(service: DecodeService, *_: Any) -> None:
        write, writing = service.registry.reserve, asyncio.Event()

        async def slow_write(*args: Any, **kwargs: Any) -> Any:
            writing.set()
            await asyncio.sleep(1.0)
            return await write(*args, **kwargs)

        service.registry.reserve = slow_write  # type: ignore[method-assign]
        stream = service.StreamOutputs(worker_pb2.StreamOutputsRequest(subscriber="router-1"), None)  # type: ignore[arg-type]
        await anext(stream)

        async def read() -> list[str]:
            while True:
                batch = await anext(stream)
                if reasons := [d.finish_reason for d in batch.deltas if d.finish_reason]:
                    return reasons

        reading = asyncio.ensure_future(read())
        request = reserve_request("r~1")
        request.subscriber = "router-1"  # a remote prefill: nothing computes until the abort
        reserving = asyncio.ensure_future(service.Reserve(request, None))  # type: ignore[arg-type]
        await writing.wait()
        found = await service.Abort(worker_pb2.AbortRequest(request_id="r~1"), None)  # type: ignore[arg-type]
        assert found.found
        await asyncio.wait_for(reading, 5)  # the abort went out while Reserve was still recording
        with pytest.raises(ConflictError, match="aborted while it was being reserved"):
            await reserving
        await stream.aclose()

    receiver = run(llama_dir, redis_url, scenario, "race-abort-subscribed")
    assert receiver.reserved == []
