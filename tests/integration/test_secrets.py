"""Secrets and prompts stay out of logs and command lines: a cluster on a Redis that wants AUTH, behind
a gateway with an API key, its KV transfers authenticated by a secret, every process logging each
request's lifecycle (--log-requests); and a cluster whose only Redis user is a least-privilege ACL user
(README: Deploy)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from baton_cluster import assert_no_leaks, generate, generate_all, greedy, start_cluster

from baton.services.launcher import LocalCluster
from baton.shared.registry import redacted

pytestmark = pytest.mark.integration

API_KEY = "sk-test-key-that-must-not-leak"
KV_TRANSFER_SECRET = "kv-transfer-secret-that-must-not-leak"
PROMPT = "the launch code is 7f3a-quokka-91"


@pytest.fixture(scope="module")
def cluster(llama_dir: Path, redis_with_auth: tuple[str, str]) -> Iterator[LocalCluster]:
    url, password = redis_with_auth
    cluster = start_cluster(
        llama_dir,
        url,
        redis_password=password,
        kv_transfer_secret=KV_TRANSFER_SECRET,
        http_port=0,
        log_requests=True,
        env={"BATON_API_KEY": API_KEY},
    )
    try:
        yield cluster
    finally:
        cluster.stop()


def test_requests_are_served_and_nothing_secret_is_logged_or_on_a_command_line(
    cluster: LocalCluster, redis_with_auth: tuple[str, str]
) -> None:
    _url, password = redis_with_auth
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": PROMPT, "max_tokens": 4}
    reply = httpx.post(f"{cluster.gateway_url}/v1/completions", json=body, headers=headers, timeout=60)
    assert reply.status_code == 200, reply.text
    assert httpx.post(f"{cluster.gateway_url}/v1/completions", json=body, timeout=60).status_code == 401
    completion = asyncio.run(generate(cluster.router_address, PROMPT, greedy(4)))
    assert completion.finish_reason == "FINISH_REASON_LENGTH"
    logged = "".join(cluster.log.lines)
    assert "22 prompt tokens" in logged and "ended" in logged  # the lifecycle lines are there...
    # ...the KV was pushed, over connections that proved the secret (no fallback to local prefill)...
    assert logged.count("bytes to decode-0") == 2 and "refused the KV connection" not in logged
    assert logged.count("(connections authenticated by the KV transfer secret)") == 2  # both workers
    for secret in (password, API_KEY, KV_TRANSFER_SECRET, PROMPT, PROMPT.split()[-1]):  # ...and none of these
        assert secret not in logged, secret
        for name, process in cluster.processes.items():
            argv = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode(errors="replace")
            assert secret not in argv, name
    assert_no_leaks(cluster)


def test_a_password_in_a_redis_url_is_redacted_for_logs() -> None:
    assert redacted("redis://:hunter2@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redacted("rediss://baton:hunter2@redis:6380/1") == "rediss://baton:***@redis:6380/1"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


ACL_NAMESPACE = "aclbaton"
ACL_RULES = [f"~{ACL_NAMESPACE}:*", "&*", "+@read", "+@write", "+@scripting", "+@transaction"]
ACL_RULES += ["+@connection", "+time", "-@dangerous"]
"""What Baton's registry needs of Redis: its namespace's keys, the read, write, scripting and
transaction commands (MULTI/EXEC carry a worker's prefix updates) and TIME (its scripts' clock),
nothing dangerous (no FLUSHALL, KEYS, CONFIG, DEBUG...). The README's ACL SETUSER line is this."""


def test_a_cluster_runs_on_a_least_privilege_acl_user(
    llama_dir: Path, start_redis: Callable[..., str]
) -> None:
    """A Redis whose default user is off and whose one user `baton` has ACL_RULES."""
    acl_user = ["--user", "baton", "on", ">acl-pass", *ACL_RULES, "--user", "default", "off"]
    acl_redis = start_redis(username="baton", password="acl-pass", extra_args=acl_user)
    cluster = start_cluster(
        llama_dir, acl_redis, namespace=ACL_NAMESPACE, redis_username="baton", redis_password="acl-pass"
    )
    try:
        got = generate_all(cluster.router_address, [list(range(100, 180)), [5, 6, 7]], greedy(4))
        assert [c.finish_reason for c in got] == ["FINISH_REASON_LENGTH"] * 2, [c.error for c in got]
        assert_no_leaks(cluster)
        refused = [line for line in cluster.log.lines if "NOPERM" in line or "no permissions" in line]
        assert refused == []
    finally:
        cluster.stop()
