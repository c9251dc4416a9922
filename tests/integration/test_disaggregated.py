"""The disaggregated path end to end: real router, prefill and decode processes, real Redis, KV over
UCX (TCP on loopback), real gRPC. Every test ends with the registry audit clean and every allocator
free-or-cached."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio
from baton_cluster import (
    assert_greedy,
    assert_no_leaks,
    generate,
    generate_all,
    greedy,
    start_cluster,
    worker_stats,
)

from baton import LLM, SamplingParams
from baton.services.launcher import LocalCluster
from baton.shared.registry import Registry
from baton.shared.rpc import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.integration

MAX_TOKENS = 12
MAX_NUM_SEQS = 8
rng = random.Random(7)
PROMPTS = [[rng.randrange(3, 2000) for _ in range(n)] for n in (5, 17, 40, 90, 33, 64)]
LONG_PROMPT = [rng.randrange(3, 2000) for _ in range(700)]  # > the workers' 256-token step budget


@pytest.fixture(scope="module", params=["engine-thread", "engine-process"])
def cluster(request: pytest.FixtureRequest, llama_dir: Path, redis_server: str) -> Iterator[LocalCluster]:
    """1 prefill + 1 decode worker; every prompt is prefilled remotely (local threshold 0). Each
    worker runs at most MAX_NUM_SEQS requests at once, a step at a time (the other cluster tests run
    with async scheduling, the default). Every test runs twice: with the decode worker's engine core
    on a thread of the worker, and in a process of its own (--engine-process)."""
    engine_args = ["--max-model-len", "1024", "--max-num-batched-tokens", "256", "--no-async-scheduling"]
    cluster = start_cluster(
        llama_dir,
        redis_server,
        engine_args=[*engine_args, "--max-num-seqs", str(MAX_NUM_SEQS)],
        decode_args=["--engine-process"] if request.param == "engine-process" else [],
    )
    yield cluster
    codes = cluster.stop()
    assert all(code == 0 for name, code in codes.items() if name != "redis"), codes


def test_greedy_outputs_equal_offline_llm(cluster: LocalCluster, offline: LLM) -> None:
    got = generate_all(cluster.router_address, PROMPTS, greedy(MAX_TOKENS))
    assert_greedy(offline, PROMPTS, [c.token_ids for c in got], MAX_TOKENS)
    assert {c.finish_reason for c in got} == {"FINISH_REASON_LENGTH"}
    stats = worker_stats(cluster)
    assert stats["prefill-0"].num_transfers >= len(PROMPTS)
    assert stats["decode-0"].num_transfers >= len(PROMPTS)
    assert_no_leaks(cluster)


def test_requests_done_at_their_first_token_fail_no_transfer(cluster: LocalCluster, offline: LLM) -> None:
    """One output token: the request ends when the decode worker commits the pushed KV, before the
    prefill call returns with its ack; the router lets that call end instead of cancelling it."""
    prompts = [[rng.randrange(3, 2000) for _ in range(rng.randrange(80, 120))] for _ in range(6)]  # uncached
    before = worker_stats(cluster)["prefill-0"]
    got = generate_all(cluster.router_address, prompts, greedy(1))
    assert_greedy(offline, prompts, [c.token_ids for c in got], 1)
    deadline = time.monotonic() + 10
    while (now := worker_stats(cluster)["prefill-0"]).num_transfers < before.num_transfers + len(prompts):
        assert time.monotonic() < deadline, f"{now.num_transfers - before.num_transfers} transfers done"
        time.sleep(0.05)
    assert now.num_transfer_failures == before.num_transfer_failures
    assert_no_leaks(cluster)


def test_long_prompt_goes_through_chunked_prefill(cluster: LocalCluster, offline: LLM) -> None:
    (got,) = generate_all(cluster.router_address, [LONG_PROMPT], greedy(MAX_TOKENS))
    assert_greedy(offline, [LONG_PROMPT], [got.token_ids], MAX_TOKENS)
    assert_no_leaks(cluster)


def test_forty_concurrent_requests_all_complete(cluster: LocalCluster, offline: LLM) -> None:
    """Five times the decode worker's batch: the prompts beyond it are reserved (queued for the
    prefill worker, then ready) without a running slot, instead of refused."""
    prompts = [[rng.randrange(3, 2000) for _ in range(rng.randrange(4, 120))] for _ in range(40)]
    got = generate_all(cluster.router_address, prompts, greedy(8))
    assert_greedy(offline, prompts, [c.token_ids for c in got], 8)
    assert all(c.finish_reason == "FINISH_REASON_LENGTH" for c in got)
    assert_no_leaks(cluster)


def test_shared_prefix_hits_the_prefill_workers_cache(cluster: LocalCluster, offline: LLM) -> None:
    shared = [rng.randrange(3, 2000) for _ in range(96)]  # six full blocks
    before = worker_stats(cluster)["prefill-0"].prefix_hit_tokens
    first = generate_all(cluster.router_address, [[*shared, 11, 12]], greedy(4))[0]
    second = generate_all(cluster.router_address, [[*shared, 13, 14, 15]], greedy(4))[0]
    assert first.cached_prompt_tokens == 0
    assert second.cached_prompt_tokens == 96
    assert worker_stats(cluster)["prefill-0"].prefix_hit_tokens - before >= 96
    assert_greedy(offline, [[*shared, 13, 14, 15]], [second.token_ids], 4)
    assert_no_leaks(cluster)


def test_text_prompt_streams_text_and_logprobs(cluster: LocalCluster, offline: LLM) -> None:
    sampling = greedy(6, logprobs=2)
    got = asyncio.run(generate(cluster.router_address, "Call me Ishmael.", sampling))
    want = offline.generate(
        ["Call me Ishmael."], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    )[0]
    assert got.token_ids == want.token_ids
    assert got.text == want.text

    async def logprobs() -> list[router_pb2.GenerateResponse]:
        async with grpc.aio.insecure_channel(cluster.router_address) as channel:
            request = router_pb2.GenerateRequest(text="Call me Ishmael.", sampling=sampling)
            return [r async for r in router_pb2_grpc.RouterStub(channel).Generate(request)]

    positions = [p for r in asyncio.run(logprobs()) for p in r.logprobs]
    assert len(positions) == 6
    assert all(
        p.sampled.rank == 1 and len(p.top) == 2 and p.top[0].token_id == p.sampled.token_id for p in positions
    )
    assert_no_leaks(cluster)


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        ({"token_ids": router_pb2.TokenIds(ids=[])}, "empty"),
        ({"token_ids": router_pb2.TokenIds(ids=[5, 99999])}, "outside the vocabulary"),
        ({"token_ids": router_pb2.TokenIds(ids=list(range(3, 1100)))}, "max_model_len 1024"),
        ({"text": "hi", "sampling": common_pb2.SamplingParams(top_p=1.5)}, "top_p"),
        ({"text": "hi", "model": "gpt-4"}, "not served"),
        ({}, "missing"),
    ],
)
def test_bad_input_is_invalid_argument(cluster: LocalCluster, request_kwargs: dict, message: str) -> None:
    async def call() -> None:
        async with grpc.aio.insecure_channel(cluster.router_address) as channel:
            request = router_pb2.GenerateRequest(**request_kwargs)
            async for _ in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=30):
                pass

    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(call())
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_cancelled_request_frees_everything(cluster: LocalCluster) -> None:
    async def cancel_midway() -> int:
        async with grpc.aio.insecure_channel(cluster.router_address) as channel:
            request = router_pb2.GenerateRequest(
                token_ids=router_pb2.TokenIds(ids=PROMPTS[2]), sampling=greedy(500)
            )
            call = router_pb2_grpc.RouterStub(channel).Generate(request)
            got = 0
            async for response in call:
                got += len(response.token_ids)
                if got >= 3:
                    call.cancel()
                    break
            return got

    assert asyncio.run(cancel_midway()) >= 3
    assert_no_leaks(cluster)


def test_abort_by_id_ends_the_stream_with_abort(cluster: LocalCluster) -> None:
    async def main() -> list[router_pb2.GenerateResponse]:
        async with grpc.aio.insecure_channel(cluster.router_address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            request = router_pb2.GenerateRequest(
                request_id="abort-me", token_ids=router_pb2.TokenIds(ids=PROMPTS[1]), sampling=greedy(800)
            )
            responses = []
            async for response in stub.Generate(request, timeout=60):
                responses.append(response)
                if len(responses) == 1:
                    assert (await stub.Abort(router_pb2.AbortRequest(request_id="abort-me"))).found
            assert not (await stub.Abort(router_pb2.AbortRequest(request_id="abort-me"))).found
            return responses

    responses = asyncio.run(main())
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    assert sum(len(r.token_ids) for r in responses) < 800
    assert_no_leaks(cluster)


def test_list_models(cluster: LocalCluster, llama_dir: Path) -> None:
    async def main() -> router_pb2.ListModelsResponse:
        async with grpc.aio.insecure_channel(cluster.router_address) as channel:
            return await router_pb2_grpc.RouterStub(channel).ListModels(router_pb2.ListModelsRequest())

    (model,) = asyncio.run(main()).models
    assert (
        model.name == llama_dir.name and model.architecture == "LlamaForCausalLM" and model.vocab_size == 2048
    )


def test_registry_is_rebuilt_from_the_workers_after_a_redis_flush(
    cluster: LocalCluster, offline: LLM
) -> None:
    """I5: Redis losing everything loses no in-flight request; workers register again and restore
    the records of what they hold. The request is long enough (~2 s) to outlive a heartbeat."""

    async def main() -> list[int]:
        task = asyncio.create_task(generate(cluster.router_address, PROMPTS[3], greedy(800)))
        async with Registry(cluster.redis_url, cluster.spec.namespace) as registry:
            while not await registry.live_requests():
                await asyncio.sleep(0.05)
            client = redis.asyncio.Redis.from_url(cluster.redis_url)
            await client.flushall()
            await client.aclose()
            assert await registry.live_workers() == []
            deadline = asyncio.get_running_loop().time() + 3 * cluster.spec.lease_ttl_s
            while len(await registry.live_workers()) < 2 or not await registry.live_requests():
                assert asyncio.get_running_loop().time() < deadline, "registry not rebuilt"
                await asyncio.sleep(0.1)
        return (await task).token_ids

    assert_greedy(offline, [PROMPTS[3]], [asyncio.run(main())], 800)
    assert_no_leaks(cluster)


def test_a_subscribers_shared_output_stream_carries_its_requests_and_ends_them_when_closed(
    cluster: LocalCluster, offline: LLM
) -> None:
    """StreamOutputs on the decode worker itself: requests reserved for a subscriber stream on its one
    stream (tagged by request id, in order); a Reserve naming a subscriber with no stream open is
    UNAVAILABLE; closing the stream aborts what is still running there."""

    async def main() -> tuple[dict[str, list[int]], set[str]]:
        async with Registry(cluster.redis_url, cluster.spec.namespace) as registry:
            (decode,) = [w for w in await registry.live_workers() if w.info.role == "decode"]
        async with grpc.aio.insecure_channel(decode.info.grpc_address) as channel:
            stub = worker_pb2_grpc.DecodeWorkerStub(channel)

            def reserve(rid: str, prompt: list[int], max_tokens: int, subscriber: str) -> Any:
                return stub.Reserve(
                    worker_pb2.ReserveRequest(
                        request_id=rid,
                        prompt_token_ids=prompt,
                        sampling=greedy(max_tokens),
                        local_prefill=True,
                        subscriber=subscriber,
                    ),
                    timeout=10,
                )

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await reserve("nobody-reads", PROMPTS[0], 4, "no-such-subscriber")
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE

            stream = stub.StreamOutputs(worker_pb2.StreamOutputsRequest(subscriber="test-subscriber"))
            batches = aiter(stream)
            assert list((await anext(batches)).deltas) == []  # subscribed
            tokens: dict[str, list[int]] = {"a": [], "b": []}
            await reserve("a", PROMPTS[0], MAX_TOKENS, "test-subscriber")
            await reserve("b", PROMPTS[3], MAX_TOKENS, "test-subscriber")
            ended: set[str] = set()
            while ended != {"a", "b"}:
                for delta in (await anext(batches)).deltas:
                    tokens[delta.request_id].extend(delta.token_ids)
                    if delta.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                        ended.add(delta.request_id)
            await reserve("left", PROMPTS[2], 800, "test-subscriber")
            seen: set[str] = set()
            while "left" not in seen:
                seen.update(d.request_id for d in (await anext(batches)).deltas)
            stream.cancel()  # the subscriber goes away mid-request
            return tokens, seen

    tokens, seen = asyncio.run(main())
    assert_greedy(offline, [PROMPTS[0], PROMPTS[3]], [tokens["a"], tokens["b"]], MAX_TOKENS)
    assert seen == {"left"}
    assert_no_leaks(cluster)  # "left" was aborted and its record ended
