"""The Redis that compose.yaml and k8s/ deploy, run for real: each file's own start script (the same
shell line, given a local port and working directory) makes a Redis whose default user is off and
whose one user, `baton`, has what Baton's registry needs and nothing more; each file's probe answers
as that user; the registry works through it (workers, requests, prefixes, the reaper); dangerous
commands and keys outside the namespace are refused."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_sync
import yaml

from baton.shared.registry import Registry, WorkerInfo, WorkerLoad

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "d3ployPassw0rdOnlyForThisTest"


def compose_redis() -> tuple[str, list[str]]:
    """compose.yaml's Redis: its start script (Compose's `$$` unescaped) and its health check argv."""
    service = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["redis"]
    return service["command"][-1].replace("$$", "$"), service["healthcheck"]["test"][1:]


def k8s_redis() -> tuple[str, list[str]]:
    """k8s/'s Redis StatefulSet (the cpu-demo overlay rendered): its start script and readiness probe."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH: it renders the kustomize overlays")
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / "cpu-demo")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    redis_set = next(
        o
        for o in yaml.safe_load_all(rendered)
        if o["kind"] == "StatefulSet" and "redis" in o["metadata"]["name"]
    )
    container = redis_set["spec"]["template"]["spec"]["containers"][0]
    return container["args"][0], container["readinessProbe"]["exec"]["command"]


@pytest.fixture(params=["compose", "k8s"])
def deployed_redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[int, list[str]]]:
    """The deployment's Redis started from its own script on a free port; yields the port and the
    probe argv (pointed at that port)."""
    script, probe = compose_redis() if request.param == "compose" else k8s_redis()
    assert "/data/" in script and "exec redis-server" in script
    sock = __import__("socket").socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    local = script.replace("/data/", f"{tmp_path}/") + f" --port {port} --bind 127.0.0.1 --dir {tmp_path}"
    env = {**os.environ, "REDIS_PASSWORD": PASSWORD}
    server = subprocess.Popen(
        ["sh", "-c", local], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        client = redis_sync.Redis(port=port, username="baton", password=PASSWORD, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis_sync.exceptions.ConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, (
                    "the deployed Redis did not start"
                )
                time.sleep(0.05)
        client.close()
        if probe[0] == "redis-cli":  # an argv (Compose)
            yield port, ["redis-cli", "-p", str(port), *probe[1:]]
        else:  # a shell line (Kubernetes)
            yield port, [part.replace("redis-cli", f"redis-cli -p {port}") for part in probe]
    finally:
        server.kill()
        server.wait()


def test_the_deployed_redis_has_one_least_privilege_user(deployed_redis: tuple[int, list[str]]) -> None:
    port, probe = deployed_redis
    probed = subprocess.run(
        probe, env={**os.environ, "REDISCLI_AUTH": PASSWORD}, capture_output=True, text=True
    )
    assert probed.returncode == 0, probed
    with redis_sync.Redis(port=port) as anonymous, pytest.raises(redis_sync.exceptions.RedisError):
        anonymous.set("baton:x", "1")  # the default user is off
    with redis_sync.Redis(port=port, username="baton", password=PASSWORD) as baton:
        for command in (("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("SET", "other:x", "1")):
            with pytest.raises(redis_sync.exceptions.NoPermissionError):
                baton.execute_command(*command)

    async def registry_round() -> None:
        url = f"redis://127.0.0.1:{port}/0"
        async with Registry(url, namespace="baton", username="baton", password=PASSWORD) as registry:
            info = WorkerInfo("decode-0", "decode", "127.0.0.1:1", "ucx://127.0.0.1:2", "m", 16, 100)
            await registry.register_worker(info, WorkerLoad(100, 0, 0))
            assert [w.info.worker_id for w in await registry.live_workers()] == ["decode-0"]
            await registry.reserve("r~1", "decode-0", 3)
            await registry.publish_prefix("decode-0", ["ab", "cd"], [])
            assert await registry.prefix_overlap(["ab", "cd"], ["decode-0"]) == {"decode-0": 2}
            assert await registry.end_request("r~1", "decode-0")
            await registry.reap()
            assert await registry.live_requests() == []

    asyncio.run(registry_round())
