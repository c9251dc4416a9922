"""`baton serve` as a user runs it, the README's gRPC client example, health and reflection,
`baton registry check`, and the colocated mode."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from baton_cluster import generate_all, greedy, start_cluster
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from baton import LLM, SamplingParams
from baton.services.launcher import _free_port
from baton.shared.registry import Registry
from baton.shared.rpc import router_pb2, router_pb2_grpc

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
PROMPTS = [[5, 6, 7, 8], list(range(100, 160))]


@dataclass
class Served:
    process: subprocess.Popen
    router_address: str
    gateway_url: str
    redis_url: str
    log: list[str]  # what it printed after its banner, as it prints it


@pytest.fixture(scope="module")
def served(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`baton serve` in its own process (it starts its own Redis), until the tests SIGTERM it."""
    router_port, http_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATON_")}
    env["BATON_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    argv = [sys.executable, "-m", "baton.services.cli", "serve", "--model", str(llama_dir)]
    argv += ["--port", str(http_port), "--router-port", str(router_port), "--max-model-len", "512"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    banner = _read_until(process, "Press Ctrl-C to stop", timeout_s=180)
    log: list[str] = []
    threading.Thread(target=_drain, args=(process, log), daemon=True).start()  # a full pipe would block it
    redis_url = re.search(r"registry (redis://\S+)\)", banner).group(1)  # type: ignore[union-attr]
    assert f"http://127.0.0.1:{http_port}/v1" in banner
    # no secret given: serve made one up, and both workers' KV connections prove it
    assert banner.count("(connections authenticated by the KV transfer secret)") == 2, banner
    try:
        yield Served(process, f"127.0.0.1:{router_port}", f"http://127.0.0.1:{http_port}", redis_url, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _read_until(process: subprocess.Popen, marker: str, timeout_s: float) -> str:
    """Everything the process printed up to the line with `marker`."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    seen = []
    for line in process.stdout:
        sys.stderr.write(line)
        seen.append(line)
        if marker in line:
            return "".join(seen)
        assert time.monotonic() < deadline, f"no {marker!r} within {timeout_s} s"
    raise AssertionError(f"baton serve exited ({process.wait()}) before printing {marker!r}")


def _drain(process: subprocess.Popen, log: list[str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        sys.stderr.write(line)
        log.append(line)


def readme_example(marker: str, language: str) -> str:
    match = re.search(rf"<!-- {marker} -->\s*```{language}\n(.*?)```", README.read_text(), re.S)
    assert match, f"README lost its {marker}"
    return match.group(1)


def test_readme_grpc_client_example_runs(served: Served) -> None:
    code = readme_example("grpc-client-example", "python").replace("localhost:50051", served.router_address)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "finish_reason: FINISH_REASON_LENGTH" in result.stdout
    assert len(result.stdout.strip()) > len("finish_reason: FINISH_REASON_LENGTH")


def test_readme_openai_example_runs(served: Served) -> None:
    code = readme_example("openai-example", "python").replace("http://localhost:8000", served.gateway_url)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"\[\d+ prompt \+ \d+ completion tokens\]", result.stdout), result.stdout


def test_readme_curl_example_runs(served: Served) -> None:
    script = readme_example("curl-example", "bash").replace("http://localhost:8000", served.gateway_url)
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] >= 1


def test_health_and_reflection_on_the_router(served: Served) -> None:
    address = served.router_address
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "baton.v1.Router"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in reply.list_services_response.service}
        assert {"baton.v1.Router", "grpc.health.v1.Health"} <= names


def test_health_and_reflection_on_the_workers(served: Served) -> None:
    redis_url = served.redis_url

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


def test_probe_reports_each_service_as_a_container_health_check_would(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    from baton.services.cli import main

    assert main(["probe", served.router_address]) == 0
    assert main(["probe", served.router_address, "--service", "baton.v1.Router"]) == 0
    assert main(["probe", f"{served.gateway_url}/ready"]) == 0
    assert main(["probe", served.router_address, "--service", "no.such.Service"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["probe", f"127.0.0.1:{_free_port()}", "--timeout-s", "0.5"]) == 1
    assert re.search("UNAVAILABLE|DEADLINE_EXCEEDED", capsys.readouterr().err)  # nothing listens there
    assert main(["probe", f"{served.gateway_url}/no-such-page"]) == 1
    assert "HTTP 404" in capsys.readouterr().err


def test_registry_check_is_clean_then_names_a_planted_leak(served: Served) -> None:
    redis_url = served.redis_url
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


def test_sigterm_stops_every_process(served: Served) -> None:
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=60) == 0
    port = int(served.redis_url.rsplit(":", 1)[1].split("/")[0])
    gateway = served.gateway_url.removeprefix("http://")
    for host_port in (served.router_address, gateway, f"127.0.0.1:{port}"):
        host, p = host_port.rsplit(":", 1)
        with pytest.raises(OSError):
            socket.create_connection((host, int(p)), timeout=1).close()
    # each worker said at its stop where its steps' time went; short prompts are prefilled where
    # they decode (--local-prefill-max-tokens), so the prompts' steps may be on either worker
    steps = dict(re.findall(r"^(prefill-0|decode-0) +\| .* engine steps: (.*)$", "".join(served.log), re.M))
    counts = {
        (name, kind): int(n)
        for name, line in steps.items()
        for n, kind in re.findall(r"(\d+) (\w+) steps", line)
    }
    assert counts[("prefill-0", "prefill")] + counts[("decode-0", "prefill")] >= 1
    assert counts[("decode-0", "decode")] >= 1
    # async scheduling (the default) also says how many decode steps continued the one before
    decode = r", [1-9]\d* decode steps(, \d+ continued)? \(mean \d+ tokens, launch [\d.]+ ms"
    assert re.search(decode, steps["decode-0"])
    # and every service how late its event loop ran what was ready (the bottleneck's, in a benchmark)
    lag = dict(re.findall(r"^(\S+) +\| .* event loop lag: (\d+ ticks, .*)$", "".join(served.log), re.M))
    assert {"gateway", "router", "prefill-0", "decode-0"} <= set(lag), lag


def test_colocated_mode_matches_offline(llama_dir: Path, redis_server: str) -> None:
    cluster = start_cluster(llama_dir, redis_server, colocated=True, num_prefill=0, num_decode=0, http_port=0)
    try:
        got = generate_all(cluster.router_address, PROMPTS, greedy(8))
        want = LLM(str(llama_dir), max_model_len=1024).generate(
            PROMPTS, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        )
        assert [c.token_ids for c in got] == [o.token_ids for o in want]
        assert httpx.get(f"{cluster.gateway_url}/ready").json()["decode_workers"] == 1
        body = {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(f"{cluster.gateway_url}/v1/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["text"] == want[1].text
        with grpc.insecure_channel(cluster.router_address) as channel:
            reset = router_pb2_grpc.RouterStub(channel).ResetPrefixCache(
                router_pb2.ResetClusterPrefixCacheRequest()
            )
        assert (
            reset.num_workers == 1 and reset.num_blocks > 0
        )  # the router's own engine had cached the prompts
    finally:
        codes = cluster.stop()
    assert codes == {"router": 0, "gateway": 0}
