"""Several workers and what happens when they die (kill -9) under load: real processes, Redis, UCX."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from baton_cluster import (
    Completion,
    assert_greedy,
    assert_no_leaks,
    expected,
    generate,
    generate_all,
    greedy,
    greedy_mismatch,
    prompts,
    wait_reaped,
    worker_stats,
)

from baton import LLM, SamplingParams
from baton.services.launcher import LocalCluster

pytestmark = pytest.mark.integration


def test_two_prefill_two_decode_workers_match_offline(make_cluster, offline: LLM) -> None:
    cluster = make_cluster(num_prefill=2, num_decode=2)
    batch = prompts(36)
    got = generate_all(cluster.router_address, batch, greedy(10))
    assert_greedy(offline, batch, [c.token_ids for c in got], 10)
    stats = worker_stats(cluster)
    assert all(stats[w].num_transfers > 0 for w in ("prefill-0", "prefill-1", "decode-0", "decode-1")), {
        w: s.num_transfers for w, s in stats.items()
    }
    assert_no_leaks(cluster)


def test_short_prompts_are_prefilled_by_the_decode_worker(make_cluster, offline: LLM) -> None:
    cluster = make_cluster(num_prefill=1, num_decode=1, router_args=["--local-prefill-max-tokens", "32"])
    short, long = prompts(3, 4, 30), prompts(2, 60, 100)
    got = generate_all(cluster.router_address, short + long, greedy(6))
    assert_greedy(offline, short + long, [c.token_ids for c in got], 6)
    assert worker_stats(cluster)["prefill-0"].num_transfers == len(long)
    assert_no_leaks(cluster)


def test_prompts_overflow_to_the_decode_worker_while_the_prefill_queue_is_full(
    make_cluster, offline: LLM
) -> None:
    """`--max-prefill-queue-tokens`: with prefill-0's pushes slowed, its queue fills with the first
    prompts of a burst and the rest are prefilled by the decode worker, token for token."""
    cluster = make_cluster(
        num_prefill=1,
        num_decode=1,
        prefill_args=["--kv-faults", "delay_ms=150"],
        router_args=["--local-prefill-max-tokens", "0", "--max-prefill-queue-tokens", "200"],
    )
    batch = prompts(8, 100, 180)  # at most two fit under 200 queued tokens at once
    got = generate_all(cluster.router_address, batch, greedy(6))
    assert_greedy(offline, batch, [c.token_ids for c in got], 6)

    placed = cluster.router_stats()
    assert placed.num_overflow_prefills > 0 and placed.num_remote_prefills > 0, placed
    assert placed.num_remote_prefills + placed.num_local_prefills == len(batch) and not placed.num_retries
    assert placed.num_overflow_prefills == placed.num_local_prefills  # no prompt was short enough
    pushed = worker_stats(cluster)["prefill-0"].num_transfers
    assert placed.num_transfers == pushed == placed.num_remote_prefills
    assert_no_leaks(cluster)


def test_two_routers_share_the_gateways_requests_and_one_dying_costs_none(make_cluster, offline: LLM) -> None:
    """`num_routers=2`: the gateway spreads its requests over both replicas; once one is killed, the
    next requests go to the other (the dead one is passed over), and none fails."""
    cluster = make_cluster(num_prefill=1, num_decode=1, http_port=0, num_routers=2)
    assert set(cluster.router_addresses) == {"router", "router-1"}
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    async def complete(batch: list[list[int]]) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster.gateway_url, timeout=60) as client:
            body = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
            return list(
                await asyncio.gather(
                    *(client.post("/v1/completions", json={**body, "prompt": p}) for p in batch)
                )
            )

    def texts(replies: list[httpx.Response]) -> list[str]:
        assert [r.status_code for r in replies] == [200] * len(replies), [r.text for r in replies]
        return [r.json()["choices"][0]["text"] for r in replies]

    batch = prompts(8, 20, 60)
    assert texts(asyncio.run(complete(batch))) == [o.text for o in offline.generate(batch, params)]
    placed = {name: cluster.router_stats(name) for name in cluster.router_addresses}
    assert all(s.num_remote_prefills > 0 for s in placed.values()), placed
    assert sum(s.num_remote_prefills for s in placed.values()) == len(batch)

    cluster.kill("router")
    after = prompts(6, 20, 60)
    assert texts(asyncio.run(complete(after))) == [o.text for o in offline.generate(after, params)]
    survivor = cluster.router_stats("router-1")
    assert survivor.num_remote_prefills == placed["router-1"].num_remote_prefills + len(after)
    assert_no_leaks(cluster)


async def _load_then(
    cluster: LocalCluster,
    batch: list[list[int]],
    max_tokens: int,
    victim: str,
    sig: int = signal.SIGKILL,
    victim_pid: int | None = None,
) -> list[Completion]:
    """Start every request; once prompts are being pushed (and, for a decode victim, it is decoding
    some of them), send `victim` the signal (or `victim_pid`, a process of its); collect every
    completion."""
    tasks = [
        asyncio.create_task(generate(cluster.router_address, p, greedy(max_tokens), timeout_s=90))
        for p in batch
    ]
    await asyncio.sleep(0.05)
    deadline = time.monotonic() + 60
    while not any(t.done() for t in tasks) and time.monotonic() < deadline:
        stats = await asyncio.to_thread(worker_stats, cluster)
        prefilled = sum(s.num_finished for s in stats.values() if s.role == "prefill") >= 2
        if prefilled and (stats[victim].role == "prefill" or stats[victim].num_running > 0):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # let the victim's running requests stream a few tokens
    if victim_pid is None:
        await asyncio.to_thread(cluster.kill, victim, sig)
    else:
        os.kill(victim_pid, sig)
    return list(await asyncio.gather(*tasks))


def test_killing_a_prefill_worker_under_load_loses_no_request(make_cluster, offline: LLM) -> None:
    cluster = make_cluster(num_prefill=2, num_decode=1)
    batch = prompts(32, 100, 300)
    got = asyncio.run(_load_then(cluster, batch, 8, victim="prefill-0"))
    assert [c.finish_reason for c in got] == ["FINISH_REASON_LENGTH"] * len(batch), [c.error for c in got]
    assert_greedy(offline, batch, [c.token_ids for c in got], 8)
    wait_reaped(cluster, "prefill-0")
    assert_no_leaks(cluster)


@pytest.mark.parametrize(
    ("decode_args", "error"),
    [([], "decode worker decode-0 failed"), (["--engine-process"], "engine process exited")],
    ids=["worker-killed", "engine-process-killed"],
)
def test_killing_a_decode_worker_ends_its_requests_with_a_clear_error(
    make_cluster, offline: LLM, decode_args: list[str], error: str
) -> None:
    """kill -9 of decode-0 mid-decode (with --engine-process: of its engine core's process): its
    requests end with a clear error (none hangs), the other decode worker's complete, and a worker
    whose engine process died drains and leaves on its own."""
    cluster = make_cluster(num_prefill=1, num_decode=2, decode_args=decode_args)
    engine_pid = _engine_process_pid(cluster, "decode-0") if decode_args else None
    batch = prompts(12, 20, 60)
    started = time.monotonic()
    got = asyncio.run(_load_then(cluster, batch, 300, victim="decode-0", victim_pid=engine_pid))
    assert time.monotonic() - started < 90  # nothing hung
    want = expected(offline, batch, 300)
    failed = [c for c in got if c.finish_reason == "FINISH_REASON_ERROR"]
    assert failed, "some requests were decoding on decode-0"
    for prompt, completion, tokens in zip(batch, got, want, strict=True):
        if completion.finish_reason == "FINISH_REASON_ERROR":
            assert error in completion.error, completion.error
        else:
            assert completion.finish_reason == "FINISH_REASON_LENGTH" and len(completion.token_ids) == 300
        assert greedy_mismatch(offline, prompt, completion.token_ids, tokens) is None
    if engine_pid is not None:
        cluster.processes["decode-0"].wait(timeout=60)  # it drained and left on its own
    wait_reaped(cluster, "decode-0")
    assert_no_leaks(cluster)


def _engine_process_pid(cluster: LocalCluster, worker: str) -> int:
    """The pid of `worker`'s engine core process, from the line its worker logs."""
    log = "".join(cluster.log.lines)  # type: ignore[attr-defined]
    found = re.search(rf"^{worker}\s*\|.*engine core in process (\d+)$", log, re.MULTILINE)
    assert found is not None, f"{worker} logged no engine core process"
    return int(found.group(1))


def test_a_full_decode_worker_refuses_fast_with_resource_exhausted(make_cluster) -> None:
    """Admission control: blocks are reserved before any prefill, so a request that cannot fit fails
    at once with RESOURCE_EXHAUSTED instead of wasting a prefill; the first request is unaffected."""
    cluster = make_cluster(
        num_prefill=1,
        num_decode=1,
        engine_args=["--max-model-len", "1024", "--num-kv-blocks", "64"],
        http_port=0,
    )
    big = prompts(1, 900, 901)[0]  # 57 of the 64 blocks

    async def main() -> tuple[Completion, str, httpx.Response, float]:
        first = asyncio.create_task(generate(cluster.router_address, big, greedy(100)))
        while not (await asyncio.to_thread(worker_stats, cluster))["decode-0"].num_held_blocks:
            await asyncio.sleep(0.02)
        started = time.monotonic()
        try:
            await generate(cluster.router_address, big[::-1], greedy(10))
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        async with httpx.AsyncClient() as client:  # the same through the gateway
            body = {"prompt": big[1:], "max_tokens": 10}
            reply = await client.post(f"{cluster.gateway_url}/v1/completions", json=body, timeout=30)
        return await first, code, reply, time.monotonic() - started

    first, code, reply, refused_after_s = asyncio.run(main())
    assert code == "RESOURCE_EXHAUSTED"
    assert reply.status_code == 429 and reply.headers["retry-after"] == "1"
    assert reply.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused_after_s < 5
    assert first.finish_reason == "FINISH_REASON_LENGTH" and len(first.token_ids) == 100
    assert worker_stats(cluster)["prefill-0"].num_transfers == 1
    assert_no_leaks(cluster)
    for name in ("router", "gateway"):  # their error paths must not import torch (seconds, blocking)
        maps = Path(f"/proc/{cluster.processes[name].pid}/maps").read_text()
        assert "libtorch" not in maps, f"the {name} loaded torch"


def test_sigterm_drains_a_decode_worker_without_losing_a_request(make_cluster, offline: LLM) -> None:
    cluster = make_cluster(num_prefill=1, num_decode=2)
    batch = prompts(12, 20, 60)
    got = asyncio.run(_load_then(cluster, batch, 40, victim="decode-0", sig=signal.SIGTERM))
    assert [c.finish_reason for c in got] == ["FINISH_REASON_LENGTH"] * len(batch), [c.error for c in got]
    assert_greedy(offline, batch, [c.token_ids for c in got], 40)
    assert cluster.processes["decode-0"].returncode == 0
    wait_reaped(cluster, "decode-0")
    assert_no_leaks(cluster)


def test_a_decode_worker_dying_mid_stream_ends_the_sse_stream_with_an_error_then_done(make_cluster) -> None:
    """Through the gateway: the stream carries an OpenAI error object, then `[DONE]`; the gateway
    stays up and reports itself not ready until a decode worker is back."""
    cluster = make_cluster(num_prefill=1, num_decode=1, http_port=0)
    events, error = _stream_then_kill(cluster, "decode-0")
    assert error["type"] == "server_error" and "decode worker decode-0 failed" in error["message"]
    assert all("choices" in json.loads(e) for e in events[:-2])
    assert httpx.get(f"{cluster.gateway_url}/health").status_code == 200
    wait_reaped(cluster, "decode-0")
    ready = httpx.get(f"{cluster.gateway_url}/ready")
    assert ready.status_code == 503 and "no decode worker" in ready.json()["error"]["message"]


def test_a_killed_worker_restarted_with_its_command_serves_again(make_cluster, offline: LLM) -> None:
    """`LocalCluster.restart`: the same argv (same worker id), a new address; a process restarted from
    a thread that then ends keeps running (its parent-death signal is tied to the launcher's spawner
    thread, not to the caller's)."""
    cluster = make_cluster(num_prefill=0, num_decode=1)
    with pytest.raises(ValueError, match="still running"):
        cluster.restart("decode-0")
    before = worker_stats(cluster)["decode-0"]
    cluster.kill("decode-0")
    restarter = threading.Thread(target=cluster.restart, args=("decode-0",))
    restarter.start()
    restarter.join()
    time.sleep(1.0)  # a parent-death signal would have stopped it by now
    assert cluster.exited() == {}
    after = worker_stats(cluster)["decode-0"]
    assert after.worker_id == "decode-0" and after.num_finished == 0 < before.num_blocks == after.num_blocks
    batch = prompts(3, 20, 60)
    assert_greedy(
        offline, batch, [c.token_ids for c in generate_all(cluster.router_address, batch, greedy(6))], 6
    )
    assert_no_leaks(cluster)


def test_killing_the_router_mid_stream_frees_everything_and_a_restarted_router_serves(
    make_cluster, offline: LLM
) -> None:
    """kill -9 of the router while a stream is open through the gateway: the stream ends with an
    OpenAI error object then `[DONE]`; the decode worker sees the router's output stream go and aborts
    its requests, so nothing stays held or recorded; the gateway answers 503 meanwhile and serves
    again, token for token, once the router is restarted on its port."""
    cluster = make_cluster(num_prefill=1, num_decode=1, http_port=0)
    events, error = _stream_then_kill(cluster, "router")
    assert error["type"] == "server_error" and "UNAVAILABLE" in error["message"], error
    assert all("choices" in json.loads(e) for e in events[:-2])
    assert_no_leaks(cluster, timeout_s=20)  # the workers and the registry, without the router
    short = {"prompt": prompts(1)[0], "max_tokens": 4}
    refused = httpx.post(f"{cluster.gateway_url}/v1/completions", json=short, timeout=30)
    assert refused.status_code == 503 and "UNAVAILABLE" in refused.json()["error"]["message"]
    assert refused.headers["retry-after"]
    cluster.restart("router")
    batch = prompts(3, 20, 60)
    assert_greedy(
        offline, batch, [c.token_ids for c in generate_all(cluster.router_address, batch, greedy(6))], 6
    )
    for _ in range(30):  # the gateway reconnects to the router on its next request
        again = httpx.post(f"{cluster.gateway_url}/v1/completions", json=short, timeout=30)
        if again.status_code == 200:
            break
        time.sleep(0.5)
    assert again.status_code == 200 and again.json()["choices"][0]["finish_reason"] == "length"
    assert_no_leaks(cluster)


def _stream_then_kill(cluster: LocalCluster, victim: str) -> tuple[list[str], dict]:
    """A long SSE stream through the gateway, `victim` killed (-9) after its fifth event; returns the
    events' data and the error object of the event before the last, which must be `[DONE]`."""
    body = {"prompt": prompts(1)[0], "max_tokens": 800, "ignore_eos": True, "stream": True}
    events: list[str] = []
    with httpx.stream("POST", f"{cluster.gateway_url}/v1/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
            if len(events) == 5:
                cluster.kill(victim)
    assert events[-1] == "[DONE]"
    return events, json.loads(events[-2])["error"]
