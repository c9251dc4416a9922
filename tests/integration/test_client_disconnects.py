"""Clients that go away at every stage of a request: waiting in the prefill worker's queue,
prefilling (chunked), while its KV is pushed (each message delayed), and decoding. Waves of requests
are cancelled at rising delays, so each wave catches them at different stages; after each wave
nothing is held anywhere, and the cluster still answers token for token."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from baton_cluster import assert_greedy, assert_no_leaks, generate, greedy, prompts

from baton import LLM
from baton.shared.rpc import router_pb2, router_pb2_grpc

pytestmark = pytest.mark.integration


async def _cancel_after(address: str, prompt: list[int], delay_s: float) -> int:
    """Start a request, cancel it after `delay_s`; returns the tokens it got before."""
    async with grpc.aio.insecure_channel(address) as channel:
        request = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=prompt), sampling=greedy(400))
        call = router_pb2_grpc.RouterStub(channel).Generate(request)
        got = 0

        async def read() -> None:
            nonlocal got
            async for response in call:
                got += len(response.token_ids)

        try:
            await asyncio.wait_for(read(), delay_s)
        except TimeoutError:
            call.cancel()
        return got


def test_requests_cancelled_at_every_stage_leave_nothing_behind(make_cluster, offline: LLM) -> None:
    cluster = make_cluster(
        num_prefill=1,
        num_decode=1,
        prefill_args=["--kv-faults", "delay_ms=100", "--max-num-batched-tokens", "64"],
    )
    tokens_before_cancel = []
    for delay_s in (0.05, 0.3, 1.0, 2.5, 5.0):
        batch = prompts(6, 150, 400)  # 3-7 chunks each: the later ones queue behind the earlier

        async def wave(batch: list[list[int]] = batch, delay_s: float = delay_s) -> list[int]:
            return list(
                await asyncio.gather(*(_cancel_after(cluster.router_address, p, delay_s) for p in batch))
            )

        tokens_before_cancel += asyncio.run(wave())
        assert_no_leaks(cluster, timeout_s=20)
    assert any(n == 0 for n in tokens_before_cancel)  # some were cancelled before their first token
    assert any(n > 0 for n in tokens_before_cancel)  # and some while decoding
    check = prompts(2, 20, 60)

    async def still_serving() -> list:
        return list(await asyncio.gather(*(generate(cluster.router_address, p, greedy(8)) for p in check)))

    assert_greedy(offline, check, [c.token_ids for c in asyncio.run(still_serving())], 8)
    assert_no_leaks(cluster)
