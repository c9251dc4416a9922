"""A whole cluster on mutual TLS (README: TLS for gRPC): gateway -> router -> prefill and decode workers,
every gRPC hop over TLS with client certificates, the servers' name checked instead of the address
dialled (as in Kubernetes, where workers are dialled at their pod IPs). It answers token for token as
the offline engine does (and so as a plaintext cluster does), refuses plaintext on every gRPC port,
and `baton probe` checks it with the TLS settings in its environment, as compose and k8s run it; the
command line's gRPC clients (complete, registry check, bench serve at a grpc:// URL) reach it too."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from baton_cluster import assert_no_leaks, cluster_registry, generate, generate_all, greedy, start_cluster
from tls_certs import SERVER_NAME, Pki

from baton import LLM, SamplingParams
from baton.services import probe
from baton.services.cli import main
from baton.services.launcher import LocalCluster
from baton.shared.config import GrpcTlsConfig

pytestmark = pytest.mark.integration

PROMPTS = [list(range(100, 180)), [7, 8, 9, 10, 11, 12]]
MAX_TOKENS = 8


def test_a_cluster_on_mutual_tls_answers_as_offline_and_refuses_plaintext(
    llama_dir: Path, redis_server: str, pki: Pki, offline: LLM
) -> None:
    tls = GrpcTlsConfig(cert=pki.cert, key=pki.key, ca=pki.ca, client_auth=True, server_name=SERVER_NAME)
    cluster = start_cluster(llama_dir, redis_server, http_port=0, grpc_tls=tls)
    try:
        assert cluster.tls is not None
        greedy_offline = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        want = offline.generate(PROMPTS, greedy_offline)
        got = generate_all(cluster.router_address, PROMPTS, greedy(MAX_TOKENS), tls=cluster.tls)
        assert [c.token_ids for c in got] == [o.token_ids for o in want], [c.error for c in got]
        body = {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(f"{cluster.gateway_url}/v1/completions", json=body, timeout=60).json()
        assert reply["usage"]["completion_tokens"] == MAX_TOKENS  # the gateway's channel is TLS too
        assert reply["choices"][0]["text"] == want[0].text

        workers = asyncio.run(_worker_addresses(cluster))
        assert len(workers) == 2
        for address in [cluster.router_address, *workers]:
            assert probe.probe(address, tls=cluster.tls) is None, address
            assert "UNAVAILABLE" in (probe.probe(address) or ""), address  # plaintext
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            asyncio.run(generate(cluster.router_address, PROMPTS[1], greedy(2)))
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE

        assert _probe_process(cluster.router_address, pki) == 0
        _run_grpc_commands(cluster, redis_server, llama_dir, pki)
        assert_no_leaks(cluster)
    finally:
        codes = cluster.stop()
    assert set(codes.values()) == {0}, codes


async def _worker_addresses(cluster: LocalCluster) -> list[str]:
    async with cluster_registry(cluster) as registry:
        return [w.info.grpc_address for w in await registry.live_workers()]


def _probe_process(address: str, pki: Pki) -> int:
    """`baton probe` as a container's health check runs it: the settings from BATON_GRPC_TLS_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATON_")}
    env |= {"BATON_GRPC_TLS_CERT": str(pki.cert), "BATON_GRPC_TLS_KEY": str(pki.key)}
    env |= {"BATON_GRPC_TLS_CA": str(pki.ca), "BATON_GRPC_TLS_SERVER_NAME": SERVER_NAME}
    argv = [sys.executable, "-m", "baton.services.cli", "probe", address]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60).returncode


def _run_grpc_commands(cluster: LocalCluster, redis_url: str, model: Path, pki: Pki) -> None:
    """`baton complete`, `registry check` (it asks every worker) and `bench serve` (grpc://), with the
    TLS flags; without them, refused."""
    tls = ["--grpc-tls-cert", str(pki.cert), "--grpc-tls-key", str(pki.key), "--grpc-tls-ca", str(pki.ca)]
    tls += ["--grpc-tls-server-name", SERVER_NAME]
    complete = ["complete", "Once upon a time", "--address", cluster.router_address, "--max-tokens", "4"]
    assert main([*complete, *tls]) == 0
    assert main(complete) == 1
    check = ["registry", "check", "--redis-url", redis_url, "--namespace", cluster.spec.namespace]
    assert main([*check, *tls]) == 0
    bench = ["bench", "serve", "--url", f"grpc://{cluster.router_address}", "--model", str(model)]
    bench += ["--num-prompts", "4", "--input-len", "8,20", "--output-len", "2,4"]
    assert main([*bench, *tls]) == 0
