"""Shared fixtures: generated model directories (real Hugging Face format), a private redis-server.

Without CUDA, Baton's Triton kernels run in Triton's CPU interpreter. The switch is read when a kernel
is defined, so it is set here, before any test module imports `baton.kernels`."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis as redis_sync
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from baton.shared.demo.tiny_model import ARCHITECTURES, write_tiny_model

if TYPE_CHECKING:
    from tls_certs import Pki


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One generated model per architecture (seed 0, float32)."""
    root = tmp_path_factory.mktemp("models")
    return {arch: write_tiny_model(root / arch, arch, seed=0) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def llama_dir(model_dirs: dict[str, Path]) -> Path:
    return model_dirs["llama"]


# -- Redis: a private redis-server per test session (never a fixed port) -----------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_redis(
    workdir: Path, password: str | None = None, username: str | None = None, extra_args: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], str]:
    """Start redis-server on a free port (with AUTH if `password`; `extra_args` such as ACL users, then
    `username` is who answers its first PING); retried if another process grabs the port first.
    Returns it and its URL (which carries no password)."""
    for _attempt in range(5):
        port = _free_port()
        proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                *(["--requirepass", password] if password and not username else []),
                *extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis_sync.Redis(
            host="127.0.0.1", port=port, username=username, password=password, socket_connect_timeout=0.5
        )
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if client.ping():
                    client.close()
                    return proc, f"redis://127.0.0.1:{port}/0"
            except redis_sync.exceptions.ConnectionError:
                time.sleep(0.02)
        client.close()
        proc.kill()
        proc.wait()
    raise RuntimeError("could not start redis-server on a free port")


@contextlib.contextmanager
def _running_redis(
    workdir: Path, password: str | None = None, username: str | None = None, extra_args: Sequence[str] = ()
) -> Iterator[str]:
    """A private redis-server (see _start_redis) while the block runs: its URL."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    proc, url = _start_redis(workdir, password, username, extra_args)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a private redis-server (no persistence), stopped at the end of the session."""
    with _running_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="session")
def redis_with_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A private redis-server that wants AUTH: its URL (no password in it) and its password."""
    password = "s3cret-for-tests"
    with _running_redis(tmp_path_factory.mktemp("redis-auth"), password) as url:
        yield url, password


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """`start_redis(password=, username=, extra_args=)`: another private redis-server for this test
    (ACL users, say), stopped after it; returns its URL."""
    numbers = itertools.count()
    with contextlib.ExitStack() as servers:

        def start(**kwargs: Any) -> str:
            workdir = tmp_path / f"redis-{next(numbers)}"
            workdir.mkdir()
            return servers.enter_context(_running_redis(workdir, **kwargs))

        yield start


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session's redis-server, emptied (FLUSHALL) for this test."""
    client = redis_sync.Redis.from_url(redis_server)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server


# -- TLS: a throwaway CA and certificates (tests/tls_certs.py) ------------------------------------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """PEM files of a test CA, a server-and-client certificate it signed, and an unrelated CA's."""
    from tls_certs import write_pki

    return write_pki(tmp_path_factory.mktemp("pki"))
