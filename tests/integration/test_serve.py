"""`baton serve` as a user runs it, the README's gRPC client example, health and reflection,
`baton registry check`, and the colocated mode."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from baton_cluster import generate_all, greedy, start_cluster
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from baton import LLM, SamplingParams
from baton.services.launcher import _free_port
from baton.shared.registry import Registry

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
PROMPTS = [[5, 6, 7, 8], list(range(100, 160))]


@pytest.fixture(scope="module")
def served(
    llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen, str, str]]:
    """`baton serve` in its own process (it starts its own Redis), until the tests SIGTERM it."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATON_")}
    env["BATON_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    argv = [
        sys.executable,
        "-m",
        "baton.services.cli",
        "serve",
        "--model",
        str(llama_dir),
        "--port",
        str(port),
    ]
    process = subprocess.Popen(
        [*argv, "--max-model-len", "512"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    banner = _read_until(process, "Baton is serving", timeout_s=180)
    redis_url = re.search(r"registry (redis://\S+)\)", banner).group(1)  # type: ignore[union-attr]
    try:
        yield process, f"127.0.0.1:{port}", redis_url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _read_until(process: subprocess.Popen, marker: str, timeout_s: float) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    for line in process.stdout:
        sys.stderr.write(line)
        if marker in line:
            return line
        assert time.monotonic() < deadline, f"no {marker!r} within {timeout_s} s"
    raise AssertionError(f"baton serve exited ({process.wait()}) before printing {marker!r}")


def readme_client_example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- grpc-client-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its gRPC client example"
    return match.group(1)


def test_readme_grpc_client_example_runs(served: tuple[subprocess.Popen, str, str]) -> None:
    _, address, _ = served
    code = readme_client_example().replace("localhost:50051", address)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "finish_reason: FINISH_REASON_LENGTH" in result.stdout
    assert len(result.stdout.strip()) > len("finish_reason: FINISH_REASON_LENGTH")


def test_health_and_reflection_on_the_router(served: tuple[subprocess.Popen, str, str]) -> None:
    _, address, _ = served
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "baton.v1.Router"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in reply.list_services_response.service}
        assert {"baton.v1.Router", "grpc.health.v1.Health"} <= names


def test_health_and_reflection_on_the_workers(served: tuple[subprocess.Popen, str, str]) -> None:
    _, _, redis_url = served

    async def workers() -> list:
        async with Registry(redis_url) as registry:
            return await registry.live_workers()

    found = {}
    for worker in asyncio.run(workers()):
        service = (
            "baton.worker.v1.DecodeWorker"
            if worker.info.role == "decode"
            else "baton.worker.v1.PrefillWorker"
        )
        with grpc.insecure_channel(worker.info.grpc_address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
            found[worker.info.role] = reply.status == health_pb2.HealthCheckResponse.SERVING
    assert found == {"decode": True, "prefill": True}


def test_registry_check_is_clean_then_names_a_planted_leak(served: tuple[subprocess.Popen, str, str]) -> None:
    _, _, redis_url = served
    check = [sys.executable, "-m", "baton.services.cli", "registry", "check"]
    env = {**os.environ, "BATON_REDIS_URL": redis_url}
    clean = subprocess.run(check, capture_output=True, text=True, env=env, timeout=60)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "clean" in clean.stdout

    async def plant(end: bool) -> None:
        async with Registry(redis_url) as registry:
            if end:
                await registry.end_request("ghost", "decode-0")
            else:
                await registry.reserve("ghost", "decode-0", 3)

    asyncio.run(plant(end=False))
    try:
        leaked = subprocess.run(check, capture_output=True, text=True, env=env, timeout=60)
    finally:
        asyncio.run(plant(end=True))
    assert leaked.returncode == 1
    assert "ghost" in leaked.stdout and "decode-0" in leaked.stdout


def test_sigterm_stops_every_process(served: tuple[subprocess.Popen, str, str]) -> None:
    process, address, redis_url = served
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    for host_port in (address, f"127.0.0.1:{port}"):
        host, p = host_port.rsplit(":", 1)
        with pytest.raises(OSError):
            socket.create_connection((host, int(p)), timeout=1).close()


def test_colocated_mode_matches_offline(llama_dir: Path, redis_server: str) -> None:
    cluster = start_cluster(llama_dir, redis_server, colocated=True, num_prefill=0, num_decode=0)
    try:
        got = generate_all(cluster.router_address, PROMPTS, greedy(8))
        want = LLM(str(llama_dir), max_model_len=1024).generate(
            PROMPTS, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        )
        assert [c.token_ids for c in got] == [o.token_ids for o in want]
    finally:
        codes = cluster.stop()
    assert codes == {"router": 0}
