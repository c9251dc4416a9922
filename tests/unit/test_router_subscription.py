"""The Router's Subscribe/Submit link as the gateway uses it: a real Router servicer over real gRPC on
loopback, the gateway's RouterClient, and a scripted backend (the part of the Router that would place
requests on workers) so each test decides when outputs, failures and ends happen."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from baton.services.gateway.router_client import RouterClient
from baton.services.router.service import RouterService
from baton.shared.engine.outputs import EngineOutput
from baton.shared.engine.sampling_params import SamplingParams
from baton.shared.grpc_server import CapacityError, ServiceBinding, open_channel, start_server
from baton.shared.rpc import common_pb2, router_pb2, router_pb2_grpc
from baton.shared.tokenizer import Tokenizer

PROMPT = [5, 6, 7, 8]


class ScriptedBackend:
    """Each request's outputs come from a queue the test feeds; a CapacityError put there is raised."""

    def __init__(self) -> None:
        self.feeds: dict[str, asyncio.Queue[EngineOutput | BaseException]] = {}
        self.started: dict[str, asyncio.Event] = {}
        self.cancelled: set[str] = set()

    def feed(self, rid: str) -> asyncio.Queue[EngineOutput | BaseException]:
        self.started.setdefault(rid, asyncio.Event())
        return self.feeds.setdefault(rid, asyncio.Queue())

    async def generate(
        self, request_id: str, prompt: list[int], params: SamplingParams
    ) -> AsyncIterator[EngineOutput]:
        feed = self.feed(request_id)
        self.started[request_id].set()
        try:
            while True:
                item = await feed.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        except asyncio.CancelledError:
            self.cancelled.add(request_id)
            raise

    async def cluster_stats(self) -> router_pb2.ClusterStats:
        return router_pb2.ClusterStats()

    async def close(self) -> None:
        pass


def out(rid: str, *tokens: int, finish: str | None = None) -> EngineOutput:
    return EngineOutput(rid, list(tokens), finish_reason=finish, num_prompt_tokens=len(PROMPT))


def request(rid: str, max_tokens: int = 16) -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(
        request_id=rid,
        token_ids=router_pb2.TokenIds(ids=PROMPT),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


Scenario = Callable[[RouterService, ScriptedBackend, RouterClient, str], Awaitable[None]]


def run(llama_dir: Path, scenario: Scenario, max_pending_requests: int = 4096) -> None:
    async def main() -> None:
        backend = ScriptedBackend()
        service = RouterService(llama_dir, backend, max_pending_requests=max_pending_requests)
        binding = ServiceBinding(router_pb2_grpc.add_RouterServicer_to_server, service, "baton.v1.Router")
        server = await start_server([binding], "127.0.0.1", 0)
        address = f"127.0.0.1:{server.port}"
        client = RouterClient(address)
        try:
            await asyncio.wait_for(scenario(service, backend, client, address), 30)
        finally:
            await client.close()
            await service.drain(1.0)
            await server.server.stop(grace=1)

    asyncio.run(main())


async def started(
    client: RouterClient, backend: ScriptedBackend, rid: str
) -> tuple[AsyncIterator[router_pb2.GenerateResponse], asyncio.Future[router_pb2.GenerateResponse]]:
    """Submit `rid` through the client; once the backend has it: its responses and the first one, due."""
    responses = aiter(client.generate(request(rid)))
    first = asyncio.ensure_future(anext(responses))
    await backend.started.setdefault(rid, asyncio.Event()).wait()
    return responses, first


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


def test_pieces_queued_while_the_reader_lags_arrive_merged_with_their_text(llama_dir: Path) -> None:
    tokenizer = Tokenizer.from_dir(llama_dir)
    assert tokenizer is not None

    async def scenario(
        service: RouterService, backend: ScriptedBackend, client: RouterClient, _: str
    ) -> None:
        responses, first = await started(client, backend, "r1")
        feed = backend.feed("r1")
        feed.put_nowait(out("r1", 40))
        got = [await first]
        for token in (41, 42, 43):  # queued before the reader comes back
            feed.put_nowait(out("r1", token))
        feed.put_nowait(out("r1", 44, finish="length"))
        await until(lambda: "r1" not in service._writers)  # every piece went out
        got += [response async for response in responses]
        assert [list(r.token_ids) for r in got] == [[40], [41, 42, 43, 44]]
        assert got[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert got[-1].usage.completion_tokens == 5 and got[-1].usage.prompt_tokens == len(PROMPT)
        text = "".join(r.text for r in got)
        assert text == tokenizer.decode([40, 41, 42, 43, 44], skip_special_tokens=True)

    run(llama_dir, scenario)


def test_a_failure_after_submit_is_raised_with_its_status(llama_dir: Path) -> None:
    async def scenario(
        service: RouterService, backend: ScriptedBackend, client: RouterClient, _: str
    ) -> None:
        backend.feed("full").put_nowait(CapacityError("no decode worker has room"))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _response in client.generate(request("full")):
                pass
        assert failed.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "no decode worker has room" in (failed.value.details() or "")
        assert service._writers == {} and service._active == {}

    run(llama_dir, scenario)


def test_cancel_aborts_the_request_on_the_router(llama_dir: Path) -> None:
    async def scenario(
        service: RouterService, backend: ScriptedBackend, client: RouterClient, _: str
    ) -> None:
        call = client.generate(request("long", max_tokens=100))
        backend.feed("long").put_nowait(out("long", 40))
        async for response in call:
            assert list(response.token_ids) == [40]
            break
        call.cancel()
        await until(lambda: "long" in backend.cancelled and not service._writers and not service._active)

    run(llama_dir, scenario)


def test_bad_submissions_are_refused_before_any_work(llama_dir: Path) -> None:
    async def scenario(
        service: RouterService, backend: ScriptedBackend, client: RouterClient, address: str
    ) -> None:
        stub = router_pb2_grpc.RouterStub(open_channel(address))
        with pytest.raises(grpc.aio.AioRpcError) as no_stream:
            await stub.Submit(router_pb2.SubmitRequest(request=request("x"), subscriber="nobody"))
        assert no_stream.value.code() is grpc.StatusCode.UNAVAILABLE

        _responses, first = await started(client, backend, "twice")
        for bad, status, words in [
            (request("twice"), grpc.StatusCode.INVALID_ARGUMENT, "already in flight"),
            (request(""), grpc.StatusCode.INVALID_ARGUMENT, "request_id must be set"),
            (router_pb2.GenerateRequest(request_id="empty"), grpc.StatusCode.INVALID_ARGUMENT, "missing"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                submit = router_pb2.SubmitRequest(request=bad, subscriber=client.subscriber)
                await stub.Submit(submit)
            assert refused.value.code() is status and words in (refused.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as local:  # caught by the gateway itself
            async for _response in client.generate(request("twice")):
                pass
        assert local.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        backend.feed("twice").put_nowait(out("twice", 40, finish="stop"))
        assert (await first).finish_reason == common_pb2.FINISH_REASON_STOP  # unharmed by the others
        assert set(backend.started) == {"twice"}  # nothing else reached the backend

    run(llama_dir, scenario)


def test_requests_beyond_the_pending_bound_are_refused_before_any_work(llama_dir: Path) -> None:
    async def scenario(
        service: RouterService, backend: ScriptedBackend, client: RouterClient, address: str
    ) -> None:
        stub = router_pb2_grpc.RouterStub(open_channel(address))
        _, first_a = await started(client, backend, "a")
        _, first_b = await started(client, backend, "b")
        refusals = []
        with pytest.raises(grpc.aio.AioRpcError) as submitted:  # Subscribe/Submit, as the gateway
            async for _response in client.generate(request("c")):
                pass
        refusals.append(submitted.value)
        with pytest.raises(grpc.aio.AioRpcError) as generated:  # Generate, as a gRPC client
            async for _response in stub.Generate(request("d")):
                pass
        refusals.append(generated.value)
        for refused in refusals:
            assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-pending-requests 2" in (refused.details() or "")
        assert set(backend.started) == {"a", "b"}  # the refused ones never reached the backend
        backend.feed("a").put_nowait(out("a", 40, finish="stop"))
        await first_a
        await until(lambda: "a" not in service._active)
        _, first_e = await started(client, backend, "e")  # room again
        for rid, first in (("b", first_b), ("e", first_e)):
            backend.feed(rid).put_nowait(out(rid, 41, finish="stop"))
            assert (await first).finish_reason == common_pb2.FINISH_REASON_STOP

    run(llama_dir, scenario, max_pending_requests=2)


def test_a_closed_stream_aborts_its_subscribers_requests(llama_dir: Path) -> None:
    async def scenario(
        service: RouterService, backend: ScriptedBackend, client: RouterClient, address: str
    ) -> None:
        stub = router_pb2_grpc.RouterStub(open_channel(address))
        stream = stub.Subscribe(router_pb2.SubscribeRequest(subscriber="short-lived"))
        batches = aiter(stream)
        assert list((await anext(batches)).responses) == []
        await stub.Submit(router_pb2.SubmitRequest(request=request("orphan"), subscriber="short-lived"))
        backend.feed("orphan").put_nowait(out("orphan", 40))
        batch = await anext(batches)
        assert [r.request_id for r in batch.responses] == ["orphan"]
        stream.cancel()
        await until(lambda: "orphan" in backend.cancelled and not service._writers and not service._active)

    run(llama_dir, scenario)


def test_drain_lets_running_requests_finish_then_ends_the_streams(llama_dir: Path) -> None:
    async def scenario(
        service: RouterService, backend: ScriptedBackend, client: RouterClient, _: str
    ) -> None:
        _responses, first = await started(client, backend, "last")
        drained = asyncio.ensure_future(service.drain(10.0))
        await asyncio.sleep(0.1)
        assert not drained.done()  # "last" still runs
        backend.feed("last").put_nowait(out("last", 40, finish="stop"))
        assert (await first).finish_reason == common_pb2.FINISH_REASON_STOP
        await drained
        assert service._subscribers.get(client.subscriber) is None  # its stream ended

    run(llama_dir, scenario)
