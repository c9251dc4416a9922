"""Redis going away under a running cluster: stopped (SIGSTOP: connections hang) for a few seconds,
or killed and restarted empty on the same port. Requests in flight complete token for token (workers
and the router serve without the registry; the records they hold are restored once it answers). A
request that arrives after an empty restart but before the workers re-registered (their next
heartbeat) is refused with UNAVAILABLE "no decode worker is available"; once they have, every request
completes, and the registry audit is clean."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis as redis_sync
from baton_cluster import assert_greedy, assert_no_leaks, generate, greedy, prompts, start_cluster

from baton import LLM

pytestmark = pytest.mark.integration


class RedisProcess:
    """A redis-server this test can stop, kill and start again on the same port."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir, self.port = workdir, port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        self.proc = subprocess.Popen(
            [*argv, "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis_sync.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis_sync.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = RedisProcess(tmp_path, port)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def outage_cluster(llama_dir: Path, redis_process: RedisProcess) -> Iterator:
    cluster = start_cluster(llama_dir, redis_process.url, lease_ttl_s=3.0, num_prefill=1, num_decode=1)
    yield cluster
    cluster.stop()


def _load_during(cluster, batch: list[list[int]], outage) -> list:
    """Start every request, run `outage()` (blocking) while they run, collect the completions."""

    async def main() -> list:
        tasks = [
            asyncio.create_task(generate(cluster.router_address, p, greedy(24), timeout_s=90)) for p in batch
        ]
        await asyncio.sleep(0.2)
        await asyncio.to_thread(outage)
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    return asyncio.run(main())


@pytest.mark.parametrize("how", ["stopped", "restarted empty"])
def test_requests_complete_through_a_redis_outage(
    outage_cluster, redis_process: RedisProcess, offline: LLM, how: str
) -> None:
    batch = prompts(12, 30, 90)

    def outage() -> None:
        if how == "stopped":
            assert redis_process.proc is not None
            redis_process.proc.send_signal(signal.SIGSTOP)
            time.sleep(4)
            redis_process.proc.send_signal(signal.SIGCONT)
        else:
            redis_process.kill()
            time.sleep(4)
            redis_process.start()

    got = _load_during(outage_cluster, batch, outage)
    assert_greedy(offline, batch, [getattr(c, "token_ids", c) for c in got], 24)
    _wait_until_served(outage_cluster)
    after = prompts(4, 30, 90)

    async def afterwards() -> list:
        calls = (generate(outage_cluster.router_address, p, greedy(24), timeout_s=90) for p in after)
        return list(await asyncio.gather(*calls, return_exceptions=True))

    assert_greedy(offline, after, [getattr(c, "token_ids", c) for c in asyncio.run(afterwards())], 24)
    assert_no_leaks(outage_cluster, timeout_s=20)


def _wait_until_served(cluster, timeout_s: float = 15) -> None:
    """One request at a time until one completes: each refusal meanwhile must be the clear one."""

    async def main() -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await generate(cluster.router_address, [5, 6, 7], greedy(2), timeout_s=30)
                return
            except grpc.aio.AioRpcError as e:
                assert e.code() is grpc.StatusCode.UNAVAILABLE, e
                assert "no decode worker is available" in (e.details() or ""), e.details()
                assert time.monotonic() < deadline, "the workers did not re-register"
                await asyncio.sleep(0.2)

    asyncio.run(main())
