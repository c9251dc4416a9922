"""`baton gateway --gateway-processes N`: N gateway processes on one HTTP port, as vLLM's
`--api-server-count`. The gateway keeps nothing between requests, so any process can take any
connection; each has its own event loop and Router subscription, so together they parse, tokenize and
stream N times as much as one.

Each process listens on its own socket bound to the one port with SO_REUSEPORT, so the kernel deals
new connections evenly between them (one shared listening socket would not: the first process to
wake accepts a whole burst). The parent holds the port from the start, spawns the processes and
supervises them: SIGTERM or SIGINT is passed on (each process drains as a single gateway does) and
the parent exits 0 once all have; a process that dies on its own stops the others and the parent
exits 1, so the orchestrator restarts the gateway whole rather than serving at a fraction of its
capacity."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Sequence
from multiprocessing.process import BaseProcess

from baton.services.gateway.main import run_gateway
from baton.services.gateway.metrics import MULTIPROCESS_DIR_ENV
from baton.services.lifecycle import setup_logging, terminate_with_parent
from baton.shared.config import GatewayConfig

logger = logging.getLogger(__name__)

STOP_MARGIN_S = 10.0
"""How long past the drain timeout a process may take to exit before it is killed."""


def serve_processes(config: GatewayConfig, log_level: str, log_requests: bool) -> int:
    """Run `config.processes` gateway processes on config's host:port until SIGTERM / SIGINT (exit
    code 0) or until one of them dies (1)."""
    holder = _reuse_port_socket(config.host, config.port)  # bound, never listening: holds the port
    config = config.model_copy(update={"port": holder.getsockname()[1]})
    metrics_dir = tempfile.mkdtemp(prefix="baton-gateway-metrics-")
    os.environ[MULTIPROCESS_DIR_ENV] = metrics_dir  # inherited by the processes spawned below
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    spawn = multiprocessing.get_context("spawn")
    processes = [
        spawn.Process(
            target=_serve_one,
            args=(config, log_level, log_requests, os.getpid()),
            name=f"gateway-{index}",
        )
        for index in range(config.processes)
    ]
    stopped = False
    try:
        for process in processes:
            process.start()
        logger.info(
            "%d gateway processes on http://%s:%d (pids %s)",
            len(processes), config.host, config.port, [p.pid for p in processes],
        )  # fmt: skip
        while not stop.is_set() and all(p.is_alive() for p in processes):
            multiprocessing.connection.wait([p.sentinel for p in processes], timeout=0.5)
        stopped = stop.is_set()
        if not stopped:
            died = next(p for p in processes if not p.is_alive())
            logger.error("%s exited on its own (code %s): stopping the gateway", died.name, died.exitcode)
    finally:
        _stop(processes, config.drain_timeout_s)
        holder.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0 if stopped and all(p.exitcode == 0 for p in processes) else 1


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"the gateway cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


def _stop(processes: Sequence[BaseProcess], drain_timeout_s: float) -> None:
    """SIGTERM every process still running, wait for it to drain, SIGKILL what is left."""
    running = [p for p in processes if p.pid is not None and p.is_alive()]
    for process in running:
        process.terminate()  # SIGTERM: the process drains
    for process in running:
        process.join(drain_timeout_s + STOP_MARGIN_S)
        if process.is_alive():
            logger.warning("%s did not stop in time: killing it", process.name)
            process.kill()
            process.join()


def _serve_one(config: GatewayConfig, log_level: str, log_requests: bool, parent_pid: int) -> None:
    """One gateway process (the target of a spawned process). Its own session: a Ctrl-C in the
    terminal reaches only the parent, which passes one SIGTERM on."""
    os.setsid()
    terminate_with_parent()
    if os.getppid() != parent_pid:
        return  # the parent died before this process could ask to be told
    setup_logging(log_level, log_requests)
    listener = _reuse_port_socket(config.host, config.port)
    listener.listen(2048)
    asyncio.run(run_gateway(config, sockets=[listener]))
