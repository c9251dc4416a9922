"""Fixtures of the integration tier: the offline engine the clusters are compared with, and clusters
started per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from baton_cluster import start_cluster

from baton import LLM
from baton.services.launcher import LocalCluster

LEASE_S = 3.5
"""Short, so a killed worker is reaped within seconds; not shorter: in one CI run on 2 busy cores
two live prefill workers' 2 s leases lapsed together mid-test (their event loops never lagged past
51 ms, so the stall was outside them), and a request's three attempts ran out."""


@pytest.fixture(scope="session")
def offline(llama_dir: Path) -> LLM:
    """The offline LLM on the generated llama model, with the clusters' context length."""
    return LLM(str(llama_dir), max_model_len=1024)


@pytest.fixture
def make_cluster(llama_dir: Path, redis_server: str) -> Iterator:
    """Start clusters (a short lease, so dead workers are reaped fast); each is stopped afterwards."""
    started: list[LocalCluster] = []

    def make(**spec: object) -> LocalCluster:
        cluster = start_cluster(llama_dir, redis_server, lease_ttl_s=LEASE_S, **spec)
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        cluster.stop()
