"""SIGTERM drains every service: it stops taking new work, lets the work in flight finish (or, past
its drain timeout, ends it with a clear error) and exits 0, leaving nothing behind. Real processes,
Redis, UCX over TCP, gRPC and HTTP on loopback. The decode worker's drain without a timeout is in
test_cluster_failures.py, `baton serve`'s stop in test_serve.py."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Callable

import grpc
import httpx
import pytest
from baton_cluster import (
    assert_greedy,
    assert_no_leaks,
    expected,
    generate,
    greedy,
    greedy_mismatch,
    prompts,
    wait_reaped,
    worker_stats,
)

from baton import LLM, SamplingParams
from baton.services.launcher import LocalCluster
from baton.shared.config import GatewayConfig, RouterConfig
from baton.shared.rpc import worker_pb2

pytestmark = pytest.mark.integration

GATEWAY_DRAIN_TIMEOUT_S = GatewayConfig.model_fields["drain_timeout_s"].default
ROUTER_DRAIN_TIMEOUT_S = 4 * RouterConfig.model_fields["drain_timeout_s"].default
"""The drain test's router gets longer than the default: on a loaded 2-core machine its streams' 400
tokens have taken over 10 s (decode steps of 24 ms), and a drain cut short is another test's subject."""

STREAMED = 400
"""Tokens of a request still streaming well after its service was signalled and refuses new work."""


async def _until(
    cluster: LocalCluster, busy: Callable[[dict[str, worker_pb2.WorkerStats]], object], timeout_s: float = 60
) -> dict[str, worker_pb2.WorkerStats]:
    """Poll the workers' stats until `busy(stats)` holds; returns those stats."""
    deadline = time.monotonic() + timeout_s
    while not busy(stats := await asyncio.to_thread(worker_stats, cluster)):
        assert time.monotonic() < deadline, f"not busy after {timeout_s} s: {stats}"
        await asyncio.sleep(0.05)
    return stats


def _decoding(n: int) -> Callable[[dict[str, worker_pb2.WorkerStats]], bool]:
    """Busy: the decode worker runs `n` requests."""
    return lambda stats: stats["decode-0"].num_running == n


async def _until_refused(address: str, timeout_s: float = 5) -> None:
    """Until a connection to `address` (host:port, or an http:// URL) is refused: the service closed
    its listening socket."""
    host, port = address.removeprefix("http://").rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection(host, int(port))
        except ConnectionRefusedError:
            return
        writer.close()
        assert time.monotonic() < deadline, f"{address} still accepts connections after {timeout_s} s"
        await asyncio.sleep(0.02)


# -- gateway ---------------------------------------------------------------------------------------
async def _sse(client: httpx.AsyncClient, prompt: list[int]) -> list[str]:
    """A streamed greedy completion through the gateway: its events' data, `[DONE]` included."""
    body = {"prompt": prompt, "max_tokens": STREAMED, "temperature": 0, "ignore_eos": True, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        assert reply.status_code == 200
        return [line[len("data: ") :] async for line in reply.aiter_lines() if line.startswith("data: ")]


def test_sigterm_drains_the_gateway_streams_and_refuses_new_connections(make_cluster, offline: LLM) -> None:
    """The gateway closes its listening socket at once (a new request's connection is refused) and
    serves the streams it has to their end: every token, then `[DONE]`; then it exits 0."""
    cluster = make_cluster(num_prefill=1, num_decode=1, http_port=0)
    gateway = cluster.processes["gateway"]
    batch = prompts(4, 20, 60)

    async def main() -> tuple[list[list[str]], int, float]:
        async with httpx.AsyncClient(base_url=cluster.gateway_url, timeout=60) as client:
            streams = [asyncio.create_task(_sse(client, p)) for p in batch]
            await _until(cluster, _decoding(len(batch)))
            gateway.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await _until_refused(cluster.gateway_url)
            with pytest.raises(httpx.ConnectError):  # a new request, on a new connection
                async with httpx.AsyncClient(base_url=cluster.gateway_url) as late:
                    await late.post("/v1/completions", json={"prompt": batch[0], "max_tokens": 2})
            in_flight = sum(not s.done() for s in streams)
            events = list(await asyncio.gather(*streams))
        await asyncio.to_thread(gateway.wait, GATEWAY_DRAIN_TIMEOUT_S)
        return events, in_flight, time.monotonic() - signalled

    events, in_flight, exited_after_s = asyncio.run(main())
    assert in_flight == len(batch), "the streams should still be running when new work is refused"
    want = offline.generate(batch, SamplingParams(max_tokens=STREAMED, temperature=0, ignore_eos=True))
    for stream, out in zip(events, want, strict=True):
        assert stream[-1] == "[DONE]"
        chunks = [json.loads(e) for e in stream[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == out.text
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert gateway.returncode == 0
    assert exited_after_s < GATEWAY_DRAIN_TIMEOUT_S
    assert_no_leaks(cluster)


# -- router ----------------------------------------------------------------------------------------
def test_sigterm_drains_the_router_streams_and_refuses_new_calls(make_cluster, offline: LLM) -> None:
    """The router stops listening at once (a new Generate is refused) and streams the calls it has to
    their end; then it exits 0."""
    cluster = make_cluster(
        num_prefill=1,
        num_decode=1,
        router_args=["--local-prefill-max-tokens", "0", "--drain-timeout-s", str(ROUTER_DRAIN_TIMEOUT_S)],
    )
    router = cluster.processes["router"]
    batch = prompts(4, 20, 60)

    async def main() -> tuple[list, grpc.StatusCode, int, float]:
        streams = [asyncio.create_task(generate(cluster.router_address, p, greedy(STREAMED))) for p in batch]
        await _until(cluster, _decoding(len(batch)))
        router.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        await _until_refused(cluster.router_address)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await generate(cluster.router_address, batch[0], greedy(2), timeout_s=10)
        in_flight = sum(not s.done() for s in streams)
        got = list(await asyncio.gather(*streams))
        await asyncio.to_thread(router.wait, ROUTER_DRAIN_TIMEOUT_S)
        return got, refused.value.code(), in_flight, time.monotonic() - signalled

    got, refused_code, in_flight, exited_after_s = asyncio.run(main())
    # a new connection is refused (UNAVAILABLE); a call that rides a connection the process already
    # had to the router (gRPC shares them between channels) is cancelled by the stopping server
    assert refused_code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert in_flight == len(batch), "the streams should still be running when new calls are refused"
    assert [c.finish_reason for c in got] == ["FINISH_REASON_LENGTH"] * len(batch), [c.error for c in got]
    assert_greedy(offline, batch, [c.token_ids for c in got], STREAMED)
    assert router.returncode == 0
    assert exited_after_s < ROUTER_DRAIN_TIMEOUT_S
    assert_no_leaks(cluster)


# -- prefill worker --------------------------------------------------------------------------------
PUSH_DELAY_MS = 1000
"""Each KV push waits this long before sending: the draining worker holds its pushes long enough to
be asked for more."""


def _logged(cluster: LocalCluster, name: str, pattern: str) -> list[str]:
    """What `pattern`'s group matched in each line that process `name` logged."""
    lines = [line for line in cluster.log.lines if line.startswith(f"{name} ")]
    return [m.group(1) for line in lines if (m := re.search(pattern, line))]


def test_sigterm_drains_a_prefill_worker_without_losing_a_request(make_cluster, offline: LLM) -> None:
    """The prefills in flight at the signal finish their pushes on the draining worker; prefills asked
    of it while it drains are refused and placed on the other one; no request is lost or leaks."""
    cluster = make_cluster(
        num_prefill=2,
        num_decode=1,
        log_requests=True,
        prefill_args=["--kv-faults", f"delay_ms={PUSH_DELAY_MS}"],
    )
    before, during = prompts(8, 100, 300), prompts(8, 100, 300)

    def all_pushing(stats: dict[str, worker_pb2.WorkerStats]) -> bool:
        pushing = [len(stats[p].request_ids) for p in ("prefill-0", "prefill-1")]
        return pushing[0] > 0 and sum(pushing) == len(before)

    async def main() -> tuple[list, list[str]]:
        streams = [asyncio.create_task(generate(cluster.router_address, p, greedy(8))) for p in before]
        held = list((await _until(cluster, all_pushing))["prefill-0"].request_ids)
        cluster.processes["prefill-0"].send_signal(signal.SIGTERM)
        streams += [asyncio.create_task(generate(cluster.router_address, p, greedy(8))) for p in during]
        return list(await asyncio.gather(*streams)), held

    got, held = asyncio.run(main())
    assert [c.finish_reason for c in got] == ["FINISH_REASON_LENGTH"] * len(got), [c.error for c in got]
    assert_greedy(offline, before + during, [c.token_ids for c in got], 8)
    assert cluster.processes["prefill-0"].wait(10) == 0
    # the decode worker received the KV of exactly the prefills prefill-0 held: none was cut, none added
    assert sorted(_logged(cluster, "decode-0", r"request (\S+): KV from prefill-0 complete")) == sorted(held)
    assert worker_stats(cluster)["decode-0"].num_transfer_failures == 0
    replaced = _logged(cluster, "router", r"request (\S+) attempt 2: decode decode-0, prefill prefill-1")
    assert replaced, "no prefill was asked of prefill-0 while it drained (so none was refused)"
    wait_reaped(cluster, "prefill-0")
    assert_no_leaks(cluster)


# -- a drain that runs out of time -----------------------------------------------------------------
DECODE_DRAIN_TIMEOUT_S = 0.5
LONG = 900
"""Tokens of a request that cannot finish within DECODE_DRAIN_TIMEOUT_S (prompts of 20 to 60 tokens
leave room for them in the clusters' context of 1024)."""


def test_a_decode_drain_past_its_timeout_ends_the_requests_with_an_error(make_cluster, offline: LLM) -> None:
    """Requests that cannot finish within --drain-timeout-s end with an error naming the stop (not
    an endless stream, not a silent abort); the worker still exits 0 and nothing is left behind."""
    cluster = make_cluster(
        num_prefill=1, num_decode=1, worker_args=["--drain-timeout-s", str(DECODE_DRAIN_TIMEOUT_S)]
    )
    batch = prompts(2, 20, 60)

    async def main() -> tuple[list, float]:
        streams = [asyncio.create_task(generate(cluster.router_address, p, greedy(LONG))) for p in batch]
        await _until(cluster, _decoding(len(batch)))
        signalled = time.monotonic()
        await asyncio.to_thread(cluster.kill, "decode-0", signal.SIGTERM)
        exited_after_s = time.monotonic() - signalled
        return list(await asyncio.gather(*streams)), exited_after_s

    got, exited_after_s = asyncio.run(main())
    assert cluster.processes["decode-0"].returncode == 0
    assert exited_after_s < DECODE_DRAIN_TIMEOUT_S + 5
    for prompt, completion, tokens in zip(batch, got, expected(offline, batch, LONG), strict=True):
        assert completion.finish_reason == "FINISH_REASON_ERROR"
        assert completion.error == (
            f"decode worker decode-0 stopped before the request finished "
            f"(drain timeout {DECODE_DRAIN_TIMEOUT_S:g} s)"
        )
        assert 0 < len(completion.token_ids) < LONG
        assert greedy_mismatch(offline, prompt, completion.token_ids, tokens) is None
    wait_reaped(cluster, "decode-0")
    assert_no_leaks(cluster)
